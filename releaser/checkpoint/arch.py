"""What releaser knows about model architectures: which tensors are per layer, embeddings, final norm, lm_head."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import ModelError


@dataclass(frozen=True)
class Architecture:
    name: str                                  # family name, e.g. "llama"
    classes: tuple[str, ...]                   # config.json "architectures" entries
    model_types: tuple[str, ...]               # config.json "model_type" values
    layer_prefix: str = "model.layers."
    embed: str = "model.embed_tokens.weight"
    lm_head: str = "lm_head.weight"
    final_norm: str = "model.norm.weight"
    num_layers_key: str = "num_hidden_layers"

    def layer_of(self, name: str) -> int | None:
        m = re.match(re.escape(self.layer_prefix) + r"(\d+)\.", name)
        return int(m.group(1)) if m else None

    def layer_name(self, index: int, suffix: str) -> str:
        return f"{self.layer_prefix}{index}.{suffix}"

    def is_embedding(self, name: str) -> bool:
        """Vocabulary-sized matrices (rows are tokens)."""
        return name in (self.embed, self.lm_head)

    def tied(self, config: dict, tensor_names) -> bool:
        """True when lm_head shares the input embedding (no separate lm_head tensor)."""
        return self.lm_head not in tensor_names and bool(config.get("tie_word_embeddings", True))


LLAMA_FAMILY = [
    Architecture("llama", ("LlamaForCausalLM",), ("llama",)),
    Architecture("mistral", ("MistralForCausalLM",), ("mistral",)),
    Architecture("qwen2", ("Qwen2ForCausalLM",), ("qwen2",)),
]


def supported_names() -> list[str]:
    return [c for a in LLAMA_FAMILY for c in a.classes]


def architecture_for(config: dict, where: str = "the model") -> Architecture:
    classes = config.get("architectures") or []
    model_type = config.get("model_type")
    for arch in LLAMA_FAMILY:
        if any(c in arch.classes for c in classes) or (not classes and model_type in arch.model_types):
            return arch
    found = ", ".join(classes) or model_type or "none given"
    raise ModelError(f"unsupported architecture {found} in {where}'s config.json; "
                     f"releaser supports {', '.join(supported_names())}")
