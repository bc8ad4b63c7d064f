"""llama.cpp's CPU arithmetic emulated on a torch model, so that the quality figures of a GGUF file are those of the
runtime its users run (llama.cpp's ggml-cpu, x86 AVX2/AVX-512 kernels; ``llama-perplexity`` with its default settings):

- every matrix product quantizes its input rows to the dot-product format of the weight's type (ggml-cpu's
  ``vec_dot_type``) before multiplying: Q8_K blocks of 256 for the K-quants, the I-quants and the ternary types, Q8_0
  blocks of 32 for Q4_0, Q5_0, Q8_0, IQ4_NL and MXFP4 (Q8_1 for Q4_1 and Q5_1: the same values), float16 for F16
  weights, bfloat16 for BF16 weights, none for F32. Each linear's input is replaced by its quantized-then-dequantized
  value: the product of two dequantized operands is the kernels' integer dot product times their scales, up to float
  summation order;
- attention (flash attention, "auto" and so on for CPU, llama-perplexity's and llama-server's default) takes keys and
  values as float16 whatever the KV cache type (llama-graph casts an F32 cache to F16 for it): keys after RoPE and
  values are rounded to float16; queries, scores and the weighted sum stay float32 (ggml-cpu's tiled kernel).

The unquantized model is run with the same KV cache and F32 weights (``llama-perplexity --kl-divergence-base`` on an
F32 GGUF): no activation is quantized. The figures then agree with ``llama-perplexity --kl-divergence`` on the same
windows (tests/test_quality_llamacpp_agreement.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

# ggml weight type -> the format ggml-cpu quantizes a matrix product's other operand to (type_traits_cpu[type]
# .vec_dot_type in ggml-cpu.c); "f32": used as is
ACTIVATIONS: dict[str, str] = {
    "F32": "f32", "F16": "f16", "BF16": "bf16",
    "Q4_0": "q8_0", "Q5_0": "q8_0", "Q8_0": "q8_0", "IQ4_NL": "q8_0", "MXFP4": "q8_0",
    "Q4_1": "q8_0", "Q5_1": "q8_0",   # Q8_1: the Q8_0 values plus their sum (the dot products' min term)
    "Q2_K": "q8_k", "Q3_K": "q8_k", "Q4_K": "q8_k", "Q5_K": "q8_k", "Q6_K": "q8_k",
    "IQ2_XXS": "q8_k", "IQ2_XS": "q8_k", "IQ2_S": "q8_k", "IQ3_XXS": "q8_k", "IQ3_S": "q8_k", "IQ1_S": "q8_k",
    "IQ1_M": "q8_k", "IQ4_XS": "q8_k", "TQ1_0": "q8_k", "TQ2_0": "q8_k",
}
BLOCK = {"q8_0": 32, "q8_k": 256}


def activation_format(ggml_type: str) -> str:
    """The format ggml-cpu quantizes activations to before multiplying them with a weight of ``ggml_type``."""
    try:
        return ACTIVATIONS[ggml_type]
    except KeyError:
        from ..errors import ModelError

        raise ModelError(f"no llama.cpp CPU dot product known for weights of type {ggml_type}; measure the file with "
                         "numerics float32") from None


def _div(a: float, b: torch.Tensor) -> torch.Tensor:
    """a / b rounded once, as C's float division (torch computes ``a / tensor`` as ``a * (1 / tensor)``)."""
    return torch.full_like(b, a).div_(b)


