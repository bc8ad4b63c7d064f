"""llama-quantize's per-tensor type rules (``src/llama-quant.cpp``; dense Llama-family models and the 8-expert rules
of mixture-of-experts ones), with or without an importance matrix (it changes Q4_0/Q5_0's first ffn_down layers, and
Q2_K_S needs one).

``tensor_types(tensors, quant, ...)`` returns the ggml type llama.cpp's ``llama_model_quantize`` picks for every tensor
of an F32 GGUF when asked for ``quant``; the plain types (F32, F16, BF16) follow ``convert_hf_to_gguf.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T, LlamaFileType

from ..errors import ConfigError

# quant name -> the mix's default tensor type (llama_ftype_get_default_type)
DEFAULT_TYPE: dict[str, T] = {
    "F32": T.F32, "F16": T.F16, "BF16": T.BF16, "Q8_0": T.Q8_0,
    "Q4_0": T.Q4_0, "Q4_1": T.Q4_1, "Q5_0": T.Q5_0, "Q5_1": T.Q5_1,
    "Q2_K": T.Q2_K, "Q2_K_S": T.Q2_K, "Q3_K_S": T.Q3_K, "Q3_K_M": T.Q3_K, "Q3_K_L": T.Q3_K,
    "Q4_K_S": T.Q4_K, "Q4_K_M": T.Q4_K, "Q5_K_S": T.Q5_K, "Q5_K_M": T.Q5_K, "Q6_K": T.Q6_K,
}
QUANT_NAMES = list(DEFAULT_TYPE)
FALLBACK = {T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0, T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}
UNQUANTIZED = (T.F32, T.F16, T.BF16)
#: Mixes llama-quantize refuses to make without an importance matrix (tensor_requires_imatrix, for the types we have).
NEEDS_IMATRIX = ("Q2_K_S",)


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
    """llama.cpp's tensor_requires_imatrix for our types: the Q2_K tensors of a Q2_K_S file, but the token embeddings
    and the output."""
    return quant in NEEDS_IMATRIX and qtype == T.Q2_K and name not in (
        "token_embd.weight", "per_layer_token_embd.weight", "output.weight")


class _Mix:
    def __init__(self, quant: str, tensors: list[TensorDesc], shape: ModelShape, has_imatrix: bool = False):
        self.quant, self.shape, self.has_imatrix = quant, shape, has_imatrix
        self.tied = not any(t.name == "output.weight" for t in tensors)
        self.n_attention_wv = sum(_is_attn_v(t.name) for t in tensors)
        self.i_attention_wv = 0

    def pick(self, t: TensorDesc, new: T) -> T:  # llama_tensor_get_type_impl for the ftypes above
        q, s, name = self.quant, self.shape, t.name
        if name == "output.weight" or (self.tied and name == "token_embd.weight"):
            if t.ne0 % GGML_QUANT_SIZES[new][0] != 0:
                return T.Q8_0
            return new if new == T.Q8_0 else T.Q6_K
        if name == "token_embd.weight":
            return new
        if _is_attn_v(name):
            if q == "Q2_K":
                new = T.Q4_K if s.n_head // s.n_head_kv >= 4 else T.Q3_K
            elif q == "Q2_K_S" and s.n_head // s.n_head_kv >= 4:
                new = T.Q4_K
            elif q == "Q3_K_M":
                new = T.Q5_K if self.i_attention_wv < 2 else T.Q4_K
            elif q == "Q3_K_L":
                new = T.Q5_K
            elif q in ("Q4_K_M", "Q5_K_M") and _more_bits(self.i_attention_wv, self.n_attention_wv):
                new = T.Q6_K
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
        elif "ffn_down" in name:
            i, n = _layer(name), s.n_layer
            if q == "Q2_K":
                new = T.Q3_K
            elif q == "Q2_K_S":
                if i < n // 8:
                    new = T.Q4_K
            elif q == "Q3_K_M":
                new = T.Q5_K if i < n // 16 else T.Q4_K
            elif q == "Q3_K_L":
                new = T.Q5_K
            elif q in ("Q4_K_M", "Q5_K_M") and _more_bits(i, n):
                new = T.Q6_K
            elif q == "Q4_K_S" and i < n // 8:
                new = T.Q5_K
            elif q in ("Q4_0", "Q5_0") and self.has_imatrix and i < n // 8:   # guards the first ffn_down layers
                new = T.Q4_1 if q == "Q4_0" else T.Q5_1
        elif "attn_output.weight" in name:
            if s.n_expert == 8:
                new = T.Q5_K if q in ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M") else new
            else:
                new = {"Q2_K": T.Q3_K, "Q3_K_M": T.Q4_K, "Q3_K_L": T.Q5_K}.get(q, new)
        return new


def tensor_types(tensors: list[TensorDesc], quant: str, shape: ModelShape, has_imatrix: bool = False) -> list[T]:
    """The type of each tensor (in file order) for ``quant`` (``has_imatrix``: made with an importance matrix);
    tensors llama.cpp does not quantize stay F32."""
    default = DEFAULT_TYPE[quant]
    mix = _Mix(quant, tensors, shape, has_imatrix)
    out = []
    for t in tensors:
        if not allows_quantization(t) or default == T.F32:
            out.append(T.F32)
        elif default in UNQUANTIZED:
            out.append(default)
        else:
            out.append(_fallback(t, mix.pick(t, default)))
    return out
