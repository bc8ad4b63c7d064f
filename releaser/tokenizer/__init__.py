"""Tokenizer doctor: find and fix stop tokens, chat templates, pad/BOS and untrained rows of HF model folders.

The names are loaded on first use, so that reading the ``tokenizer:`` options (``releaser.tokenizer.options``, when a
recipe is validated) does not import torch."""

_WHERE = {"DoctorReport": "doctor", "diagnose": "doctor", "Finding": "findings", "FixReport": "fix", "FixSpec": "fix",
          "fix_tokenizer": "fix", "StopResult": "stoptest", "stop_test": "stoptest", "ChatTemplate": "templates",
          "TemplateError": "templates", "builtin_names": "templates", "load_template": "templates"}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(name)
