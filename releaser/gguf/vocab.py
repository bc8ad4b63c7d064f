"""Tokenizer metadata for GGUF: BPE ("gpt2", pre-tokenizer chosen by llama.cpp's hash check) and SentencePiece-style
byte-fallback BPE ("llama") vocabularies, special token ids, add_bos/add_eos and the chat template (gguf-py vocab
helpers plus transformers' AutoTokenizer, as ``convert_hf_to_gguf.py`` does)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import gguf

from ..errors import ConfigError, ModelError
from .pretok import CHKTXT, PRE_TOKENIZERS

# Tokens that end a chat turn; when the tokenizer's eos is one of them it is also written as eot.
END_OF_TURN = {"<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|eot|>", "<|end_of_turn|>", "<|return|>"}


@dataclass
class TokenizerInfo:
    model: str                  # "gpt2" or "llama"
    pre: str                    # tokenizer.ggml.pre
    n_tokens: int
    bos: str | None
    eos: str | None
    chat_template: bool


def _auto_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except Exception as exc:  # transformers raises many types for unreadable tokenizers
        raise ModelError(f"cannot load the tokenizer of {folder} ({type(exc).__name__}: {exc}); "
                         "save it with tokenizer.save_pretrained() or run the tokenizer doctor") from exc


def pre_tokenizer(tokenizer) -> str:
    """llama.cpp's name for the tokenizer's BPE pre-tokenizer; an unknown one raises ModelError naming the hash."""
    chkhsh = hashlib.sha256(str(tokenizer.encode(CHKTXT)).encode()).hexdigest()
    if chkhsh not in PRE_TOKENIZERS:
        raise ModelError(f"unknown BPE pre-tokenizer (llama.cpp chkhsh {chkhsh}); llama.cpp cannot tokenize this "
                         "model correctly: use the base model's unmodified tokenizer files, or name the llama.cpp "
                         "pre-tokenizer it matches with --pre-tokenizer NAME (e.g. llama-bpe, qwen2, smollm)")
    return PRE_TOKENIZERS[chkhsh]


def _gpt2_tokens(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens and token types like ``get_vocab_base`` in convert_hf_to_gguf.py."""
    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        token = reverse.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        if token in added:
            if not decoder[i].normalized:
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            if decoder[i].special or (token.startswith("<|") and token.endswith("|>")):
                types.append(gguf.TokenType.CONTROL)
            else:
                token = token.replace("\u2581", " ")
                types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    return tokens, types


def _adds(tokenizer) -> tuple[bool, bool]:
    """Whether the HF tokenizer adds bos / eos when encoding with special tokens."""
    with_special = tokenizer.encode("Hello world")
    plain = tokenizer.encode("Hello world", add_special_tokens=False)
    add_bos = len(with_special) > len(plain) and with_special[0] == tokenizer.bos_token_id
    add_eos = len(with_special) > len(plain) and with_special[-1] == tokenizer.eos_token_id
    return bool(add_bos), bool(add_eos)


def add_tokenizer(w: gguf.GGUFWriter, folder: Path, config: dict, pre: str | None = None) -> TokenizerInfo:
    """Write the ``tokenizer.*`` keys of ``folder`` to ``w``; raises ModelError before anything is written.

    ``pre`` overrides the detected BPE pre-tokenizer (one of llama.cpp's names, e.g. ``llama-bpe``, ``qwen2``)."""
    known = sorted(set(PRE_TOKENIZERS.values()))
    if pre is not None and pre not in known:
        raise ConfigError(f"unknown pre-tokenizer {pre!r}; llama.cpp names: {', '.join(known)}")
    folder = Path(folder)
    if not (folder / "tokenizer.json").is_file():
        raise ModelError(f"{folder} has no tokenizer.json; the GGUF export needs a fast tokenizer "
                         "(save it with AutoTokenizer(...).save_pretrained or copy it from the base model)")
    tokenizer = _auto_tokenizer(folder)
    vocab_size = config.get("vocab_size") or len(tokenizer.get_vocab())
    try:
        spm = gguf.LlamaHfVocab(folder)
    except (FileNotFoundError, TypeError):
        spm = None
    if spm is not None:
        tokens, scores, types = zip(*spm.all_tokens())
        model, pre = "llama", "default"
        w.add_tokenizer_model(model)
        w.add_tokenizer_pre(pre)
        w.add_token_list(list(tokens))
        w.add_token_scores(list(scores))
        w.add_token_types(list(types))
    else:
        if json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["model"]["type"] != "BPE":
            raise ModelError(f"the tokenizer of {folder} is not BPE; the GGUF export supports BPE (gpt2) and "
                             "byte-fallback BPE (llama) tokenizers")
        model, pre = "gpt2", pre or pre_tokenizer(tokenizer)
        tokens, types = _gpt2_tokens(tokenizer, vocab_size)
        w.add_tokenizer_model(model)
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=model == "gpt2", n_vocab=len(tokens))
    if model == "gpt2" and not special.merges:
        raise ModelError(f"{folder}/tokenizer.json has no BPE merges; llama.cpp cannot load a gpt2 vocab without them")
    special.add_special_token["bos"], special.add_special_token["eos"] = _adds(tokenizer)
    eos = tokenizer.eos_token
    if eos in END_OF_TURN and tokenizer.eos_token_id is not None:
        special.special_token_ids["eot"] = tokenizer.eos_token_id
    special.add_to_gguf(w, quiet=True)
    return TokenizerInfo(model, pre, len(tokens), tokenizer.bos_token, eos, special.chat_template is not None)
