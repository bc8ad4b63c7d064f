"""Stop tokens and sampling defaults of a GGUF file, from one source of truth: the model folder.

llama.cpp has no key listing end-of-generation ids. ``llama_vocab::impl::load`` (src/llama-vocab.cpp of the vendored
llama.cpp) builds its EOG set from the token texts it knows (``<|im_end|>``, ``<|eot_id|>``, ``<|endoftext|>``, ...)
plus ``tokenizer.ggml.eos_token_id``, ``eot_token_id`` and ``eom_token_id``, then drops ``<|end|>`` (gpt-oss) or
``</s>`` (Gemma 4, PLaMo) in two special cases. :func:`llama_eog_ids` is that rule; :func:`extra_eog` gives every
id the folder declares as a stop (``generation_config.json``'s ``eos_token_id`` list, ``config.json``'s, the
tokenizer's eos) that the rule would miss a slot (eot, then eom) so llama.cpp stops on it too.

:func:`sampling_values` is the ``general.sampling.*`` keys llama.cpp's ``convert_hf_to_gguf.py`` (the vendored
gguf-py's ``Metadata.load``) writes from ``generation_config.json``: only what the folder states, with
``repetition_penalty`` as ``penalty_repeat``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from gguf import GGUFValueType as V, Keys

# Token texts llama.cpp makes end-of-generation whatever the keys say (llama-vocab.cpp, llama-cpp-python 0.3.36).
LLAMA_EOG_TEXTS = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>", "<end_of_turn>",
    "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]", "<|end_of_text|>",
    "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>", "<\uff5cend\u2581of\u2581sentence\uff5c>", "[e~[",
})

EOG_KEYS = {"eos": Keys.Tokenizer.EOS_ID, "eot": Keys.Tokenizer.EOT_ID, "eom": Keys.Tokenizer.EOM_ID}

# generation_config.json key -> (GGUF key, value type), in the order gguf-py's Metadata writes them
SAMPLING = (
    ("sequence", Keys.General.SAMPLING_SEQUENCE, V.STRING),
    ("top_k", Keys.General.SAMPLING_TOP_K, V.INT32),
    ("top_p", Keys.General.SAMPLING_TOP_P, V.FLOAT32),
    ("min_p", Keys.General.SAMPLING_MIN_P, V.FLOAT32),
    ("xtc_probability", Keys.General.SAMPLING_XTC_PROBABILITY, V.FLOAT32),
    ("xtc_threshold", Keys.General.SAMPLING_XTC_THRESHOLD, V.FLOAT32),
    ("temperature", Keys.General.SAMPLING_TEMP, V.FLOAT32),
    ("penalty_last_n", Keys.General.SAMPLING_PENALTY_LAST_N, V.INT32),
    ("penalty_repeat", Keys.General.SAMPLING_PENALTY_REPEAT, V.FLOAT32),
    ("mirostat", Keys.General.SAMPLING_MIROSTAT, V.INT32),
    ("mirostat_tau", Keys.General.SAMPLING_MIROSTAT_TAU, V.FLOAT32),
    ("mirostat_eta", Keys.General.SAMPLING_MIROSTAT_ETA, V.FLOAT32),
)
SAMPLING_PREFIX = "general.sampling."


def _ids(value) -> list[int]:
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, int) and not isinstance(v, bool) and v >= 0]


def _read(path: Path) -> dict:
    """A JSON file as llama.cpp's converter reads it: missing or invalid means empty."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def generation_config(folder: str | Path) -> dict:
    return _read(Path(folder) / "generation_config.json")


def declared_stop_ids(folder: str | Path, eos_id: int | None = None) -> list[int]:
    """Every id the folder says ends generation: ``generation_config.json``'s ``eos_token_id`` (an id or a list),
    ``config.json``'s, and the tokenizer's eos (``eos_id``), in that order without repeats."""
    folder = Path(folder)
    ids = _ids(generation_config(folder).get("eos_token_id"))
    ids += _ids(_read(folder / "config.json").get("eos_token_id"))
    ids += _ids(eos_id)
    return list(dict.fromkeys(ids))


def llama_eog_ids(tokens: list[str], special: dict[str, int | None]) -> set[int]:
    """The ids llama.cpp (the vendored llama-vocab.cpp) treats as end of generation for a vocabulary ``tokens`` with
    the ``special`` ids eos/eot/eom (None: the key is absent). FIM pad/repo/sep tokens, which llama.cpp also adds when
    it recognises them, are left out: the set is what a release can count on."""
    n = len(tokens)
    eog = {i for i, t in enumerate(tokens) if t in LLAMA_EOG_TEXTS}
    eog |= {i for k in ("eos", "eot", "eom") if (i := special.get(k)) is not None and 0 <= i < n}
    texts = {tokens[i]: i for i in eog}
    if "<|end|>" in texts and (("<|return|>" in texts and ("<|call|>" in texts or "<|calls|>" in texts))
                               or (("<|call|>" in texts or "<|calls|>" in texts) and "<|flush|>" in texts)):
        eog.discard(texts["<|end|>"])
    if "</s>" in texts and ("<|tool_response>" in texts or "<|plamo:eos|>" in texts):
        eog.discard(texts["</s>"])
    return eog


def extra_eog(tokens: list[str], special: dict[str, int | None], wanted: list[int]) -> tuple[dict[str, int], list[int]]:
    """The eot/eom ids to set so that every id of ``wanted`` is end-of-generation in llama.cpp, and the ids no slot
    is left for (reported by the caller; llama.cpp has three slots besides the token texts it knows)."""
    special = dict(special)
    added, left = {}, []
    for i in wanted:
        if not 0 <= i < len(tokens) or i in llama_eog_ids(tokens, special):
            continue
        slot = next((k for k in ("eot", "eom") if special.get(k) is None), None)
        if slot is None:
            left.append(i)
            continue
        special[slot] = added[slot] = i
    return added, left


def sampling_values(folder: str | Path) -> dict[str, tuple[object, V]]:
    """GGUF key -> (value, type) of the ``general.sampling.*`` keys ``generation_config.json`` states, as llama.cpp's
    converter writes them (values of the wrong JSON type are left out rather than written wrong)."""
    gen = generation_config(folder)
    if "penalty_repeat" not in gen and "repetition_penalty" in gen:
        gen = dict(gen, penalty_repeat=gen["repetition_penalty"])
    out = {}
    for name, key, vtype in SAMPLING:
        value = gen.get(name)
        if value is None or isinstance(value, bool):
            continue
        if vtype is V.STRING and isinstance(value, str):
            out[key] = (value, vtype)
        elif vtype is V.INT32 and isinstance(value, int):
            out[key] = (value, vtype)
        elif vtype is V.FLOAT32 and isinstance(value, (int, float)):
            out[key] = (float(np.float32(value)), vtype)   # as stored: a rewrite compares equal
    return out
