"""Issue 18 item 9: `awq` on a config.json that lacks or misstates a size field, and `awq-eval` on a pair that is not
one model, end in one line (exit 2) before any work, never in a crash report (exit 70)."""

from __future__ import annotations

import json
import shutil

import pytest
from safety_helpers import one_line_error, run

from releaser.checkpoint import CheckpointReader, architecture_for
from releaser.checkpoint.config import check_sizes
from releaser.errors import ModelError
from releaser_testing import tiny_awq, tiny_model, tiny_tokenizer


def _model(path, **kw):
    tiny_tokenizer(tiny_model(path, **kw), vocab=kw.get("vocab", 256))
    return path


def _edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return _model(tmp_path_factory.mktemp("m") / "model")


@pytest.fixture(scope="module")
def awq(tmp_path_factory):
    return tiny_awq(tmp_path_factory.mktemp("a") / "awq")


CONFIG_FAULTS = [
    ({"num_hidden_layers": None}, "has no num_hidden_layers"),
    ({"hidden_size": None}, "has no hidden_size"),
    ({"intermediate_size": None}, "has no intermediate_size"),
    ({"num_attention_heads": None}, "has no num_attention_heads"),
    ({"hidden_size": "abc"}, "hidden_size is 'abc', not a positive whole number"),
    ({"num_hidden_layers": 0}, "num_hidden_layers is 0, not a positive whole number"),
    ({"num_key_value_heads": True}, "num_key_value_heads is True, not a positive whole number"),
    ({"num_hidden_layers": 2}, "says num_hidden_layers 2 but the weights hold layers 0-3 (4)"),
    ({"num_hidden_layers": 6}, "says num_hidden_layers 6 but the weights hold layers 0-3 (4)"),
    ({"hidden_size": 128}, "says hidden_size 128 but model.embed_tokens.weight is 64 wide"),
    ({"intermediate_size": 64}, "says intermediate_size 64 but model.layers.0.mlp.down_proj.weight is 128 wide"),
]


@pytest.mark.parametrize("changes,words", CONFIG_FAULTS, ids=[w.split(" but")[0] for _, w in CONFIG_FAULTS])
def test_awq_config_faults_are_one_line(model, tmp_path, changes, words):
    folder = _edit_config(shutil.copytree(model, tmp_path / "broken"), **changes)
    code, output = run("awq", folder, "-o", tmp_path / "out", "-q")
    line = one_line_error(output)
    assert code == 2 and words in line and "config.json" in line and "restore it" in line
    assert not (tmp_path / "out").exists()


def test_a_complete_config_passes(model):
    with CheckpointReader(model) as reader:
        sizes = check_sizes(reader, architecture_for(reader.config))
    assert sizes["num_hidden_layers"] == 4 and sizes["hidden_size"] == 64
    with pytest.raises(ModelError, match="has no hidden_size"), CheckpointReader(model) as reader:
        reader.config = {k: v for k, v in reader.config.items() if k != "hidden_size"}
        check_sizes(reader, architecture_for(reader.config))


@pytest.mark.parametrize("kw,words", [
    (dict(hidden=128, intermediate=256), "(hidden_size 128 vs 64)"),
    (dict(layers=6), "(num_hidden_layers 6 vs 4)"),
    (dict(vocab=300), "(vocab_size 300 vs 256)"),
    (dict(arch="qwen2"), "(architectures ['Qwen2ForCausalLM'] vs ['LlamaForCausalLM'])"),
], ids=["hidden", "layers", "vocab", "architecture"])
def test_awq_eval_on_another_model_is_one_line(awq, tmp_path, kw, words):
    other = _model(tmp_path / "other", **kw)
    code, output = run("awq-eval", other, awq)
    line = one_line_error(output)
    assert code == 2 and "are not the same model" in line and words in line and "made from" in line


def test_awq_eval_with_the_folders_swapped(awq, model):
    code, output = run("awq-eval", awq, model)
    assert code == 2 and "give the unquantized model folder first" in one_line_error(output)


def test_awq_eval_second_folder_not_awq(model):
    code, output = run("awq-eval", model, model)
    assert code == 2 and "is not an AWQ checkpoint" in one_line_error(output)


def test_awq_eval_tensor_shapes_checked_when_configs_agree(model, tmp_path):
    """An AWQ folder whose config.json was copied from the model but whose weights are another model's."""
    folder = tiny_awq(tmp_path / "awq", vocab=300)
    _edit_config(folder, vocab_size=256)
    code, output = run("awq-eval", model, folder, "--rows", "1", "--seqlen", "16")
    line = one_line_error(output)
    assert code == 2 and "embed_tokens.weight has shape (300, 64), the model needs (256, 64)" in line, line


@pytest.mark.parametrize("group_size", [None, "abc", 0])
def test_awq_eval_bad_group_size(model, awq, tmp_path, group_size):
    folder = shutil.copytree(awq, tmp_path / "awq")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["group_size"] = group_size
    (folder / "config.json").write_text(json.dumps(config))
    code, output = run("awq-eval", model, folder)
    assert code == 2 and "quantization_config.group_size is" in one_line_error(output)
