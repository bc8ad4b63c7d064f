"""llama-quantize's per-tensor type rules (``src/llama-quant.cpp``; dense Llama-family models and the 8-expert rules
of mixture-of-experts ones), with or without an importance matrix (it changes Q4_0/Q5_0's first ffn_down layers, and
Q2_K_S needs one), and its per-tensor overrides (``--tensor-type REGEX=TYPE``, ``--output-tensor-type``,
``--token-embedding-type``, ``--pure``) as a :class:`QuantSpec`.

``tensor_types(tensors, quant, ...)`` returns the ggml type llama.cpp's ``llama_model_quantize`` picks for every tensor
of an F32 GGUF when asked for ``quant`` (a name or a QuantSpec); the plain types (F32, F16, BF16) follow
``convert_hf_to_gguf.py``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T, LlamaFileType

from ..errors import ConfigError

# quant name -> the mix's default tensor type (llama_ftype_get_default_type)
DEFAULT_TYPE: dict[str, T] = {
    "F32": T.F32, "F16": T.F16, "BF16": T.BF16, "Q8_0": T.Q8_0,
    "Q4_0": T.Q4_0, "Q4_1": T.Q4_1, "Q5_0": T.Q5_0, "Q5_1": T.Q5_1,
    "Q2_K": T.Q2_K, "Q2_K_S": T.Q2_K, "Q3_K_S": T.Q3_K, "Q3_K_M": T.Q3_K, "Q3_K_L": T.Q3_K,
    "Q4_K_S": T.Q4_K, "Q4_K_M": T.Q4_K, "Q5_K_S": T.Q5_K, "Q5_K_M": T.Q5_K, "Q6_K": T.Q6_K,
    "IQ4_NL": T.IQ4_NL, "IQ4_XS": T.IQ4_XS, "IQ3_XS": T.IQ3_S, "IQ3_S": T.IQ3_S, "IQ3_M": T.IQ3_S,
    "IQ3_XXS": T.IQ3_XXS, "IQ2_M": T.IQ2_S, "IQ2_S": T.IQ2_XS, "IQ2_XS": T.IQ2_XS, "IQ2_XXS": T.IQ2_XXS,
    "IQ1_M": T.IQ1_M, "IQ1_S": T.IQ1_S,
}
QUANT_NAMES = list(DEFAULT_TYPE)
FALLBACK = {T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0, T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0, T.IQ4_XS: T.IQ4_NL,
            T.IQ3_S: T.IQ4_NL, T.IQ3_XXS: T.IQ4_NL, T.IQ2_S: T.IQ4_NL, T.IQ2_XS: T.IQ4_NL, T.IQ2_XXS: T.IQ4_NL,
            T.IQ1_S: T.IQ4_NL, T.IQ1_M: T.IQ4_NL}
UNQUANTIZED = (T.F32, T.F16, T.BF16)
# the tensor types an override may name (ggml's names, any case, as llama-quantize reads them)
TENSOR_TYPES = {t.name: t for t in (T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q2_K, T.Q3_K,
                                    T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_NL, T.IQ4_XS,
                                    T.IQ3_S, T.IQ3_XXS, T.IQ2_S, T.IQ2_XS, T.IQ2_XXS, T.IQ1_S, T.IQ1_M)}


def tensor_type(name: str, what: str) -> T:
    """A ggml tensor type by name (``q8_0``, ``Q6_K``, ...); ConfigError naming ``what`` and the valid names."""
    qtype = TENSOR_TYPES.get(str(name).strip().upper())
    if qtype is None:
        raise ConfigError(f"{what}: unknown tensor type {name!r}; valid types: {', '.join(TENSOR_TYPES)}")
    return qtype


@dataclass(frozen=True)
class QuantSpec:
    """One GGUF file's recipe: llama-quantize's ``base`` mix with its overrides, written as ``{stem}-{name}.gguf``.
    ``tensor_types``: (regex, type) pairs in order, the first whose regex is found in a tensor's GGUF name (lower
    case, as llama-quantize lowers it) wins. ``target``: a recipe to search (``releaser.gguf.search``): the search
    returns this spec with every quantized tensor in ``tensor_types`` (and ``base``, when it was not given, set)."""

    name: str
    base: str
    tensor_types: tuple[tuple[str, str], ...] = ()
    output_type: str | None = None
    embedding_type: str | None = None
    pure: bool = False
    target: object = None   # releaser.gguf.search.Target

    @property
    def is_default(self) -> bool:
        return not (self.tensor_types or self.output_type or self.embedding_type or self.pure or self.target)

    @property
    def searched(self) -> bool:
        """A target recipe whose types are not chosen yet."""
        return self.target is not None and not self.tensor_types

    def quantize_args(self) -> list[str]:
        """The llama-quantize arguments that make the same file from an F32 GGUF (before ``in out TYPE``)."""
        args = [a for p, t in self.tensor_types for a in ("--tensor-type", f"{p}={t.lower()}")]
        if self.output_type:
            args += ["--output-tensor-type", self.output_type.lower()]
        if self.embedding_type:
            args += ["--token-embedding-type", self.embedding_type.lower()]
        return args + (["--pure"] if self.pure else [])


def quant_spec(entry, defaults: dict | None = None) -> QuantSpec:
    """A QuantSpec from a recipe/CLI entry: a quant name (``Q4_K_M``) or a mapping ``{name, base, tensor_types,
    output_type, embedding_type, pure}``; ``defaults`` (the same keys but name/base) apply to every entry that does
    not set them. Errors are ConfigErrors naming the entry."""
    defaults = dict(defaults or {})
    if isinstance(entry, str):
        fields, name = {}, entry.strip().upper()
    elif isinstance(entry, dict):
        fields = dict(entry)
        name = str(fields.pop("name", "") or "").strip()
        if not name:
            raise ConfigError(f"GGUF quant {entry!r} needs a name (the file name part, e.g. Q4_K_L)")
    else:
        raise ConfigError(f"GGUF quant {entry!r}: give a type name such as Q4_K_M or a mapping with name and base")
    target = fields.pop("target", None)
    if target is not None:
        return _target_spec(name, fields, target, defaults)
    base = str(fields.pop("base", name)).strip().upper()
    if base not in DEFAULT_TYPE:
        raise ConfigError(f"GGUF quant {name}: unknown base type {base}; valid types: {', '.join(QUANT_NAMES)}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise ConfigError(f"GGUF quant name {name!r}: use letters, digits, '_', '.' and '-' (it is part of a file name)")
    unknown = set(fields) - {"tensor_types", "output_type", "embedding_type", "pure"}
    if unknown:
        raise ConfigError(f"GGUF quant {name}: unknown field {sorted(unknown)[0]!r}; the fields are name, base, "
                          "tensor_types, output_type, embedding_type and pure (or name, target and base)")
    merged = {**defaults, **{k: v for k, v in fields.items() if v is not None}}
    pairs = merged.get("tensor_types") or {}
    if isinstance(pairs, dict):
        pairs = list(pairs.items())
    checked = []
    for pattern, qtype in pairs:
        try:
            re.compile(str(pattern).lower())
        except re.error as exc:
            raise ConfigError(f"GGUF quant {name}: tensor type pattern {pattern!r} is not a regular expression "
                              f"({exc})") from None
        checked.append((str(pattern).lower(), tensor_type(qtype, f"GGUF quant {name}, {pattern}").name))
    out, emb = merged.get("output_type"), merged.get("embedding_type")
    if name != base and not (checked or out or emb or merged.get("pure")):
        raise ConfigError(f"GGUF quant {name} is {base} without overrides; name it {base}, or give tensor_types, "
                          "output_type, embedding_type or pure")
    if name in DEFAULT_TYPE and name != base:
        raise ConfigError(f"GGUF quant {name}: a custom recipe cannot take a llama.cpp type's name; choose another")
    return QuantSpec(name, base, tuple(checked), out and tensor_type(out, f"GGUF quant {name}, output_type").name,
                     emb and tensor_type(emb, f"GGUF quant {name}, embedding_type").name, bool(merged.get("pure")))
def _target_spec(name: str, fields: dict, target, defaults: dict) -> QuantSpec:
    """A recipe to search: a name of its own, an optional base (the file type it is labelled with) and no overrides
    (the search names every tensor's type)."""
    from .search import parse_target

    base = str(fields.pop("base", "") or "").strip().upper()
    if base and (base not in DEFAULT_TYPE or DEFAULT_TYPE[base] in UNQUANTIZED):
        raise ConfigError(f"GGUF quant {name}: base {base} is not a quantized type; valid bases: "
                          f"{', '.join(q for q in QUANT_NAMES if DEFAULT_TYPE[q] not in UNQUANTIZED)}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise ConfigError(f"GGUF quant name {name!r}: use letters, digits, '_', '.' and '-' (it is part of a file name)")
    if name in DEFAULT_TYPE:
        raise ConfigError(f"GGUF quant {name}: a searched recipe cannot take a llama.cpp type's name; choose another "
                          "(e.g. Q4_K_R)")
    overrides = [k for k in ("tensor_types", "output_type", "embedding_type", "pure")
                 if fields.get(k) or defaults.get(k)]
    unknown = set(fields) - {"tensor_types", "output_type", "embedding_type", "pure"}
    if unknown:
        raise ConfigError(f"GGUF quant {name}: unknown field {sorted(unknown)[0]!r}; a searched recipe has name, target "
                          "and base")
    if overrides:
        raise ConfigError(f"GGUF quant {name} searches every tensor's type for its target, so {overrides[0]} cannot "
                          "apply to it; drop one or the other")
    return QuantSpec(name, base, target=parse_target(target, name))


#: Mixes llama-quantize refuses to make without an importance matrix (tensor_requires_imatrix, for the types we have),
#: each with the nearest mix that needs none.
NEEDS_IMATRIX = {"Q2_K_S": "Q2_K", "IQ3_XS": "IQ3_S", "IQ3_XXS": "IQ3_S", "IQ2_M": "Q2_K", "IQ2_S": "Q2_K",
                 "IQ2_XS": "Q2_K", "IQ2_XXS": "Q2_K", "IQ1_M": "Q2_K", "IQ1_S": "Q2_K"}
#: Tensor types llama-quantize refuses to write without importance weights (but for the token embeddings and output).
IMATRIX_TYPES = (T.IQ3_XXS, T.IQ2_S, T.IQ2_XS, T.IQ2_XXS, T.IQ1_S, T.IQ1_M)
#: Tensor types llama.cpp's quantizer cannot make without importance weights at all (it asserts them): not even for
#: the token embeddings and the output.
WEIGHTS_REQUIRED = (T.IQ2_XXS, T.IQ2_XS, T.IQ1_S)
#: The mixes of llama_tensor_get_type_impl's very-low-bit branch: their own rules for attn_v, the first ffn_down
#: layers and attn_output, the other tensors keep the mix's type.
_LOW_BIT = ("IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ1_S", "IQ1_M")


def file_type(quant: str) -> LlamaFileType:
    """The ``general.file_type`` value of a quant name."""
    return LlamaFileType.ALL_F32 if quant == "F32" else LlamaFileType["MOSTLY_" + quant]


def parse_quants(quants) -> list[str]:
    """Normalise ``"q4_k_m,F16"`` or a list to upper-case names; unknown names raise ConfigError listing valid ones."""
    if isinstance(quants, str):
        quants = quants.split(",")
    names = [q.strip().upper() for q in quants if q.strip()]
    bad = [q for q in names if q not in DEFAULT_TYPE]
    if bad or not names:
        raise ConfigError(f"unknown GGUF quant type {', '.join(bad) or '(none given)'}; "
                          f"valid types: {', '.join(QUANT_NAMES)}")
    return list(dict.fromkeys(names))


def quant_specs(quants) -> list[QuantSpec]:
    """``"Q4_K_M,F16"``, or a list of names, mappings (see :func:`quant_spec`) and QuantSpecs, as QuantSpecs."""
    if isinstance(quants, str):
        quants = parse_quants(quants)
    specs = [q if isinstance(q, QuantSpec) else quant_spec(q if isinstance(q, dict) else parse_quants([q])[0])
             for q in quants]
    if not specs:
        raise ConfigError(f"no GGUF quant type given; valid types: {', '.join(QUANT_NAMES)}")
    return list({s.name: s for s in specs}.values())


@dataclass(frozen=True)
class TensorDesc:
    name: str          # GGUF name, e.g. blk.0.attn_v.weight
    ne0: int           # row length (last numpy dim)
    n_dims: int


@dataclass(frozen=True)
class ModelShape:
    n_layer: int
    n_head: int
    n_head_kv: int
    arch: str = "llama"
    n_expert: int = 0          # experts per MoE layer (llama.cpp gives 8-expert models more bits in attention)

    @property
    def is_70b(self) -> bool:  # llama.cpp's LLM_TYPE_70B for the Llama family
        return self.n_layer == 80 and not self.n_expert and (self.arch != "llama" or self.n_head != self.n_head_kv)


def allows_quantization(t: TensorDesc) -> bool:
    return (t.n_dims >= 2 and t.name.endswith("weight") and "_norm.weight" not in t.name
            and "ffn_gate_inp.weight" not in t.name)


def _is_attn_v(name: str) -> bool:   # llama.cpp's category_is_attn_v: fused qkv and MLA's kv_b count as attn_v
    return any(k in name for k in ("attn_v.weight", "attn_qkv.weight", "attn_kv_b.weight"))


def _layer(name: str) -> int:   # llama.cpp's layer_info: the block index from the name (experts are not in order)
    return int(name.split(".")[1])


def _more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _fallback(t: TensorDesc, qtype: T) -> T:
    block = GGML_QUANT_SIZES[qtype][0]
    if t.ne0 % block == 0:
        return qtype
    qtype = FALLBACK.get(qtype, qtype)
    return qtype if t.ne0 % GGML_QUANT_SIZES[qtype][0] == 0 else T.F16


def requires_imatrix(quant: str, name: str, qtype: T) -> bool:
    """llama.cpp's tensor_requires_imatrix for our types: IQ3_XXS, IQ2 and IQ1 tensors and the Q2_K tensors of a
    Q2_K_S file, but the token embeddings and the output."""
    return (qtype in IMATRIX_TYPES or (quant == "Q2_K_S" and qtype == T.Q2_K)) and name not in (
        "token_embd.weight", "per_layer_token_embd.weight", "output.weight")


class _Mix:
    def __init__(self, quant: str, tensors: list[TensorDesc], shape: ModelShape, has_imatrix: bool = False):
        self.quant, self.shape, self.has_imatrix = quant, shape, has_imatrix
        self.tied = not any(t.name == "output.weight" for t in tensors)
        self.n_attention_wv = sum(_is_attn_v(t.name) for t in tensors)
        # counted as llama.cpp counts them: overridden tensors are not
        self.i_attention_wv = self.i_ffn_down = self.i_ffn_gate = self.i_ffn_up = 0

    def _layer_info(self, name: str, counter: str) -> tuple[int, int]:
        """llama.cpp's layer_info: the name's block with experts (not in order), else the category's counter."""
        i = getattr(self, counter)
        setattr(self, counter, i + 1)
        return (_layer(name) if self.shape.n_expert > 1 else i), self.shape.n_layer

    def pick(self, t: TensorDesc, new: T) -> T:  # llama_tensor_get_type_impl for the ftypes above
        q, s, name = self.quant, self.shape, t.name
        if name == "output.weight" or (self.tied and name == "token_embd.weight"):
            if t.ne0 % GGML_QUANT_SIZES[new][0] != 0:
                return T.Q8_0
            if q == "IQ3_XXS" or q in _LOW_BIT:
                return T.Q5_K
            return new if new == T.Q8_0 else T.Q6_K
        if name == "token_embd.weight":
            if q in ("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ1_M"):
                return T.Q2_K
            return T.IQ3_S if q in ("IQ3_XXS", "IQ2_S", "IQ2_M") else new
        if q in _LOW_BIT:
            return self._low_bit(t, new)
        if _is_attn_v(name):
            if q == "Q2_K":
                new = T.Q4_K if s.n_head // s.n_head_kv >= 4 else T.Q3_K
            elif q == "Q2_K_S" and s.n_head // s.n_head_kv >= 4:
                new = T.Q4_K
            elif q == "IQ3_XXS":
                new = T.Q4_K if s.n_head // s.n_head_kv >= 4 else T.IQ3_XXS if self.has_imatrix else T.IQ3_S
            elif q in ("IQ3_XS", "IQ3_S") and s.n_head // s.n_head_kv >= 4:
                new = T.Q4_K
            elif q == "IQ3_M":
                new = T.Q4_K
            elif q == "Q3_K_M":
                new = T.Q5_K if self.i_attention_wv < 2 else T.Q4_K
            elif q == "Q3_K_L":
                new = T.Q5_K
            elif q in ("Q4_K_M", "Q5_K_M") and _more_bits(self.i_attention_wv, self.n_attention_wv):
                new = T.Q6_K
            elif q in ("IQ4_NL", "IQ4_XS") and s.n_head // s.n_head_kv >= 4:
                new = T.Q5_K
            elif q == "Q4_K_S" and self.i_attention_wv < 4:
                new = T.Q5_K
            if s.is_70b and new in (T.Q3_K, T.Q4_K):
                new = T.Q5_K
            if s.n_expert == 8:
                new = T.Q8_0
            self.i_attention_wv += 1
        elif "attn_k.weight" in name:
            if s.n_expert == 8:
                new = T.Q8_0
            elif q in ("IQ3_XS", "IQ3_XXS"):
                new = T.IQ3_XXS if q == "IQ3_XS" else T.IQ2_S
        elif "attn_q.weight" in name:
            if q in ("IQ3_XS", "IQ3_XXS"):
                new = T.IQ3_XXS if q == "IQ3_XS" else T.IQ2_S
        elif "attn_output.weight" in name:
            if s.n_expert == 8:
                new = T.Q5_K if q in ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M", "IQ4_NL", "IQ4_XS", "IQ3_XS",
                                      "IQ3_XXS", "IQ3_S", "IQ3_M") else new
            else:
                new = {"Q2_K": T.Q3_K, "IQ3_XXS": T.IQ3_S, "Q3_K_M": T.Q4_K, "Q3_K_L": T.Q5_K,
                       "IQ3_M": T.Q4_K}.get(q, new)
        elif "ffn_up" in name or "ffn_gate" in name:
            i, n = self._layer_info(name, "i_ffn_up" if "ffn_up" in name else "i_ffn_gate")
            if q == "IQ3_XS" and n // 8 <= i < 7 * n // 8:
                new = T.IQ3_XXS
        elif "ffn_down" in name:
            i, n = self._layer_info(name, "i_ffn_down")
            if q == "Q2_K":
                new = T.Q3_K
            elif q == "Q2_K_S":
                if i < n // 8:
                    new = T.Q4_K
            elif q == "IQ3_XXS" and not self.has_imatrix:
                new = T.Q4_K if i < n // 8 else T.Q3_K
            elif q == "Q3_K_M":
                new = T.Q5_K if i < n // 16 else T.Q4_K
            elif q == "IQ3_M" and (i < n // 8 or (s.n_expert == 8 and _more_bits(i, n))):
                new = T.Q4_K
            elif q == "Q3_K_L":
                new = T.Q5_K
            elif q in ("Q4_K_M", "Q5_K_M") and _more_bits(i, n):
                new = T.Q6_K
            elif q in ("IQ4_NL", "IQ4_XS") and not self.has_imatrix and i < n // 8:
                new = T.Q5_K
            elif q == "Q4_K_S" and i < n // 8:
                new = T.Q5_K
            elif q in ("Q4_0", "Q5_0") and self.has_imatrix and i < n // 8:   # guards the first ffn_down layers
                new = T.Q4_1 if q == "Q4_0" else T.Q5_1
        return new


    def _low_bit(self, t: TensorDesc, new: T) -> T:
        """The very-low-bit branch (IQ2_*, IQ1_*): C counts ffn_down by tensor here, experts or not."""
        q, s, name = self.quant, self.shape, t.name
        s_or_m = q in ("IQ2_S", "IQ2_M")
        if _is_attn_v(name):
            if s.n_head // s.n_head_kv >= 4 or s.n_expert >= 4:
                new = T.Q4_K
            else:
                new = T.IQ3_S if s_or_m else T.Q2_K
            self.i_attention_wv += 1
        elif s.n_expert == 8 and "attn_k.weight" in name:
            new = T.Q4_K
        elif "ffn_down" in name:
            if self.i_ffn_down < s.n_layer // 8:
                new = T.IQ3_S if s_or_m else T.Q2_K
            self.i_ffn_down += 1
        elif "attn_output.weight" in name:
            if s.n_expert == 8:
                new = T.Q5_K
            elif q in ("IQ1_S", "IQ1_M"):
                new = T.IQ2_XXS
            elif s_or_m:
                new = T.IQ3_S
        return new


def tensor_types(tensors: list[TensorDesc], quant: str | QuantSpec, shape: ModelShape,
                 has_imatrix: bool = False) -> list[T]:
    """The type of each tensor (in file order) for ``quant`` (``has_imatrix``: made with an importance matrix);
    tensors llama.cpp does not quantize stay F32. As llama_tensor_get_type: the embedding and output types apply as
    given; a quantized base's tensors take the first matching pattern, else (unless ``pure``) the mix's rule, then the
    fallback for widths the type cannot take."""
    spec = quant if isinstance(quant, QuantSpec) else QuantSpec(quant, quant)
    default = DEFAULT_TYPE[spec.base]
    mix = _Mix(spec.base, tensors, shape, has_imatrix)
    patterns = [(re.compile(p), T[q]) for p, q in spec.tensor_types]
    out = []
    for t in tensors:
        if not allows_quantization(t):
            out.append(T.F32)
        elif spec.embedding_type and t.name == "token_embd.weight":
            out.append(T[spec.embedding_type])
        elif spec.output_type and t.name == "output.weight":
            out.append(T[spec.output_type])
        elif default in UNQUANTIZED:
            out.append(default)
        else:
            new = next((q for rx, q in patterns if rx.search(t.name)), None)
            if new is None and spec.pure:
                new = default
            elif new is None and spec.output_type and mix.tied and t.name == "token_embd.weight":
                new = T[spec.output_type]   # the mix's rule for a tied embedding: the output type
            elif new is None:
                new = mix.pick(t, default)
            out.append(_fallback(t, new))
    return out
