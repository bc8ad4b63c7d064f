"""Facts about a Hugging Face model folder (merged or not) for its card: config, weights, merge config, tokenizer."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..checkpoint import CheckpointReader
from ..checkpoint.config import read_json as read_checked_json
from ..errors import ModelError
from ..merge.config import LORA_WEIGHT_NOTE
from .methods import MethodFacts, method_facts
from .prompt import PromptFacts, prompt_facts, template_errors

HF_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
MERGE_CONFIG = "mergekit_config.yml"


@dataclass(frozen=True)
class ModelRef:
    ref: str                 # as written in the merge config (repo id or local path)
    url: str | None          # Hub link when ref is a repo id
    details: str             # its parameters ("weight: 0.5") or layer ranges; may be empty


@dataclass(frozen=True)
class LoraRef:
    lora: ModelRef
    model: ModelRef          # the model the LoRA is applied to


@dataclass(frozen=True)
class MergeFacts:
    method: MethodFacts
    base_model: ModelRef | None
    models: list[ModelRef]   # the merged models, base excluded
    loras: list[LoraRef]
    config_yaml: str         # mergekit_config.yml verbatim
    hub_models: list[str]    # every input that is a Hub repo id (base first): front matter base_model


@dataclass(frozen=True)
class ModelFacts:
    kind: str                # "model"
    folder: Path
    architecture: str
    parameters: int
    dtype: str
    context_length: int | None
    weights_size: int        # bytes of weight files
    merge: MergeFacts | None
    prompt: PromptFacts


def hub_repo(ref: str) -> str | None:
    """The Hub repo id of a model reference (``org/name`` or ``org/name@rev``), None for a local path."""
    repo = ref.split("@", 1)[0]
    if HF_REPO.match(repo) and not Path(repo).exists():
        return repo
    return None


def shown(ref: str) -> str:
    """How a card names a model reference: a Hub repo id as is, a local path by its folder name only (a card is
    published: the machine's absolute paths mean nothing to readers and should not leak)."""
    parts = [p if hub_repo(p) or "/" not in p.rstrip("/") and "\\" not in p else Path(p.rstrip("/")).name
             for p in ref.split("+")]
    return "+".join(parts)


def model_ref(ref: str, details: str = "") -> ModelRef:
    repo = hub_repo(ref.partition("+")[0])  # model+lora links to the model
    return ModelRef(shown(ref), f"https://huggingface.co/{repo}" if repo else None, details)


def _local_paths_shown(text: str, refs: list[str]) -> str:
    """The merge config with every absolute local model path replaced by its folder name."""
    for ref in sorted({p for r in refs for p in r.split("+") if Path(p).is_absolute()}, key=len, reverse=True):
        text = text.replace(ref, shown(ref))
    return text


def read_json(path: Path) -> dict:
    return read_checked_json(path, "re-create or re-download it")


def architecture_of(config: dict, folder: Path) -> str:
    archs = config.get("architectures")
    if not archs:
        raise ModelError(f"{folder / 'config.json'} has no 'architectures'; add e.g. [\"LlamaForCausalLM\"]")
    return archs[0]


def _params_text(params: Any) -> str:
    if not isinstance(params, dict):
        return ""
    return ", ".join(f"{k}: {json.dumps(v)}" for k, v in params.items())


def _entries(config: dict, weights: dict[str, str]) -> list[tuple[str, str]]:
    """(model reference, details) for every model entry of a merge config, in order; ``weights``: the LoRA weights
    noted in the file's comments (model+adapter -> weight)."""
    out: list[tuple[str, str]] = []
    for entry in config.get("models") or []:
        details = [_params_text(entry.get("parameters"))] if entry.get("parameters") else []
        out.append((_with_lora(entry, details, weights), ", ".join(details)))
    for piece in config.get("slices") or []:
        for src in piece.get("sources") or []:
            lr = src.get("layer_range")
            details = [f"layers {lr[0]}-{lr[1] - 1}"] if lr else []
            details += [_params_text(src.get("parameters"))] if src.get("parameters") else []
            out.append((_with_lora(src, details, weights), ", ".join(details)))
    return out


def _with_lora(entry: dict, details: list[str], weights: dict[str, str]) -> str:
    """releaser's ``lora: {path, weight}`` beside ``model:`` (files of releaser <= 0.1) or mergekit's ``model+lora``
    with its weight noted in a comment, as ``model+lora`` (the weight in the details)."""
    lora = entry.get("lora")
    if not isinstance(lora, dict) or "path" not in lora:
        if str(entry["model"]) in weights:
            details.insert(0, f"LoRA weight {weights[str(entry['model'])]}")
        return str(entry["model"])
    if lora.get("weight", 1.0) != 1.0:
        details.insert(0, f"LoRA weight {lora['weight']}")
    return f"{entry['model']}+{lora['path']}"


def merge_facts(folder: Path) -> MergeFacts | None:
    path = folder / MERGE_CONFIG
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8")
    try:
        config = yaml.safe_load(text)
        method = config["merge_method"]
        entries = _entries(config, {m["ref"]: m["weight"] for m in LORA_WEIGHT_NOTE.finditer(text)})
    except (yaml.YAMLError, TypeError, KeyError) as exc:
        raise ModelError(f"{path} is not a valid merge config ({type(exc).__name__}: {exc}); "
                         "re-create it with releaser merge or mergekit") from exc
    if not entries:
        raise ModelError(f"{path} lists no models (models: or slices:)")
    base = str(config["base_model"]) if config.get("base_model") else None
    models: dict[str, ModelRef] = {}
    loras: list[LoraRef] = []
    hub: list[str] = [r for r in [hub_repo(base.partition("+")[0])] if r] if base else []
    for ref, details in entries:
        model, _, lora = ref.partition("+")
        hub += [r for r in (hub_repo(model), hub_repo(lora) if lora else None) if r]
        if lora:
            loras.append(LoraRef(model_ref(lora, details), model_ref(model)))
        if ref != base and ref not in models:
            models[ref] = model_ref(ref, details)
    shown_text = _local_paths_shown(text, [ref for ref, _ in entries] + ([base] if base else []))
    return MergeFacts(method_facts(str(method)), model_ref(base) if base else None, list(models.values()), loras,
                      shown_text.rstrip("\n"), list(dict.fromkeys(hub)))


def has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or (folder / "tokenizer.model").is_file()


def hf_prompt_facts(folder: Path) -> PromptFacts:
    """Render the folder's chat template with transformers and collect its stop tokens."""
    if not has_tokenizer(folder):
        raise ModelError(f"{folder} has no tokenizer (tokenizer.json or tokenizer.model); copy the base model's "
                         "tokenizer files into it")
    from ..tokenizer.model import load_tokenizer

    tok = load_tokenizer(folder, "the card's prompt format")
    stop_ids: list[int] = []
    gen = folder / "generation_config.json"
    if gen.is_file():
        eos = read_json(gen).get("eos_token_id")
        stop_ids = [eos] if isinstance(eos, int) else list(eos or [])
    stops = [t for t in tok.convert_ids_to_tokens(stop_ids) if t] + ([tok.eos_token] if tok.eos_token else [])
    if not stops:
        raise ModelError(f"{folder} defines no stop token (eos_token in tokenizer_config.json or eos_token_id in "
                         "generation_config.json); run releaser fix-tokenizer")

    def render(messages: list[dict]) -> str:
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    with template_errors(str(folder), "fix it with releaser fix-tokenizer --template NAME"):
        return prompt_facts(render if tok.chat_template else None, stops, tok.bos_token)


def count_parameters(reader: CheckpointReader) -> int:
    return sum(math.prod(t.shape) for t in reader.tensors.values())


def weights_size(reader: CheckpointReader) -> int:
    return sum(Path(f).stat().st_size for f in {t.file for t in reader.tensors.values()})


def model_facts(folder: Path) -> ModelFacts:
    reader = CheckpointReader(folder)
    config = reader.config
    return ModelFacts(
        kind="model", folder=folder, architecture=architecture_of(config, folder),
        parameters=count_parameters(reader),
        dtype=str(config.get("dtype") or config.get("torch_dtype") or reader.tensors[next(iter(reader.tensors))]
                  .dtype).removeprefix("torch."),
        context_length=config.get("max_position_embeddings"), weights_size=weights_size(reader),
        merge=merge_facts(folder), prompt=hf_prompt_facts(folder))
