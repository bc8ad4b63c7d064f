"""llama.cpp (llama-cpp-python's low-level API) as the test oracle for GGUF files: load, tokenize, logits, greedy
generation, and llama_model_quantize. Quantized decode uses ``use_extra_bufts=False`` (AMX/repack path crashes here)."""

from __future__ import annotations

import ctypes
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from conftest import require

llama_cpp = require("llama_cpp")   # the oracle: a failure in CI, not a skip
_initialised = False


@llama_cpp.llama_log_callback
def _silent(level, text, user_data):  # keep llama.cpp's log out of the test output
    pass


def _init() -> None:
    global _initialised
    if not _initialised:
        llama_cpp.llama_backend_init()
        llama_cpp.llama_log_set(_silent, ctypes.c_void_p(0))
        _initialised = True


@contextmanager
def load(path: Path, vocab_only: bool = False):
    """A llama.cpp model handle (raises AssertionError when llama.cpp refuses the file)."""
    _init()
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = vocab_only
    params.use_extra_bufts = False
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    assert model, f"llama.cpp could not load {path}"
    try:
        yield model
    finally:
        llama_cpp.llama_model_free(model)


def tokenize(model, text: str, add_special: bool = False, parse_special: bool = True) -> list[int]:
    vocab = llama_cpp.llama_model_get_vocab(model)
    data = text.encode()
    buf = (llama_cpp.llama_token * (len(data) + 16))()
    n = llama_cpp.llama_tokenize(vocab, data, len(data), buf, len(buf), add_special, parse_special)
    assert n >= 0
    return list(buf[:n])


def meta(model, key: str) -> str | None:
    buf = ctypes.create_string_buffer(1 << 16)
    n = llama_cpp.llama_model_meta_val_str(model, key.encode(), buf, len(buf))
    return buf.value.decode() if n >= 0 else None


@contextmanager
def context(model, n_ctx: int = 256):
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = n_ctx
    params.n_batch = n_ctx
    params.n_threads = params.n_threads_batch = 2
    params.type_k = params.type_v = llama_cpp.GGML_TYPE_F32  # an F16 KV cache would add its own rounding
    params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED  # the CPU flash-attention path rounds to F16
    ctx = llama_cpp.llama_init_from_model(model, params)
    assert ctx
    try:
        yield ctx
    finally:
        llama_cpp.llama_free(ctx)


def _decode(ctx, tokens: list[int]) -> None:
    arr = (llama_cpp.llama_token * len(tokens))(*tokens)
    assert llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(arr, len(tokens))) == 0


def last_logits(model, tokens: list[int]) -> np.ndarray:
    n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
    with context(model) as ctx:
        _decode(ctx, tokens)
        ptr = llama_cpp.llama_get_logits_ith(ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(n_vocab,)).copy()


def generate(model, tokens: list[int], max_new: int = 48) -> list[int]:
    """Greedy decoding; stops after an end-of-generation token (which is included)."""
    vocab = llama_cpp.llama_model_get_vocab(model)
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
    out: list[int] = []
    with context(model, 512) as ctx:
        _decode(ctx, tokens)
        for _ in range(max_new):
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))
            tok = int(np.argmax(logits))
            out.append(tok)
            if llama_cpp.llama_vocab_is_eog(vocab, tok):
                break
            _decode(ctx, [tok])
    return out


def quantize(src: Path, dst: Path, quant: str) -> None:
    """llama.cpp's llama-quantize (in process) with the default, non-imatrix mix for ``quant``."""
    _init()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quant}")
    params.nthread = 2
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) == 0


def tensors(path: Path) -> dict[str, tuple[int, bytes]]:
    """name -> (ggml type id, raw bytes) of a GGUF file (a small parser: gguf-py's reader is slow on big vocabs)."""
    import struct

    data = Path(path).read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        vals = struct.unpack_from("<" + fmt, data, pos)
        pos += struct.calcsize("<" + fmt)
        return vals if len(vals) > 1 else vals[0]

    def string() -> str:
        nonlocal pos
        n = take("Q")
        pos += n
        return data[pos - n: pos].decode()

    def skip_value(vtype: int) -> None:
        nonlocal pos
        sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
        if vtype == 8:
            string()
        elif vtype == 9:
            sub, n = take("IQ")
            for _ in range(n):
                skip_value(sub)
        else:
            pos += sizes[vtype]

    assert data[:4] == b"GGUF"
    pos = 8
    n_tensors, n_kv = take("QQ")
    alignment = 32
    for _ in range(n_kv):
        key = string()
        vtype = take("I")
        if key == "general.alignment":
            alignment = struct.unpack_from("<I", data, pos)[0]
        skip_value(vtype)
    infos = []
    for _ in range(n_tensors):
        name = string()
        n_dims = take("I")
        ne = [take("Q") for _ in range(n_dims)]
        ggml_type, offset = take("IQ")
        infos.append((name, ne, ggml_type, offset))
    start = (pos + alignment - 1) // alignment * alignment
    import gguf

    out = {}
    for name, ne, ggml_type, offset in infos:
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
        n = int(np.prod(ne)) // block * size
        out[name] = (ggml_type, data[start + offset: start + offset + n])
    return out


SDIST_VENDOR = "llama_cpp_python-0.3.36/vendor/llama.cpp"


def converter_dir() -> Path:
    """llama.cpp's own ``convert_hf_to_gguf.py`` (with its ``conversion/`` and ``gguf-py/``), vendored in the
    llama-cpp-python 0.3.36 sdist: $RELEASER_LLAMA_CPP_DIR, else the copy tests/run.sh unpacks into
    ~/.cache/releaser/llama-cpp-sdist. Missing: a failure in CI, a skip elsewhere."""
    import os

    import pytest

    candidates = [os.environ.get("RELEASER_LLAMA_CPP_DIR"),
                  os.path.join(os.path.expanduser("~"), ".cache", "releaser", "llama-cpp-sdist", SDIST_VENDOR)]
    for d in candidates:
        if d and (Path(d) / "convert_hf_to_gguf.py").is_file():
            return Path(d)
    message = ("llama.cpp's convert_hf_to_gguf.py not found: set RELEASER_LLAMA_CPP_DIR to the sdist's "
               "vendor/llama.cpp, or run tests/run.sh once (it unpacks the llama-cpp-python 0.3.36 sdist)")
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def convert_hf(model_dir: Path, outfile: Path, outtype: str = "f32") -> Path:
    """``convert_hf_to_gguf.py model_dir --outtype outtype`` with the sdist's own gguf-py (as llama.cpp runs it)."""
    import os
    import subprocess
    import sys

    script = converter_dir() / "convert_hf_to_gguf.py"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("NO_LOCAL_GGUF", None)
    proc = subprocess.run([sys.executable, str(script), str(model_dir), "--outtype", outtype, "--outfile",
                           str(outfile)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return Path(outfile)


def keys(path: Path, prefix: str) -> dict:
    """The metadata keys of a GGUF file starting with ``prefix`` (e.g. the architecture's own keys), decoded."""
    import gguf

    return {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items() if k.startswith(prefix)}
