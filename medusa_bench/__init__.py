"""medusa-bench: measure how much faster draft heads make an LLM, at what quality, with which tree."""

__version__ = "0.1.0"
