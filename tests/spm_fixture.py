"""A Gemma-style SentencePiece tokenizer trained in the test (the ``sentencepiece`` package): ``tokenizer.model``
plus the transformers files a Gemma 2 release ships (tokenizer.json, tokenizer_config.json) built from it by
GemmaTokenizerFast. Small (a few hundred pieces), trained on releaser's own calibration and evaluation texts, so AWQ
calibration and the quality stage tokenize real text into ids that exist."""

from __future__ import annotations

import io
import json
from pathlib import Path

from conftest import require

ROOT = Path(__file__).resolve().parents[1]
CORPORA = (ROOT / "releaser/awq/data/kjv_calibration.txt", ROOT / "releaser/quality/data/origin_of_species.txt")
# Gemma's specials: <pad> 0, <eos> 1, <bos> 2, <unk> 3, then user-defined pieces (the chat turn markers, <mask> which
# llama.cpp makes CONTROL by its look though it is not special, and a whitespace run)
SPECIALS = dict(pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
                unk_piece="<unk>")
USER_DEFINED = ["<mask>", "<start_of_turn>", "<end_of_turn>", "\u2581\u2581"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' "
    "else message['role'] %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}")


# added tokens marked special as in Gemma 2's own tokenizer_config.json; <mask> is not, and llama.cpp's converter
# makes it CONTROL by its look; the whitespace run stays a user-defined token
NOT_SPECIAL = {"<mask>", "\u2581\u2581"}


def _as_gemma2_release(folder: Path) -> None:
    """tokenizer.json and tokenizer_config.json as a Gemma 2 release has them (saved by transformers 4):
    added_tokens_decoder, add_bos_token/add_eos_token, the turn markers special; no local paths."""
    data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    for t in data["added_tokens"]:
        t["special"] = t["content"] not in NOT_SPECIAL
    (folder / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")
    cfg = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    for key in ("vocab_file", "is_local", "local_files_only", "extra_special_tokens"):
        cfg.pop(key, None)
    cfg |= {"add_bos_token": True, "add_eos_token": False, "added_tokens_decoder": {
        str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in data["added_tokens"]}}
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False, indent=2), encoding="utf-8")


def train_gemma_spm(folder: Path, vocab: int = 768) -> int:
    """Write tokenizer.model, tokenizer.json and tokenizer_config.json (with a Gemma chat template) to ``folder``;
    returns the vocabulary size (the number of SentencePiece pieces, what the model's config must say)."""
    spm = require("sentencepiece")
    from transformers import AutoTokenizer, GemmaTokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = [line.strip() for path in CORPORA for line in path.read_text(encoding="utf-8").splitlines()
             if line.strip()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab, model_type="bpe", byte_fallback=True,
        split_digits=True, add_dummy_prefix=False, remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        normalization_rule_name="identity", user_defined_symbols=USER_DEFINED, character_coverage=1.0,
        num_threads=1, minloglevel=2, **SPECIALS)
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    # transformers converts the SentencePiece model (its SentencePieceExtractor) when the folder has no tokenizer.json
    tok = GemmaTokenizerFast.from_pretrained(folder, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                             unk_token="<unk>", add_bos_token=True, add_eos_token=False)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(folder)
    _as_gemma2_release(folder)
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 2, "eos_token_id": 1,
                                                               "pad_token_id": 0}, indent=2))
    processor = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    tok = AutoTokenizer.from_pretrained(folder)
    assert len(tok) == processor.vocab_size(), (len(tok), processor.vocab_size())
    assert tok.tokenize("<start_of_turn>user") == ["<start_of_turn>", *tok.tokenize("user")]
    return processor.vocab_size()
