"""Model cards for a tiny merged model, its GGUF folder and its AWQ folder: Hub metadata, card rules, golden files."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from typer.testing import CliRunner

from releaser.card import CardError, check_card, gather_facts, render_card, write_card
from releaser.card.render import human_size
from releaser.cli import app
from releaser.errors import ConfigError, ModelError
from releaser.recipe import load_recipe
from releaser_testing import tiny_awq, tiny_gguf, tiny_model, tiny_tokenizer

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("RELEASER_UPDATE_GOLDEN") == "1"  # regenerate the golden cards, then review the diff

MERGE_CONFIG = """\
merge_method: slerp
base_model: alice/tiny-a
models:
  - model: alice/tiny-a
  - model: bob/tiny-b
parameters:
  t: [0, 0.5, 1]
dtype: float32
"""


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """The three folders of a tiny release: merged model, GGUF files, AWQ checkpoint."""
    root = tmp_path_factory.mktemp("release")
    merged = tiny_tokenizer(tiny_model(root / "merged", seed=1))
    (merged / "mergekit_config.yml").write_text(MERGE_CONFIG)
    gguf = root / "gguf"
    gguf.mkdir()
    for quant in ("F16", "Q8_0", "Q4_0"):
        tiny_gguf(gguf / f"Tiny-Merge-{quant}.gguf", quant, seed=1, name="Tiny Merge")
    awq = tiny_awq(root / "awq", seed=1)
    return {"model": merged, "gguf": gguf, "awq": awq}


@pytest.fixture(scope="module")
def recipe():
    return load_recipe(GOLDEN / "card_recipe.yml")


def _sections(text: str) -> list[str]:
    return re.findall(r"(?m)^#{1,6} (.+)$", text)


EXPECTED_META = {
    "model": {"license": "apache-2.0", "language": ["en"], "library_name": "transformers",
              "pipeline_tag": "text-generation", "tags": ["merge", "mergekit", "tiny"],
              "base_model": ["alice/tiny-a", "bob/tiny-b"], "base_model_relation": "merge"},
    "gguf": {"license": "apache-2.0", "language": ["en"], "library_name": "gguf", "pipeline_tag": "text-generation",
             "tags": ["gguf", "quantized", "tiny"], "base_model": ["alice/Tiny-Merge"],
             "base_model_relation": "quantized", "quantized_by": "alice"},
    "awq": {"license": "apache-2.0", "language": ["en"], "library_name": "transformers",
            "pipeline_tag": "text-generation", "tags": ["awq", "4-bit", "quantized", "tiny"],
            "base_model": ["alice/Tiny-Merge"], "base_model_relation": "quantized", "quantized_by": "alice"},
}


@pytest.mark.parametrize("kind", ["model", "gguf", "awq"])
def test_card_metadata_and_rules(release, recipe, kind):
    text = render_card(release[kind], recipe)
    card = ModelCard(text, ignore_metadata_errors=False)
    assert card.data.to_dict() == EXPECTED_META[kind]
    assert "More Information Needed" not in text
    assert not re.search(r"\bNone\b", text)
    body = card.text
    for title in ("What's new", "Prompt format", "License", "Intended use", "Available versions"):
        assert f"## {title}\n" in body
    # a heading is followed by text, or by a deeper heading (a sub-section)
    parts = re.split(r"(?m)^(#{1,6}) .+$", body)[1:]
    for (level, text), nxt in zip(zip(parts[::2], parts[1::2]), parts[2::2] + [""]):
        assert text.strip() or len(nxt) > len(level), _sections(body)
    assert "Stop token: `<|im_end|>`" in body
    assert "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n" in body


def test_golden_cards(release, recipe):
    for kind in ("model", "gguf", "awq"):
        text = render_card(release[kind], recipe)
        golden = GOLDEN / f"card_{kind}.md"
        if UPDATE:
            golden.write_text(text)
        assert text == golden.read_text(), f"{golden} differs: rerun with RELEASER_UPDATE_GOLDEN=1 and review the diff"


def test_merge_details(release, recipe):
    text = render_card(release["model"], recipe)
    assert "[SLERP](" in text and "using [alice/tiny-a](https://huggingface.co/alice/tiny-a) as the base model" in text
    assert "- [bob/tiny-b](https://huggingface.co/bob/tiny-b)\n" in text
    assert "```yaml\n" + MERGE_CONFIG + "```" in text
    assert "| Parameters | 181K |" in text


def test_gguf_table_sizes_are_the_files_sizes(release, recipe):
    facts = gather_facts(release["gguf"])
    text = render_card(release["gguf"], recipe)
    rows = re.findall(r"(?m)^\| \[(\S+\.gguf)\]\(\S+\) \| (\w+) \| ([\d.]+ [KMG]?B) \| ([\d.]+) \| (.+) \|$", text)
    assert sorted(r[0] for r in rows) == sorted(p.name for p in release["gguf"].glob("*.gguf"))
    bits = {"F16": 16, "Q8_0": 8.5, "Q4_0": 4.5}
    for name, quant, size, bpw, _ in rows:
        actual = (release["gguf"] / name).stat().st_size
        assert size == human_size(actual)
        value, unit = size.split()
        assert abs(float(value) * {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9}[unit] - actual) <= 0.005 * actual
        assert quant == name.removeprefix("Tiny-Merge-").removesuffix(".gguf")
        # tensor bits / parameters: the block formats' nominal rate, a little more for the F32 norm vectors
        assert bits[quant] <= float(bpw) < bits[quant] + 0.2
    assert facts.recommended.quant_type == "Q8_0"
    assert "(*recommended*)" in next(r for r in rows if r[1] == "Q8_0")[4]
    assert 'PARAMETER stop "<|im_end|>"' in text and "{{ .Response }}<|im_end|>" in text


def test_awq_facts(release):
    facts = gather_facts(release["awq"])
    assert (facts.bits, facts.group_size, facts.zero_point, facts.version) == (4, 32, True, "GEMM")
    assert facts.parameters == gather_facts(release["model"]).parameters
    assert facts.calibration is None


def test_awq_calibration_is_shown(release, recipe, tmp_path):
    import shutil

    awq = shutil.copytree(release["awq"], tmp_path / "awq")
    (awq / "awq_calibration.json").write_text('{"dataset": "pileval", "samples": 128, "seq_len": 512}')
    text = render_card(awq, recipe)
    assert "| Calibration data | pileval, 128 samples of 512 tokens |" in text


def test_cards_without_recipe(release):
    for kind, title in (("model", "# merged\n"), ("gguf", "# Tiny Merge GGUF\n"), ("awq", "# awq AWQ\n")):
        text = render_card(release[kind])
        assert title in text
        data = ModelCard(text).data.to_dict()
        assert "license" not in data and "## License" not in text and "## What's new" not in text
        assert "base_model_relation" in data if kind == "model" else "base_model" not in data
    text = render_card(release["model"])   # an absolute local path is shown by its folder name: a card is published
    assert 'model_id = "' + release["model"].name + '"' in text and str(release["model"].parent) not in text


def test_user_template_undefined_variable_names_it_and_the_line(release, tmp_path):
    tpl = tmp_path / "mine.md.j2"
    tpl.write_text("---\n{{ front_matter }}\n---\n\n# {{ title }}\n\nBy {{ author_name }}.\n")
    with pytest.raises(CardError, match=r"mine\.md\.j2:7: undefined variable: 'author_name' is undefined"):
        render_card(release["model"], template=tpl)
    tpl.write_text("# {{ facts.no_such_fact }}\n")
    with pytest.raises(CardError, match=r"mine\.md\.j2:1: .*no_such_fact"):
        render_card(release["model"], template=tpl)


def test_user_template_can_reuse_the_builtin_parts(release, recipe, tmp_path):
    tpl = tmp_path / "mine.md.j2"
    tpl.write_text('{% import "_common.md.j2" as common with context %}{{ common.header() }}\n'
                   "## Parameters\n\n{{ facts.parameters | count }}\n")
    text = render_card(release["model"], recipe, template=tpl)
    assert text.endswith("# Tiny Merge\n\nA tiny SLERP merge of two random Llama models, made to test releaser's model "
                         "cards.\n\n## Parameters\n\n181K\n")


def test_user_template_syntax_error(release, tmp_path):
    tpl = tmp_path / "bad.md.j2"
    tpl.write_text("# title\n\n{% if x %}\n")
    with pytest.raises(CardError, match=r"bad\.md\.j2:3: template syntax error"):
        render_card(release["model"], template=tpl)


@pytest.mark.parametrize("body, problem", [
    ("## Usage\n\n## License\n\nMIT\n", "section 'Usage' is empty"),
    ("## Usage\n\nDeveloped by: None\n", "contains 'None'"),
    ("## Usage\n\n[More Information Needed]\n", "More Information Needed"),
    ("## A\n\ntext\n\n## B\n", "section 'B' is empty"),
])
def test_check_card_rejects(body, problem):
    with pytest.raises(CardError, match=re.escape(problem)):
        check_card("---\nlicense: mit\n---\n\n" + body, Path("t.md.j2"))


def test_check_card_accepts_none_in_code_prose_and_nested_sections():
    check_card("---\nlicense: mit\n---\n\n## Merge\n\n### Method\n\nNone of the inputs is gated.\n\n"
               "```python\nx = None\n```\n", Path("t"))


@pytest.mark.parametrize("line", ["| Size | None |", "Developed by: None", "None", "- **License:** None"])
def test_check_card_rejects_none_values(line):
    with pytest.raises(CardError, match="contains 'None'"):
        check_card(f"---\nlicense: mit\n---\n\n## A\n\n{line}\n", Path("t"))


def test_error_in_an_imported_macro_names_that_template(release, tmp_path):
    tpl = tmp_path / "mine.md.j2"
    tpl.write_text('{% import "_common.md.j2" as common %}{{ common.header() }}\n')  # imported without context
    with pytest.raises(CardError, match=r"_common\.md\.j2:\d+: undefined variable: 'front_matter' is undefined"):
        render_card(release["model"], template=tpl)


def test_loras_and_slices_are_listed(release, recipe, tmp_path):
    import shutil

    model = shutil.copytree(release["model"], tmp_path / "m")
    (model / "mergekit_config.yml").write_text("""\
