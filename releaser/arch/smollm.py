"""SmolLM3 (SmolLM3ForCausalLM): a Llama block (GGUF arch ``smollm3``; llama.cpp's converter is its LlamaModel, so
Q/K rows are permuted for ggml's RoPE and ``rope.dimension_count`` and ``vocab_size`` are written) with NoPE layers:
``no_rope_layers[i] == 0`` means layer i applies no RoPE. llama.cpp writes no key for them; it hard-codes a NoPE layer
every 4th layer (``(i + 1) % 4 == 0``), which is what transformers derives from the default
``no_rope_layer_interval`` 4. A config with any other pattern, or with ``use_sliding_window`` (llama.cpp's smollm3
has no sliding window), is refused by the GGUF export: llama.cpp would run it wrong. AWQ: Llama's scaling groups."""

from __future__ import annotations

import gguf

from ..errors import ModelError
from .base import Architecture

LLAMA_CPP_NOPE_STEP = 4   # llama.cpp: hparams.n_no_rope_layer_step, fixed for LLM_ARCH_SMOLLM3


def _smollm3_hparams(config: dict, w: gguf.GGUFWriter) -> None:
    n = config["num_hidden_layers"]
    want = [int((i + 1) % LLAMA_CPP_NOPE_STEP != 0) for i in range(n)]
    got = config.get("no_rope_layers")
    if got is None:
        interval = config.get("no_rope_layer_interval", LLAMA_CPP_NOPE_STEP)
        got = [int((i + 1) % interval != 0) for i in range(n)] if interval else want
    if [int(x) for x in got[:n]] != want or len(got) < n:
        raise ModelError(f"SmolLM3 no_rope_layers {list(got)} is not supported by the GGUF export: llama.cpp puts a "
                         f"NoPE layer every {LLAMA_CPP_NOPE_STEP}th layer ({want} for {n} layers) and reads no key")
    if config.get("use_sliding_window"):
        raise ModelError("SmolLM3 with use_sliding_window is not supported by the GGUF export (llama.cpp's smollm3 "
                         "has no sliding window)")


SMOLLM3 = Architecture("smollm3", "SmolLM3", ("SmolLM3ForCausalLM",), ("smollm3",), gguf.MODEL_ARCH.SMOLLM3,
                       transformers_prefix="SmolLM3", transformers_module="smollm3", permute_qk=True,
                       rope_dimension_count=True, vocab_size_key=True, gguf_hparams=_smollm3_hparams)

FAMILIES = [SMOLLM3]
