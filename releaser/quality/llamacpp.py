"""Optional backend: run a GGUF with llama.cpp (llama-cpp-python's low-level API) instead of dequantizing it into a
torch model, with the settings its users run (llama-perplexity's and llama-server's defaults: an F16 KV cache, flash
attention "auto", on for CPU), so the figures are those the torch backend emulates (numerics.py). Quantized decode uses
``use_extra_bufts=False`` (the CPU repack/AMX path crashes on some hosts; the repacked kernels quantize the
activations to the same values)."""

from __future__ import annotations

import ctypes
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, ModelError

_initialised = False


def available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def _llama():
    global _initialised
    try:
        import llama_cpp
    except ImportError:
        raise ConfigError("the llama.cpp backend needs llama-cpp-python: pip install llama-cpp-python==0.3.36, "
                          "or use the torch backend") from None
    if not _initialised:
        llama_cpp.llama_backend_init()
        llama_cpp.llama_log_set(_silent(llama_cpp), ctypes.c_void_p(0))
        _initialised = True
    return llama_cpp


_callback = None


def _silent(llama_cpp):
    global _callback
    if _callback is None:
        @llama_cpp.llama_log_callback
        def quiet(level, text, user_data):
            pass
        _callback = quiet
    return _callback


@contextmanager
def scored_logits(path: Path, ctx: int, first: int, rows: int = 64):
    """``run(tokens [n, ctx])``: per window, llama.cpp's logits for the GGUF ``path`` at positions first..ctx-2, in
    blocks of ``rows`` positions."""
    lc = _llama()
    params = lc.llama_model_default_params()
    params.use_extra_bufts = False
    model = lc.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise ModelError(f"llama.cpp cannot load {path}")
    n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(model))
    cparams = lc.llama_context_default_params()
    cparams.n_ctx = cparams.n_batch = cparams.n_ubatch = ctx
    cparams.n_threads = cparams.n_threads_batch = os.cpu_count() or 1
    cparams.type_k = cparams.type_v = lc.GGML_TYPE_F16
    cparams.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_AUTO
    context = lc.llama_init_from_model(model, cparams)
    if not context:
        lc.llama_model_free(model)
        raise ModelError(f"llama.cpp cannot create a context of {ctx} tokens for {path}")
    batch = lc.llama_batch_init(ctx, 0, 1)

    def window(tokens: torch.Tensor):
        ids = tokens.tolist()
        lc.llama_memory_clear(lc.llama_get_memory(context), True)
        batch.n_tokens = len(ids)
        for i, tok in enumerate(ids):
            batch.token[i] = tok
            batch.pos[i] = i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = first <= i < len(ids) - 1
        if lc.llama_decode(context, batch) != 0:
            raise ModelError(f"llama.cpp failed to evaluate {path}")
        positions = list(range(first, len(ids) - 1))
        for at in range(0, len(positions), rows):
            block = positions[at: at + rows]
            out = np.empty((len(block), n_vocab), dtype=np.float32)
            for row, i in enumerate(block):
                out[row] = np.ctypeslib.as_array(lc.llama_get_logits_ith(context, i), shape=(n_vocab,))
            yield torch.from_numpy(out)

    def run(tokens: torch.Tensor):
        for row in tokens:
            yield window(row)

    try:
        yield run
    finally:
        lc.llama_batch_free(batch)
        lc.llama_free(context)
        lc.llama_model_free(model)
