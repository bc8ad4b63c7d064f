"""mergekit-compatible merge configuration (YAML), validated with pydantic; errors name the YAML path of the bad field."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..errors import ConfigError

Scalar = Union[bool, int, float, str]
# releaser extension: {layer index: value}, linear between the given layers and constant outside them
LayerGradient = dict[int, float]
ScalarOrGradient = Union[Scalar, list[Scalar], LayerGradient]

# keys of mergekit 0.1.5's configuration that releaser does not support yet (a clear message instead of "unknown")
MERGEKIT_UNSUPPORTED = {
    "modules": "multi-module (`modules:`) merges",
    "residual_weight": "`residual_weight` in slices",
    "override_architecture": "`override_architecture`",
}


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)   # mergekit would merge NaN weights


def _check_layer_gradient(v):
    if isinstance(v, dict):
        keys = list(v)
        if any(k < 0 for k in keys):
            raise ValueError(f"layer gradient keys must be layer indices >= 0, got {keys}")
        if keys != sorted(keys) or len(set(keys)) != len(keys):
            raise ValueError(f"layer gradient keys must be in increasing order, got {keys}")
        if not keys:
            raise ValueError("a layer gradient needs at least one {layer: value} entry")
    return v


def _check_parameters(v):
    for name, setting in (v or {}).items():
        try:
            _check_layer_gradient(setting)
        except ValueError as exc:
            raise ValueError(f"`{name}`: {exc}") from None
    return v


class Conditional(_Model):
    value: ScalarOrGradient
    filter: Optional[str] = None

    @field_validator("value")
    @classmethod
    def _layers(cls, v):
        return _check_layer_gradient(v)


Setting = Union[Conditional, list[Conditional], ScalarOrGradient]
Parameters = Optional[dict[str, Setting]]


class LoraSource(_Model):
    """releaser's form of a LoRA source: ``lora: {path: adapter_dir, weight: 0.25}`` beside ``model:``."""

    path: str
    weight: float = 1.0


LORA_WEIGHT_NOTE = re.compile(r"^# LoRA weight (?P<weight>\S+): (?P<ref>\S+)", re.MULTILINE)


def mergekit_yaml(text: str) -> str:
    """The config as mergekit can read it: releaser's ``lora: {path, weight}`` beside ``model:`` becomes mergekit's
    ``model: MODEL+ADAPTER``; a weight other than 1, which mergekit's syntax cannot say, goes into a comment line
    ``# LoRA weight W: MODEL+ADAPTER`` (read back by the model card). A config without ``lora:`` is returned as is."""
    data = yaml.safe_load(text)
    sources = [*(data.get("models") or []), *(src for s in data.get("slices") or [] for src in s.get("sources") or [])]
    loras = [(src, src.pop("lora")) for src in sources if isinstance(src, dict) and "lora" in src]
    if not loras:
        return text
    notes = []
    for src, lora in loras:
        src["model"] = f"{src['model']}+{lora['path']}"
        if float(lora.get("weight", 1.0)) != 1.0:
            notes.append(f"# LoRA weight {float(lora['weight']):g}: {src['model']}")
    header = ["# Written by releaser as mergekit reads it. mergekit's model+adapter applies a LoRA at full strength;",
              "# releaser applied these at the weights given:" if notes else "# releaser did too.", *notes]
    return "\n".join(header) + "\n" + yaml.safe_dump(data, sort_keys=False)


def split_lora(ref: str) -> tuple[str, Optional[str]]:
    """mergekit's ``model+lora`` reference -> (model, lora); a path that exists as written is never split."""
    if "+" not in ref or Path(ref).exists():
        return ref, None
    parts = ref.split("+")
    if len(parts) != 2 or not all(parts):
        raise ValueError(f"cannot parse model reference {ref!r}; use model+adapter_path (one '+')")
    return parts[0], parts[1]


class _Source(_Model):
    model: str
    lora: Optional[LoraSource] = None
    parameters: Parameters = None

    def model_post_init(self, _context: Any) -> None:
        try:
            model, lora = split_lora(self.model)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if lora is not None:
            if self.lora is not None:
                raise ConfigError(f"{self.model} names a LoRA with '+' and with `lora:`; keep one of them")
            self.model, self.lora = model, LoraSource(path=lora, weight=1.0)

    @field_validator("parameters")
    @classmethod
    def _layers(cls, v):
        return _check_parameters(v)


class InputModel(_Source):
    pass


