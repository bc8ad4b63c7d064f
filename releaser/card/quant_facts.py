"""Facts about quantized folders for their cards: GGUF files (read with gguf-py) and AWQ checkpoints."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from ..checkpoint import CheckpointReader
from ..errors import ModelError
from .facts import architecture_of, hf_prompt_facts, read_json, weights_size
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
        if recipe:   # a custom recipe: llama-quantize's mix with overrides (the arguments that make it)
            args = " ".join(_field(readers[0], "quantize.recipe.args") or [])
            quant, good = str(recipe), f"{quant} with `{args}`: {good[0].lower()}{good[1:]}"
        imatrix = _field(readers[0], "quantize.imatrix.dataset") or _field(readers[0], "quantize.imatrix.file")
        files.append(GGUFFile(shards[0].name, [p.name for p in shards], sum(p.stat().st_size for p in shards),
                              quant, n_bytes * 8 / n_params, good, imatrix))
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
                     _gguf_prompt(reader, path), next((p.name for p in sorted(folder.glob("*.imatrix"))), None))


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
