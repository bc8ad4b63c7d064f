"""releaser: one recipe to a finished model release (merge, tokenizer fixes, GGUF, AWQ, cards, upload)."""

__version__ = "0.1.0"