class InputSlice(_Source):
    layer_range: tuple[int, int]

    @field_validator("layer_range")
    @classmethod
    def _ordered(cls, v: tuple[int, int]) -> tuple[int, int]:
        if v[0] < 0 or v[1] <= v[0]:
            raise ValueError(f"layer_range must be [start, end) with 0 <= start < end, got {list(v)}")
        return v


class OutputSlice(_Model):
    sources: list[InputSlice] = Field(min_length=1)
    base_model: Optional[str] = None
    parameters: Parameters = None

    @field_validator("parameters")
    @classmethod
    def _layers(cls, v):
        return _check_parameters(v)


class TokenEmbedding(_Model):
    """Where a token's embedding row comes from: a model's row of another token (``model_token``) or zeros."""

    kind: Literal["model_token", "zero"]
    model: Optional[str] = None
    token_id: Optional[int] = None
    token: Optional[str] = None

    def model_post_init(self, _context: Any) -> None:
        if self.kind == "model_token":
            if not self.model:
                raise ConfigError("a `kind: model_token` token source needs `model`")
            if (self.token_id is None) == (self.token is None):
                raise ConfigError("a `kind: model_token` token source needs exactly one of `token` or `token_id`")


class TokenSetting(_Model):
    source: Union[TokenEmbedding, str, None] = None   # a model (that model's row of the token), or a TokenEmbedding
    force: bool = False                               # use the source even for models that have the token


class TokenizerSettings(_Model):
    """mergekit's ``tokenizer:`` block."""

    source: str = "union"                             # union, base or a model
    tokens: Optional[dict[str, TokenSetting]] = None
    pad_to_multiple_of: Optional[int] = Field(default=None, ge=1)


DTYPES = ("float32", "float16", "bfloat16", "float64")


class MergeConfig(_Model):
    merge_method: str
    models: Optional[list[InputModel]] = None
    slices: Optional[list[OutputSlice]] = None
    base_model: Optional[str] = None
    parameters: Parameters = None
    dtype: Optional[str] = None
    out_dtype: Optional[str] = None
    tokenizer_source: Optional[str] = None
    tokenizer: Optional[TokenizerSettings] = None
    chat_template: Optional[str] = None
    random_seed: Optional[int] = None
    name: Optional[str] = None  # mergekit-multi's merge name; accepted and ignored

    @field_validator("parameters")
    @classmethod
    def _layers(cls, v):
        return _check_parameters(v)

    @field_validator("dtype", "out_dtype")
    @classmethod
    def _dtype(cls, v: Optional[str]) -> Optional[str]:
        if v is None:
            return v
        name = v.removeprefix("torch.")
        name = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}.get(name, name)
        if name not in DTYPES:
            raise ValueError(f"unknown dtype {v!r}; use one of {', '.join(DTYPES)}")
        return name

    def model_post_init(self, _context: Any) -> None:
        if bool(self.models) == bool(self.slices):
            raise ConfigError("the config needs exactly one of `models` or `slices` (modules are not supported)")
        if self.tokenizer is not None and self.tokenizer_source is not None:
            raise ConfigError("set either `tokenizer_source` or the `tokenizer:` block (its `source`), not both")

    # -- helpers ---------------------------------------------------------------------------------
    def adapters(self) -> set[str]:
        """The LoRA adapters the sources name (resolved as adapters, not models)."""
        sources = [*(self.models or []), *(src for s in self.slices or [] for src in s.sources)]
        return {src.lora.path for src in sources if src.lora}

    def referenced_models(self) -> list[str]:
        refs: list[str] = []
        if self.base_model:
            refs.append(self.base_model)
        for m in self.models or []:
            refs.append(m.model)
            if m.lora:
                refs.append(m.lora.path)
        for s in self.slices or []:
            refs.extend([src.model for src in s.sources])
            refs.extend([src.lora.path for src in s.sources if src.lora])
            if s.base_model:
                refs.append(s.base_model)
        return list(dict.fromkeys(refs))


