"""Tokenizer metadata for GGUF: BPE ("gpt2", pre-tokenizer chosen by llama.cpp's hash check), SentencePiece-style
byte-fallback BPE ("llama", from tokenizer.json) and SentencePiece ("llama", from tokenizer.model, for the families
whose llama.cpp converter reads it: ``Architecture.gguf_vocab``) vocabularies, special token ids, add_bos/add_eos and
the chat template (gguf-py vocab helpers plus transformers' AutoTokenizer, as ``convert_hf_to_gguf.py`` does)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import gguf

from ..checkpoint.config import read_json
from ..errors import ConfigError, ModelError
from . import spm
from .pretok import CHKTXT, PRE_TOKENIZERS
from .stops import declared_stop_ids, extra_eog

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
    stop_ids: tuple[int, ...] = ()   # every id the folder declares as a stop (each one end-of-generation in llama.cpp)


def _auto_tokenizer(folder: Path):
    from ..tokenizer.model import load_tokenizer

    return load_tokenizer(folder, "the GGUF vocabulary")


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


def looks_special(token: str) -> bool:
    """Added tokens llama.cpp's converter makes CONTROL although they are not marked special (its
    ``does_token_look_special``: Gemma's <mask>, <unusedN>..., DeepSeek's <pad>, <|...|> and <｜...｜>)."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<\uff5c") and token.endswith("\uff5c>"))
            or (token.startswith("<unused") and token.endswith(">")))


def _json(path: Path) -> dict:
    return read_json(path, "fix or remove it")


def _spm_tokens(folder: Path, vocab_size: int) -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and types from tokenizer.model, then added_tokens.json and tokenizer_config.json's
    added_tokens_decoder, like ``_create_vocab_sentencepiece`` in convert_hf_to_gguf.py (ids past ``vocab_size``
    dropped, ids the model lacks padded as UNUSED ``[PADi]``)."""
    pieces = spm.read_pieces(folder / "tokenizer.model")
    T = gguf.TokenType
    tokens, scores, types = [f"[PAD{i}]" for i in range(vocab_size)], [-10000.0] * vocab_size, [T.UNUSED] * vocab_size
    kinds = {spm.UNKNOWN: T.UNKNOWN, spm.CONTROL: T.CONTROL, spm.UNUSED: T.UNUSED, spm.BYTE: T.BYTE}
    for i, piece in enumerate(pieces[:vocab_size]):
        tokens[i], scores[i], types[i] = piece.text, piece.score, kinds.get(piece.type, T.NORMAL)
    if (folder / "added_tokens.json").is_file():
        for token, i in _json(folder / "added_tokens.json").items():
            if isinstance(i, int) and 0 <= i < vocab_size:
                tokens[i], scores[i], types[i] = token, -1000.0, T.USER_DEFINED
    if (folder / "tokenizer_config.json").is_file():
        decoder = _json(folder / "tokenizer_config.json").get("added_tokens_decoder") or {}
        for key, data in decoder.items():
            try:
                i, token = int(key), str(data["content"])
            except (TypeError, ValueError, KeyError):
                raise ModelError(f"{folder}/tokenizer_config.json: added_tokens_decoder entry {key!r} has no id and "
                                 "content; save the tokenizer again with save_pretrained") from None
            if not 0 <= i < vocab_size:
                continue
            if data.get("special") or looks_special(token):
                types[i] = T.CONTROL
            else:
                token, types[i] = token.replace("\u2581", " "), T.USER_DEFINED
            tokens[i], scores[i] = token, -1000.0
    return tokens, scores, types


def _vocab_source(folder: Path, config: dict) -> tuple[str, bool | None]:
    """The file llama.cpp's converter reads this family's vocabulary from ("tokenizer.model" or "tokenizer.json"),
    and the add_space_prefix it writes with a SentencePiece one (None: none)."""
    from ..arch import architecture_for

    try:
        family = architecture_for(config, str(folder))
    except ModelError:   # a family releaser does not know: tokenizer.json, as before families were data
        return "tokenizer.json", None
    wanted = family.gguf_vocab
    if wanted == "tokenizer.model?":
        wanted = "tokenizer.model" if (folder / "tokenizer.model").is_file() else "tokenizer.json"
    return wanted, family.spm_add_space_prefix


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
    source, space_prefix = _vocab_source(folder, config)
    if not (folder / source).is_file():
        if source == "tokenizer.model":
            raise ModelError(f"{folder} has no tokenizer.model; llama.cpp reads this family's vocabulary from the "
                             "SentencePiece model: copy tokenizer.model from the base model")
        raise ModelError(f"{folder} has no tokenizer.json; the GGUF export needs a fast tokenizer "
                         "(save it with AutoTokenizer(...).save_pretrained or copy it from the base model)")
    tokenizer = _auto_tokenizer(folder)
    vocab_size = config.get("vocab_size") or len(tokenizer.get_vocab())
    scores = None
    if source == "tokenizer.model":
        tokens, scores, types = _spm_tokens(folder, vocab_size)
    else:
        try:
            hf_vocab = gguf.LlamaHfVocab(folder)
        except (FileNotFoundError, TypeError):
            hf_vocab = None
        if hf_vocab is not None:
            tokens, scores, types = (list(x) for x in zip(*hf_vocab.all_tokens()))
    if scores is not None:
        model, pre = "llama", "default"
    else:
        if json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["model"]["type"] != "BPE":
            raise ModelError(f"the tokenizer of {folder} is not BPE; the GGUF export supports BPE (gpt2), "
                             "byte-fallback BPE (llama) and SentencePiece (tokenizer.model) tokenizers")
        model, pre = "gpt2", pre or pre_tokenizer(tokenizer)
        tokens, types = _gpt2_tokens(tokenizer, vocab_size)
    w.add_tokenizer_model(model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    if scores is not None:
        w.add_token_scores(scores)
    w.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=model == "gpt2", n_vocab=len(tokens))
    if model == "gpt2" and not special.merges:
        raise ModelError(f"{folder}/tokenizer.json has no BPE merges; llama.cpp cannot load a gpt2 vocab without them")
    special.add_special_token["bos"], special.add_special_token["eos"] = _adds(tokenizer)
    eos = tokenizer.eos_token
    if eos in END_OF_TURN and tokenizer.eos_token_id is not None:
        special.special_token_ids["eot"] = tokenizer.eos_token_id
    stops = declared_stop_ids(folder, tokenizer.eos_token_id)
    added, left = extra_eog(tokens, {k: special.special_token_ids.get(k) for k in ("eos", "eot", "eom")}, stops)
    if left:
        raise ModelError(f"{folder} declares stop token(s) {', '.join(repr(tokens[i]) for i in left)} that llama.cpp "
                         "cannot stop on (it keeps eos, eot and eom and a fixed list of token texts, all in use): "
                         "drop them from generation_config.json's eos_token_id or set tokenizer.eos")
    special.special_token_ids.update(added)
    special.add_to_gguf(w, quiet=True)
    if source == "tokenizer.model" and space_prefix is not None:
        w.add_add_space_prefix(space_prefix)
    return TokenizerInfo(model, pre, len(tokens), tokenizer.bos_token, eos, special.chat_template is not None,
                         tuple(stops))
