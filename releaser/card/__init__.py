"""Model cards for the main, -GGUF and -AWQ repos, rendered from facts read from the release folders."""

from .render import CardError, CardResult, card_context, check_card, gather_facts, render_card, write_card

__all__ = ["CardError", "CardResult", "card_context", "check_card", "gather_facts", "render_card", "write_card"]