def _blocks(x: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` as blocks of ``size`` values and each block's largest magnitude (exact)."""
    blocks = x.reshape(*x.shape[:-1], -1, size)
    low, high = torch.aminmax(blocks, dim=-1, keepdim=True)   # one pass: faster than abs().amax()
    return blocks, torch.maximum(high, low.neg_())


def quantize_q8_0(x: torch.Tensor) -> torch.Tensor:
    """``x`` [..., n] (float32, n a multiple of 32) through ggml's ``quantize_row_q8_0`` (the AVX path) and back:
    per block of 32, d = max|x| / 127 stored as float16, q = round-half-even(x * (127 / max|x|))."""
    blocks, amax = _blocks(x, 32)
    inv = torch.where(amax != 0, _div(127.0, amax), 0.0)
    d = (amax / 127.0).to(torch.float16).to(torch.float32)
    return torch.mul(blocks, inv).round_().mul_(d).reshape(x.shape)


def quantize_q8_k(x: torch.Tensor) -> torch.Tensor:
    """``x`` [..., n] (float32, n a multiple of 256) through ggml's ``quantize_row_q8_K_ref`` and back: per block of
    256, with m the value of largest magnitude, iscale = -127 / m, q = min(127, round-half-even(iscale * x)), d = 1 /
    iscale (float32). Round-half-even is odd-symmetric, so q * d is the same for m and -m: m = max|x| here."""
    blocks, amax = _blocks(x, 256)
    zero = amax == 0
    iscale = torch.where(zero, 0.0, _div(127.0, torch.where(zero, 1.0, amax)))
    d = torch.where(zero, 0.0, _div(1.0, torch.where(zero, 1.0, iscale)))
    return torch.mul(blocks, iscale).round_().mul_(d).reshape(x.shape)


def quantize(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """``x`` (float32) as a matrix product of ggml-cpu sees it when the weight wants activations in ``fmt``."""
    if fmt == "f32":
        return x
    if fmt == "f16":
        return x.to(torch.float16).to(x.dtype)
    if fmt == "bf16":
        return x.to(torch.bfloat16).to(x.dtype)
    if x.shape[-1] % BLOCK[fmt]:
        raise ValueError(f"rows of {x.shape[-1]} values do not split into {fmt} blocks of {BLOCK[fmt]}")
    return quantize_q8_0(x) if fmt == "q8_0" else quantize_q8_k(x)


def _f16_kv_cache(model) -> None:
    """Round every layer's keys (after RoPE) and values to float16 before attention. While the model (or its decoder,
    which the quality stage calls directly) runs, the attention function its layers look up under their
    ``_attn_implementation`` ("sdpa", "eager", ...) is that function with float16 keys and values; the name, and so
    the masks transformers builds for it (sliding windows included), stays the same."""
    import sys

    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    impl = model.config._attn_implementation or "eager"
    local = ALL_ATTENTION_FUNCTIONS._local_mapping
    depth = [0, None]

    def attention(module, query, key, value, *args, **kwargs):
        inner = depth[1]
        if inner is None:   # eager: the modeling file's own function (softcapping and all)
            inner = sys.modules[type(module).__module__].eager_attention_forward
        return inner(module, query, key.to(torch.float16).to(key.dtype), value.to(torch.float16).to(value.dtype),
                     *args, **kwargs)

    def enter(module, args):
        depth[0] += 1
        if depth[0] == 1:
            depth[1] = local.get(impl) or ALL_ATTENTION_FUNCTIONS._global_mapping.get(impl)
            saved[0] = (impl in local, local.get(impl))
            local[impl] = attention

    def leave(module, args, output):
        depth[0] -= 1
        if depth[0] == 0:
            had, previous = saved[0]
            if had:
                local[impl] = previous
            else:
                local.pop(impl, None)

    saved = [None]
    for module in {id(m): m for m in (model, model.get_decoder())}.values():
        module.register_forward_pre_hook(enter)
        module.register_forward_hook(leave, always_call=True)


def emulate(model, weight_types: Mapping[str, str], kv_cache: str = "f16") -> None:
    """Make ``model`` (a transformers causal LM) compute as llama.cpp's CPU backend does: each matrix product's input
    quantized to the activation format of its weight's ggml type (``weight_types``: parameter name -> ggml type name,
    "A+B" for a fused tensor of two differently typed halves; a weight missing there is F32, the lm_head of a tied model
    takes the embedding's type) and, with ``kv_cache="f16"``, keys and values rounded to float16. The products are the
    ``nn.Linear`` modules' and, in a mixture of experts, those of the stacked expert tensors (3-D parameters)."""
    output = model.get_output_embeddings()
    tied = output is not None and output.weight is model.get_input_embeddings().weight
    embedding = next((n for n, p in model.named_parameters() if p is model.get_input_embeddings().weight), None)
    last = _Last()
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, torch.nn.Linear):
            key = f"{prefix}weight"
            if key not in weight_types and tied and module is output and embedding:
                key = embedding
            formats = _formats(weight_types.get(key, "F32"))
            if formats != ("f32",):
                module.register_forward_pre_hook(_quantizing(formats, last))
            continue
        stacked = {p: _formats(weight_types[prefix + p]) for p, param in module.named_parameters(recurse=False)
                   if param.dim() == 3 and prefix + p in weight_types}
        if any(f != ("f32",) for f in stacked.values()):
            _quantize_experts(module, stacked)
    model.register_forward_hook(lambda *a: last.entries.clear(), always_call=True)   # hold no activations after
    if model.get_decoder() is not model:
        model.get_decoder().register_forward_hook(lambda *a: last.entries.clear(), always_call=True)
    if kv_cache == "f16":
        _f16_kv_cache(model)
    elif kv_cache != "f32":
        raise ValueError(f"unknown KV cache type {kv_cache!r}; use 'f16' or 'f32'")


def _formats(ggml_type: str) -> tuple[str, ...]:
    return tuple(activation_format(t) for t in ggml_type.split("+"))


def _product(x: torch.Tensor, weight: torch.Tensor, bias, formats: tuple[str, ...]) -> torch.Tensor:
    """``F.linear`` with ``x`` quantized per part of ``weight``'s rows (one part per format)."""
    if len(set(formats)) == 1:
        return torch.nn.functional.linear(quantize(x, formats[0]), weight, bias)
    parts = weight.chunk(len(formats), dim=0)
    biases = bias.chunk(len(formats)) if bias is not None else [None] * len(formats)
    return torch.cat([torch.nn.functional.linear(quantize(x, f), w, b) for f, w, b in zip(formats, parts, biases)],
                     dim=-1)


class _Last:
    """The last input quantized to each format, and the result: q, k and v (gate and up) take the same input tensor,
    quantized once for all of them."""

    def __init__(self):
        self.entries: dict[str, tuple] = {}

    def __call__(self, x: torch.Tensor, fmt: str) -> torch.Tensor:
        got = self.entries.get(fmt)
        if got is not None and got[0] is x and got[1] == x._version:
            return got[2]
        out = quantize(x, fmt)
        self.entries[fmt] = (x, x._version, out)
        return out


def _quantizing(formats: tuple[str, ...], last: _Last) -> Callable:
    if len(set(formats)) == 1:
        def hook(module, args):
            return (last(args[0], formats[0]), *args[1:])

        return hook

    def forward(module, args, output):
        return _product(args[0], module.weight, module.bias, formats)

    return forward


def _quantize_experts(module, stacked: dict[str, tuple[str, ...]]) -> None:
    """A mixture-of-experts module whose (eager) forward multiplies by slices of its 3-D parameters (``F.linear(x,
    self.gate_up_proj[e])``, transformers' expert modules): while it runs, ``F.linear`` quantizes its input when the
    weight is a slice of one of them."""
    linear = torch.nn.functional.linear
    params = {name: getattr(module, name) for name in stacked}
    # transformers dispatches an experts module to a batched kernel (config._experts_implementation); the eager loop
    # it wraps is the one that multiplies by F.linear
    forward = getattr(type(module).forward, "__wrapped__", type(module).forward).__get__(module)

    def quantized_linear(x, weight, bias=None):
        storage = weight.untyped_storage().data_ptr()
        for name, param in params.items():
            if param.untyped_storage().data_ptr() == storage:
                return _restored(_product, x, weight, bias, stacked[name])
        return linear(x, weight, bias)

    def _restored(fn, *args):
        torch.nn.functional.linear = linear
        try:
            return fn(*args)
        finally:
            torch.nn.functional.linear = quantized_linear

    def run(*args, **kwargs):
        torch.nn.functional.linear = quantized_linear
        try:
            return forward(*args, **kwargs)
        finally:
            torch.nn.functional.linear = linear

    module.forward = run
