"""Facts about quantized folders for their cards: GGUF files (read with gguf-py), AWQ, compressed-tensors W4A16 and
MLX checkpoints."""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..checkpoint import CheckpointReader, architecture_for
from ..errors import ModelError
from .facts import architecture_of, hf_prompt_facts, read_json, weights_size
from ..runtimes.files import FILES as RUNTIME_FILES
from .prompt import PromptFacts, jinja_renderer, prompt_facts, template_errors

SPLIT = re.compile(r"^(?P<stem>.+)-(?P<i>\d{5})-of-(?P<n>\d{5})\.gguf$")
HUB = "https://huggingface.co/"
CALIBRATION_FILE = "awq_calibration.json"  # written by the AWQ stage: {"dataset", "samples", "seq_len"}

# What each GGUF quant type is good for (matched by exact name, then by prefix for the I-quant families).
GOOD_FOR = {
    "F32": "Full 32-bit precision; for re-quantizing or reference only, very large",
    "BF16": "Full 16-bit quality; for re-quantizing, or when memory is plentiful",
    "F16": "Full 16-bit quality; for re-quantizing, or when memory is plentiful",
    "Q8_0": "Extremely high quality, close to 16-bit; large",
    "Q6_K": "Very high quality, near perfect",
    "Q5_K_M": "High quality",
    "Q5_K_S": "High quality, a little smaller than Q5_K_M",
    "Q5_1": "Legacy 5-bit format; prefer Q5_K_M",
    "Q5_0": "Legacy 5-bit format; prefer Q5_K_M",
    "Q4_K_M": "Good quality at a balanced size; the default choice",
    "Q4_K_S": "Slightly lower quality than Q4_K_M, smaller",
    "Q4_1": "Legacy 4-bit format; prefer Q4_K_M",
    "Q4_0": "Legacy 4-bit format, fast on some ARM CPUs; prefer Q4_K_M",
    "Q3_K_L": "Low quality; for machines with little memory",
    "Q3_K_M": "Low quality; for machines with little memory",
    "Q3_K_S": "Low quality; for machines with little memory",
    "Q2_K": "Very low quality; only when nothing larger fits",
    "Q2_K_S": "Very low quality, smaller than Q2_K (made with an importance matrix); only when nothing larger fits",
    "IQ4_XS": "I-quant, smaller than Q4_K_S; best made with an importance matrix",
    "IQ4_NL": "I-quant with 32-weight blocks, a little larger than IQ4_XS; prefer IQ4_XS",
    "IQ3_M": "I-quant, 3-bit with 4-bit attention value/output tensors; best made with an importance matrix",
    "IQ3_S": "I-quant, the size of Q3_K_S; much worse than it unless made with an importance matrix",
    "IQ3_XS": "I-quant, a little smaller than IQ3_S (made with an importance matrix)",
    "IQ3_XXS": "I-quant, 3.06-bit, smaller than IQ3_XS (made with an importance matrix)",
    "IQ2_M": "I-quant, 2.7-bit (made with an importance matrix); very low quality, only when nothing larger fits",
    "IQ2_S": "I-quant, 2.5-bit (made with an importance matrix); very low quality, only when nothing larger fits",
    "IQ2_XS": "I-quant, 2.3-bit (made with an importance matrix); very low quality, only when nothing larger fits",
    "IQ2_XXS": "I-quant, 2.06-bit (made with an importance matrix); the smallest 2-bit file, for very large models",
    "IQ1_M": "I-quant, 1.75-bit (made with an importance matrix); extremely low quality, for very large models only",
    "IQ1_S": "I-quant, 1.56-bit (made with an importance matrix); the smallest file, extremely low quality",
    "IQ4": "I-quant, similar quality to Q4_K_S at a smaller size; best on GPU",
    "IQ3": "I-quant, low quality but usable; best on GPU",
    "IQ2": "I-quant, very low quality; best on GPU",
    "IQ1": "I-quant, extremely low quality; experimental",
    "TQ": "Ternary format, only for models trained for ternary weights",
}
PREFERRED = ["Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "Q4_K_S", "Q5_K_S"]


@dataclass(frozen=True)
class GGUFFile:
    name: str                # file name (the first shard of a split file)
    shards: list[str]        # all file names (one unless split)
    size: int                # bytes, all shards
    quant_type: str          # from general.file_type, e.g. Q4_K_M, or a custom recipe's name (Q4_K_L)
    bits_per_weight: float   # tensor data bits / parameters
    good_for: str
    imatrix: str | None = None   # made with an importance matrix: its calibration data (quantize.imatrix.dataset)
    types: dict[str, int] = field(default_factory=dict)   # ggml type -> number of tensors stored as it
    fallback: str | None = None  # why its bits per weight exceed the type's: tensors llama.cpp stores otherwise


@dataclass(frozen=True)
class GGUFFacts:
    kind: str                # "gguf"
    folder: Path
    name: str | None         # general.name
    license: str | None      # general.license
    base_models: list[str]   # Hub repo ids from general.base_model.N.repo_url
    quantized_by: str | None  # general.quantized_by
    architecture: str
    parameters: int
    context_length: int | None
    files: list[GGUFFile]    # largest first
    recommended: GGUFFile
    prompt: PromptFacts
    imatrix_file: str | None = None   # the importance matrix published beside the files (NAME.imatrix)
    kv_cache_4k: int | None = None    # bytes of llama.cpp's F16 KV cache for a 4096-token context
    sampling: dict[str, str] = field(default_factory=dict)   # general.sampling.* (short key -> value as text)
    runtime_files: list[str] = field(default_factory=list)   # params, system, model.yaml in the folder
    llama_cpp: object | None = None   # releaser.runtimes.conformance.Conformance of the chat template


@dataclass(frozen=True)
class CalibrationFacts:
    dataset: str
    samples: int
    seq_len: int


@dataclass(frozen=True)
class AWQFacts:
    kind: str                # "awq"
    folder: Path
    architecture: str
    parameters: int
    bits: int
    group_size: int
    zero_point: bool
    version: str
    weights_size: int
    calibration: CalibrationFacts | None
    prompt: PromptFacts


def good_for(quant: str) -> str:
    for key in (quant, quant[:3], quant[:2]):   # an exact name, then IQ4..IQ1 and TQ
        if key in GOOD_FOR:
            return GOOD_FOR[key]
    raise ModelError(f"no description for GGUF quant type {quant}; add it to GOOD_FOR in {__name__}")


def _reader(path: Path):
    from ..gguf.reader import GGUFFile as Reader

    return Reader(path)


def _field(reader, key: str, index: int | None = None):
    value = reader.values.get(key)
    if value is None or index is None:
        return value
    return value[index] if 0 <= index < len(value) else None


def _quant_type(reader, path: Path) -> str:
    import gguf

    value = _field(reader, "general.file_type")
    if value is None:
        raise ModelError(f"{path} has no general.file_type; re-export it with releaser gguf")
    try:
        name = gguf.LlamaFileType(int(value)).name
    except ValueError:
        raise ModelError(f"{path} has an unknown general.file_type {value}") from None
    return name.removeprefix("MOSTLY_").removeprefix("ALL_")


def _groups(folder: Path) -> dict[str, list[Path]]:
    groups: dict[str, list[Path]] = {}
    for path in sorted(folder.glob("*.gguf")):
        m = SPLIT.match(path.name)
        groups.setdefault(m["stem"] if m else path.stem, []).append(path)
    return groups


def _gguf_prompt(reader, path: Path) -> PromptFacts:
    def token(key: str) -> str | None:
        idx = _field(reader, key)
        return None if idx is None else _field(reader, "tokenizer.ggml.tokens", int(idx))

    eos = token("tokenizer.ggml.eos_token_id")
    if eos is None:
        raise ModelError(f"{path} has no tokenizer.ggml.eos_token_id; fix it with releaser fix-tokenizer")
    bos = token("tokenizer.ggml.bos_token_id")
    template = _field(reader, "tokenizer.chat_template")
    add_bos = _field(reader, "tokenizer.ggml.add_bos_token")
    with template_errors(str(path), "fix it with releaser gguf-fix --chat-template FILE"):
        render = jinja_renderer(template, bos or "", eos) if template else None
        return prompt_facts(render, [token("tokenizer.ggml.eot_token_id") or eos, eos], bos if add_bos else None)


K_BLOCK = 256
FALLBACK_TYPES = {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL", "F16", "BF16"}


def _types(readers, quant: str) -> tuple[dict[str, int], str | None]:
    """Tensors per ggml type, and for a K-quant file the tensors llama.cpp stores in a legacy type because their
    rows are not a multiple of 256 (llama-quantize's fallback), as one sentence."""
    import gguf

    names, fallback, widths, quantized = Counter(), Counter(), set(), 0
    for reader in readers:
        for t in reader.tensors.values():
            name = gguf.GGMLQuantizationType(t.ggml_type).name
            names[name] += 1
            if len(t.shape) < 2 or name == "F32":
                continue
            quantized += 1
            if t.shape[-1] % K_BLOCK and name in FALLBACK_TYPES:
                fallback[name] += 1
                widths.add(t.shape[-1])
    if not fallback or "_K" not in quant:   # a K-quant mix (Q4_K_M, ...): its legacy-typed tensors are fallbacks
        return dict(names.most_common()), None
    parts = ", ".join(f"{n} to {t}" for t, n in fallback.most_common())
    rows = " or ".join(str(w) for w in sorted(widths))
    return dict(names.most_common()), (f"{sum(fallback.values())} of {quantized} weight tensors fall back ({parts}): "
                                       f"their rows are {rows} wide, not a multiple of the {K_BLOCK} that K-quants "
                                       "need")


def _kv_cache(reader, arch: str, context: int = 4096) -> int | None:
    """llama.cpp's F16 KV cache for ``context`` tokens: layers x (K + V width) x 2 bytes."""
    layers, heads = _field(reader, f"{arch}.block_count"), _field(reader, f"{arch}.attention.head_count")
    kv_heads = _field(reader, f"{arch}.attention.head_count_kv") or heads
    embd = _field(reader, f"{arch}.embedding_length")
    if not (layers and heads and embd):
        return None
    kv_heads = max(kv_heads) if isinstance(kv_heads, list) else kv_heads
    k = _field(reader, f"{arch}.attention.key_length") or embd // heads
    v = _field(reader, f"{arch}.attention.value_length") or embd // heads
    return int(layers) * int(kv_heads) * (int(k) + int(v)) * 2 * context


def _sampling(reader) -> dict[str, str]:
    from ..gguf.stops import SAMPLING_PREFIX

    out = {}
    for key, value in reader.values.items():
        if key.startswith(SAMPLING_PREFIX):
            out[key.removeprefix(SAMPLING_PREFIX)] = f"{value:.6g}" if isinstance(value, float) else str(value)
    return out


def _conformance(reader):
    """How llama.cpp's built-in chat formatter renders the file's template (None: no template)."""
    from ..runtimes.conformance import check_template

    template = _field(reader, "tokenizer.chat_template")
    if not template:
        return None
    tokens = _field(reader, "tokenizer.ggml.tokens") or []

    def token(key: str) -> str:
        i = _field(reader, key)
        return tokens[int(i)] if i is not None and int(i) < len(tokens) else ""

    return check_template(template, token("tokenizer.ggml.bos_token_id"), token("tokenizer.ggml.eos_token_id"))


def _base_models(reader) -> list[str]:
    count = int(_field(reader, "general.base_model.count") or 0)
    urls = [_field(reader, f"general.base_model.{i}.repo_url") for i in range(count)]
    return [u.removeprefix(HUB) for u in urls if u and u.startswith(HUB) and u.count("/") == 4]


def gguf_facts(folder: Path) -> GGUFFacts:
    files, first = [], None
    for shards in _groups(folder).values():
        readers = [_reader(p) for p in shards]
        n_params = sum(t.n_elements for r in readers for t in r.tensors.values())
        n_bytes = sum(t.nbytes for r in readers for t in r.tensors.values())
        if not n_params:
            raise ModelError(f"{shards[0]} holds no tensors")
        quant = _quant_type(readers[0], shards[0])
        good = good_for(quant)
        recipe = _field(readers[0], "quantize.recipe.name")
        target = _field(readers[0], "quantize.recipe.target")
        if recipe and target:   # a searched recipe: every tensor's type in the args (too many to show)
            rules = len(_field(readers[0], "quantize.recipe.args") or []) // 2
            quant, good = str(recipe), (f"a type per tensor chosen for {target} by measured sensitivity ({rules} "
                                        f"`--tensor-type` rules on {quant}, listed in the file's quantize.recipe.args)")
        elif recipe:   # a custom recipe: llama-quantize's mix with overrides (the arguments that make it)
            args = " ".join(_field(readers[0], "quantize.recipe.args") or [])
            quant, good = str(recipe), f"{quant} with `{args}`: {good[0].lower()}{good[1:]}"
        imatrix = _field(readers[0], "quantize.imatrix.dataset") or _field(readers[0], "quantize.imatrix.file")
        types, fallback = _types(readers, _quant_type(readers[0], shards[0]))
        files.append(GGUFFile(shards[0].name, [p.name for p in shards], sum(p.stat().st_size for p in shards),
                              quant, n_bytes * 8 / n_params, good, imatrix, types, fallback))
        first = first or (readers[0], shards[0], n_params)
    if first is None:
        raise ModelError(f"{folder} has no .gguf files")
    reader, path, n_params = first
    arch = _field(reader, "general.architecture")
    if arch is None:
        raise ModelError(f"{path} has no general.architecture")
    files.sort(key=lambda f: -f.size)
    by_type = {f.quant_type: f for f in files}
    pick = next((by_type[q] for q in PREFERRED if q in by_type), None)
    pick = pick or min((f for f in files if f.bits_per_weight >= 4), key=lambda f: f.size, default=files[0])
    ctx = _field(reader, f"{arch}.context_length")
    meta = {k: _field(reader, f"general.{k}") for k in ("name", "license", "quantized_by")}
    return GGUFFacts("gguf", folder, meta["name"], meta["license"], _base_models(reader), meta["quantized_by"],
                     str(arch), n_params, int(ctx) if ctx is not None else None, files, pick,
                     _gguf_prompt(reader, path), next((p.name for p in sorted(folder.glob("*.imatrix"))), None),
                     _kv_cache(reader, str(arch)), _sampling(reader),
                     [n for n in RUNTIME_FILES if (folder / n).is_file()], _conformance(reader))


def is_awq(config: dict) -> bool:
    qc = config.get("quantization_config")
    return isinstance(qc, dict) and str(qc.get("quant_method", "")).lower() == "awq"


def _calibration(folder: Path) -> CalibrationFacts | None:
    path = folder / CALIBRATION_FILE
    if not path.is_file():
        return None
    data = read_json(path)
    try:
        return CalibrationFacts(str(data["dataset"]), int(data["samples"]), int(data["seq_len"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"{path} needs dataset (str), samples (int) and seq_len (int): {exc!r}") from exc


def awq_facts(folder: Path) -> AWQFacts:
    reader = CheckpointReader(folder)
    qc = reader.config["quantization_config"]
    missing = [k for k in ("bits", "group_size", "zero_point", "version") if k not in qc]
    if missing:
        raise ModelError(f"{folder / 'config.json'}: quantization_config lacks {', '.join(missing)}")
    bits = int(qc["bits"])
    params = 0
    for name, info in reader.tensors.items():
        if name.endswith(".qweight"):
            params += math.prod(info.shape) * (32 // bits)
        elif not name.endswith((".qzeros", ".scales")):
            params += math.prod(info.shape)
    if not any(n.endswith(".qweight") for n in reader.tensors):
        raise ModelError(f"{folder} has an AWQ quantization_config but no .qweight tensors")
    return AWQFacts("awq", folder, architecture_of(reader.config, folder), params, bits, int(qc["group_size"]),
                    bool(qc["zero_point"]), str(qc["version"]).upper(), weights_size(reader), _calibration(folder),
                    hf_prompt_facts(folder))


@dataclass(frozen=True)
class W4A16Facts:
    kind: str                # "w4a16"
    folder: Path
    architecture: str
    parameters: int
    bits: int
    group_size: int
    symmetric: bool
    ignore: list[str]        # modules kept unquantized (lm_head, MoE routers)
    weights_size: int
    calibration: CalibrationFacts | None   # the AWQ pass's (awq_calibration.json, copied with the codes)
    prompt: PromptFacts


@dataclass(frozen=True)
class MLXFacts:
    kind: str                # "mlx"
    folder: Path
    architecture: str
    parameters: int
    bits: int
    group_size: int
    weights_size: int
    prompt: PromptFacts
    embedding_bits: int | None = None         # the token embedding's (and head's) bits; None: kept in float
    calibration: CalibrationFacts | None = None   # the AWQ pass's, when the codes are its (awq_calibration.json)


def _parameters(reader: CheckpointReader, packed: dict[str, int], skip: tuple[str, ...]) -> int:
    """Parameter count of a folder whose packed tensors (suffix -> values per stored element) hold several."""
    total = 0
    for name, info in reader.tensors.items():
        if name.endswith(skip):
            continue
        per = next((n for suffix, n in packed.items() if name.endswith(suffix) and n), 1)
        total += math.prod(info.shape) * per
    return total


def w4a16_facts(folder: Path) -> W4A16Facts:
    reader = CheckpointReader(folder)
    qc = reader.config["quantization_config"]
    groups = list((qc.get("config_groups") or {}).values())
    if len(groups) != 1 or not isinstance(groups[0].get("weights"), dict):
        raise ModelError(f"{folder / 'config.json'}: quantization_config needs one config group with weights")
    w = groups[0]["weights"]
    if not any(n.endswith(".weight_packed") for n in reader.tensors):
        raise ModelError(f"{folder} has a compressed-tensors quantization_config but no .weight_packed tensors")
    params = _parameters(reader, {".weight_packed": 32 // int(w["num_bits"])},
                         (".weight_scale", ".weight_shape", ".weight_zero_point"))
    return W4A16Facts("w4a16", folder, architecture_of(reader.config, folder), params, int(w["num_bits"]),
                      int(w["group_size"]), bool(w.get("symmetric", True)), list(qc.get("ignore") or []),
                      weights_size(reader), _calibration(folder), hf_prompt_facts(folder))


def mlx_facts(folder: Path) -> MLXFacts:
    reader = CheckpointReader(folder)
    from ..formats.mlx import layer_quantization

    q = reader.config["quantization"]
    bits = int(q["bits"])
    quantized = {n.removesuffix(".scales") for n in reader.tensors if n.endswith(".scales")}
    params = 0
    for name, info in reader.tensors.items():
        if name.endswith((".scales", ".biases")):
            continue
        base = name.removesuffix(".weight")
        params += math.prod(info.shape) * (32 // layer_quantization(q, base)[0] if base in quantized else 1)
    embed = architecture_for(reader.config, str(folder)).embed.removesuffix(".weight")
    embedding_bits = layer_quantization(q, embed)[0] if embed in quantized else None
    return MLXFacts("mlx", folder, architecture_of(reader.config, folder), params, bits, int(q["group_size"]),
                    weights_size(reader), hf_prompt_facts(folder), embedding_bits, _calibration(folder))
