"""Chat prompts: the tokenizer's chat template when it has one, else fschat's conversation template.

Turn 2 of an MT-Bench question includes turn 1 and the decoder's own answer to it.
"""

from __future__ import annotations

from medusa_bench.errors import UserError


def conversation(turns: list[str], answers: list[str]) -> list[dict]:
    """Messages for the next turn: every question so far with the answers given so far."""
    messages = []
    for i, question in enumerate(turns):
        messages.append({"role": "user", "content": question})
        if i < len(answers):
            messages.append({"role": "assistant", "content": answers[i]})
    return messages


def build_prompt(loaded, messages: list[dict]) -> list[int]:
    """Token ids of the prompt ending where the assistant's answer starts."""
    tokenizer = loaded.tokenizer
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = fschat_prompt(loaded.spec, messages)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not getattr(tokenizer, "chat_template", None) and tokenizer.bos_token_id is not None and (not ids or ids[0] != tokenizer.bos_token_id):
        ids = [tokenizer.bos_token_id] + ids
    if len(ids) >= loaded.context_length:
        raise UserError(f"prompt of {len(ids)} tokens does not fit the model's context of {loaded.context_length}")
    return ids


def fschat_prompt(model_spec: str, messages: list[dict]) -> str:
    """FastChat's template for models without a chat template (Vicuna-style checkpoints)."""
    from fastchat.model import get_conversation_template

    conv = get_conversation_template(model_spec)
    for message in messages:
        role = conv.roles[0] if message["role"] == "user" else conv.roles[1]
        if message["role"] == "system":
            conv.set_system_message(message["content"])
            continue
        conv.append_message(role, message["content"])
    conv.append_message(conv.roles[1], None)
    return conv.get_prompt()
