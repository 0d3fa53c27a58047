"""What goes into a model, read the same way by every layer above: benchmark question files
(`questions.py`: FastChat's format, found by bench name) and chat prompts (`chat.py`: the
tokenizer's chat template, else FastChat's). It imports nothing above errors.py and paths.py.
"""
