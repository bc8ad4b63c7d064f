"""Model cards for the main, -GGUF and -AWQ repos, rendered from facts read from the release folders.

The names are loaded on first use, so that the recipe can read the ``card:`` options (``releaser.card.options``)
without importing the renderer (which imports the recipe)."""

__all__ = ["CardError", "CardResult", "card_context", "check_card", "gather_facts", "render_card", "write_card"]


def __getattr__(name: str):
    if name in __all__:
        from . import render

        return getattr(render, name)
    raise AttributeError(name)