def _yaml_path(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("function-after[_ordered(), tuple[int, int]]",) or "[" in str(part) or str(part) in (
                "bool", "int", "float", "str", "list[union[bool,int,float,str]]", "Conditional", "list[Conditional]"):
            continue  # union-branch labels pydantic adds to the location
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _explain(err: ValidationError) -> str:
    errors = err.errors()
    infinite = [e for e in errors if e["type"] == "finite_number"]   # in a union, the other branches' errors too
    first = infinite[0] if infinite else errors[0]
    if infinite:
        return f"invalid value at `{_yaml_path(first['loc'])}`: {first['input']!r} is not a finite number; give a number"
    path = _yaml_path(first["loc"])
    kind = first["type"]
    if kind == "missing":
        return f"missing required field `{path}`"
    if kind == "extra_forbidden":
        key = str(first["loc"][-1])
        if key in MERGEKIT_UNSUPPORTED:
            return (f"`{path}`: {MERGEKIT_UNSUPPORTED[key]} is valid mergekit but releaser does not support it yet; "
                    "remove it or merge this config with mergekit")
        return f"unknown field `{path}`; check its spelling (see the mergekit config reference)"
    msg = first["msg"].removeprefix("Value error, ")
    return f"invalid value at `{path}`: {msg}"


def parse_config(source: str | Path | dict, *, base_dir: Path | None = None) -> tuple[MergeConfig, str]:
    """Parse a config from a YAML path or a dict; return (config, the YAML text). Relative model paths are resolved
    against the config file's folder when they exist there."""
    where = "config"
    if isinstance(source, dict):
        data, text = source, yaml.safe_dump(source, sort_keys=False)
    else:
        path = Path(source)
        where = str(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        text = path.read_text()
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(exc, "problem", None) or "syntax error"
            raise ConfigError(f"{path} is not valid YAML{at}: {problem}; fix the YAML syntax") from None
        base_dir = base_dir or path.parent
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a YAML mapping with merge_method and models or slices")
    try:
        config = MergeConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{where}: {_explain(exc)}") from None
    if base_dir is not None:
        config = _resolve_paths(config, Path(base_dir))
    return config, text


def _resolve_paths(config: MergeConfig, base_dir: Path) -> MergeConfig:
    def fix(ref: Optional[str]) -> Optional[str]:
        if ref is None or Path(ref).is_absolute() or ref in ("union", "base"):
            return ref
        candidate = base_dir / ref
        return str(candidate) if candidate.exists() and not Path(ref).exists() else ref

    data = config.model_dump(exclude_none=True)
    for key in ("base_model", "tokenizer_source"):
        if key in data:
            data[key] = fix(data[key])
    tokenizer = data.get("tokenizer")
    if tokenizer:
        tokenizer["source"] = fix(tokenizer.get("source", "union"))
        for setting in (tokenizer.get("tokens") or {}).values():
            source = setting.get("source")
            if isinstance(source, str):
                setting["source"] = fix(source)
            elif isinstance(source, dict) and source.get("model"):
                source["model"] = fix(source["model"])
    for m in data.get("models", []):
        m["model"] = fix(m["model"])
        if "lora" in m:
            m["lora"]["path"] = fix(m["lora"]["path"])
    for s in data.get("slices", []):
        if "base_model" in s:
            s["base_model"] = fix(s["base_model"])
        for src in s["sources"]:
            src["model"] = fix(src["model"])
            if "lora" in src:
                src["lora"]["path"] = fix(src["lora"]["path"])
    return MergeConfig.model_validate(data)


def evaluate_layers(gradient: dict[int, float], layer: int | None) -> float:
    """A layer gradient at output layer ``layer``: linear between the given layers, constant outside them. Tensors
    outside the layers (embeddings, final norm, lm_head) take the first value, like mergekit's t=0 for them."""
    keys = list(gradient)
    if layer is None or layer <= keys[0]:
        return gradient[keys[0]]
    if layer >= keys[-1]:
        return gradient[keys[-1]]
    for k0, k1 in zip(keys, keys[1:]):
        if k0 <= layer <= k1:
            frac = (layer - k0) / (k1 - k0)
            return (1 - frac) * gradient[k0] + frac * gradient[k1]
    raise AssertionError("unreachable")


def evaluate(setting: Setting, tensor_name: str, t: float, layer: int | None = None) -> Any:
    """mergekit's ``evaluate_setting``: scalars as is; numeric lists are gradients over ``t`` (s = t(L-1), linear between
    neighbours); non-numeric lists pick ``v[int(t(L-1))]``; ``{filter, value}`` lists: first substring match wins.
    A ``{layer: value}`` mapping (releaser extension) is a gradient over the output layer index ``layer``."""
    if isinstance(setting, Conditional):
        setting = [setting]
    if isinstance(setting, dict):
        return evaluate_layers(setting, layer)
    if isinstance(setting, (bool, int, float, str)):
        return setting
    if not setting:
        return None
    if all(isinstance(e, (bool, int, float, str)) for e in setting):
        if not all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting):
            return setting[int(t * (len(setting) - 1))]
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    for cond in setting:
        if cond.filter is None or cond.filter == "*" or (tensor_name and cond.filter in tensor_name):
            return evaluate(cond.value, tensor_name, t, layer)
    return None