merge_method: passthrough
slices:
  - sources:
      - model: alice/tiny-a+carol/style-lora
        layer_range: [0, 2]
  - sources:
      - model: bob/tiny-b
        layer_range: [1, 4]
""")
    text = render_card(model, recipe)
    assert "merged with the [Passthrough](" in text and "as the base model" not in text
    assert "- [alice/tiny-a+carol/style-lora](https://huggingface.co/alice/tiny-a) (layers 0-1)\n" in text
    assert "- [bob/tiny-b](https://huggingface.co/bob/tiny-b) (layers 1-3)\n" in text
    assert ("### LoRA adapters\n\n- [carol/style-lora](https://huggingface.co/carol/style-lora) applied to "
            "[alice/tiny-a](https://huggingface.co/alice/tiny-a) (layers 0-1)\n") in text
    meta = ModelCard(text).data.to_dict()
    assert meta["base_model"] == ["alice/tiny-a", "carol/style-lora", "bob/tiny-b"]


def test_split_gguf_files_are_one_row(tmp_path):
    folder = tmp_path / "gguf"
    folder.mkdir()
    for i in (1, 2):
        tiny_gguf(folder / f"Big-Q8_0-0000{i}-of-00002.gguf", "Q8_0", seed=i)
    tiny_gguf(folder / "Big-Q4_0.gguf", "Q4_0")
    facts = gather_facts(folder)
    split = next(f for f in facts.files if f.quant_type == "Q8_0")
    assert split.name == "Big-Q8_0-00001-of-00002.gguf" and len(split.shards) == 2
    assert split.size == sum((folder / n).stat().st_size for n in split.shards)
    assert "Big-Q8_0-00001-of-00002.gguf (2 parts) | Q8_0 |" in render_card(folder)


def test_missing_tokenizer_is_an_error(tmp_path):
    model = tiny_model(tmp_path / "m")
    with pytest.raises(ModelError, match="has no tokenizer"):
        render_card(model)


def test_unknown_merge_method_is_an_error(release, tmp_path):
    import shutil

    model = shutil.copytree(release["model"], tmp_path / "m")
    (model / "mergekit_config.yml").write_text(MERGE_CONFIG.replace("slerp", "frobnicate"))
    with pytest.raises(ModelError, match="merge method 'frobnicate'"):
        render_card(model)


def test_not_a_model_folder(tmp_path):
    with pytest.raises(ModelError, match="neither config.json nor .gguf"):
        render_card(tmp_path)


@pytest.mark.parametrize("text, problem", [
    ("name: alice\ndescription: x\n", "name: 'alice' is not a valid Hub repo id (it needs exactly one '/' between owner and name)"),
    ("name: a/b\n", "description: Field required"),
    ("name: a/b\ndescription: x\nlicence: mit\n", "licence: unknown key 'licence'; did you mean 'license'?"),
    ("name: a/b\ndescription: x\ngguf: {quant: [Q4_K_M]}\n", "gguf.quant: unknown key 'quant'; did you mean 'quants'?"),
    ("name: a/b\ndescription: x\ntitle: T\n", "title: unknown key 'title'; it is now card.title"),
    ("name: a/b\ndescription: x\nreleases: [{version: '1', date: yesterday, changes: [x]}]\n", "releases.0.date"),
    ("name: a/b\ndescription: x\npublish: {repos: {gguf: bad id}}\n", "publish.repos.gguf: 'bad id' is not a valid Hub repo id (it needs exactly one '/' between owner and name)"),
    ("- a\n", "must be a YAML mapping"),
])
def test_recipe_errors_name_the_field(tmp_path, text, problem):
    path = tmp_path / "r.yml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(problem)):
        load_recipe(path)


def test_example_recipe_loads():
    recipe = load_recipe(Path(__file__).parents[1] / "recipes" / "example.yml")
    assert recipe.author == "your-name" and recipe.quants.gguf.endswith("-GGUF")


def test_cli_card(release, tmp_path):
    runner = CliRunner()
    out = tmp_path / "README.md"
    recipe_file = str(GOLDEN / "card_recipe.yml")
    res = runner.invoke(app, ["card", str(release["gguf"]), "--recipe", recipe_file, "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert out.read_text() == (GOLDEN / "card_gguf.md").read_text()
    assert "gguf" in res.output and str(out) in res.output.replace("\n", "")
    res = runner.invoke(app, ["card", str(release["awq"])])
    assert res.exit_code == 0 and res.stdout.startswith("---\n")
    res = runner.invoke(app, ["card", str(tmp_path / "missing")])
    assert res.exit_code == 2 and res.output.startswith("error: model folder") and "Traceback" not in res.output


def test_write_card_is_atomic_and_reports(release, recipe, tmp_path):
    result = write_card(release["awq"], tmp_path / "README.md", recipe)
    assert result.kind == "awq" and result.bytes == (tmp_path / "README.md").stat().st_size
    assert [p.name for p in tmp_path.iterdir()] == ["README.md"]


def test_gguf_metadata_fills_in_without_a_recipe(tmp_path):
    folder = tmp_path / "Tiny-GGUF"
    folder.mkdir()
    tiny_gguf(folder / "Tiny-Q8_0.gguf", license="mit", base_model="alice/Tiny-Merge")
    text = render_card(folder)
    assert ModelCard(text).data.to_dict() == {
        "license": "mit", "library_name": "gguf", "pipeline_tag": "text-generation", "tags": ["gguf", "quantized"],
        "base_model": ["alice/Tiny-Merge"], "base_model_relation": "quantized"}
    assert "Quantized from [Tiny](https://huggingface.co/alice/Tiny-Merge)" in text
    assert "## License\n\nReleased under the `mit` license, the license of [Tiny](" in text


def test_awq_config_without_group_size_is_an_error(release, tmp_path):
    import json
    import shutil

    awq = shutil.copytree(release["awq"], tmp_path / "awq")
    config = json.loads((awq / "config.json").read_text())
    del config["quantization_config"]["group_size"]
    (awq / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="quantization_config lacks group_size"):
        render_card(awq)


def test_card_for_a_releaser_merge(tmp_path):
    from releaser.merge import run_merge

    a = tiny_tokenizer(tiny_model(tmp_path / "a", seed=1))
    b = tiny_tokenizer(tiny_model(tmp_path / "b", seed=2))
    run_merge({"merge_method": "linear", "models": [{"model": str(a), "parameters": {"weight": 0.7}},
                                                    {"model": str(b), "parameters": {"weight": 0.3}}],
               "dtype": "float32"}, tmp_path / "out")
    text = render_card(tmp_path / "out")
    assert "merged with the [Linear](" in text and "as the base model" not in text
    assert "- `a` (weight: 0.7)\n" in text and "- `b` (weight: 0.3)\n" in text
    assert str(tmp_path) not in text   # local paths are shown by folder name: a card is published
    assert "| Parameters | 181K |" in text and "Stop token: `<|im_end|>`" in text
