"""releaser.runtimes: Ollama's params/system, LM Studio's model.yaml and the llama-server models.ini stanza, each
checked against its format's documented keys and types, from one source (the main folder's stops and sampling)."""

from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import tarfile
from pathlib import Path

import pytest
import yaml

from releaser.gguf import export_gguf
from releaser.runtimes.files import models_ini, runtime_facts
from releaser.runtimes.options import RuntimesOptions
from releaser.runtimes.stage import run
from releaser_testing import tiny_model

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")

# https://github.com/ollama/ollama/blob/main/docs/modelfile.mdx#valid-parameters-and-values (name -> value type)
OLLAMA_PARAMETERS = {"num_ctx": int, "repeat_last_n": int, "repeat_penalty": float, "temperature": float,
                     "seed": int, "stop": str, "num_predict": int, "draft_num_predict": int, "top_k": int,
                     "top_p": float, "min_p": float}
# https://lmstudio.ai/docs/app/modelyaml and https://github.com/modelyaml/modelyaml (Draft 1.0)
MODELYAML_KEYS = {"model", "base", "metadataOverrides", "config", "customFields", "suggestions"}
MODELYAML_METADATA = {"domain", "architectures", "compatibilityTypes", "paramsStrings", "minMemoryUsageBytes",
                      "contextLengths", "trainedForToolUse", "vision", "reasoning"}
# LM Studio's inference-time keys: plain values, and those taking {checked, value}
LMSTUDIO_PLAIN = {"llm.prediction.temperature": float, "llm.prediction.topKSampling": int,
                  "llm.prediction.stopStrings": list}
LMSTUDIO_CHECKED = {"llm.prediction.topPSampling", "llm.prediction.minPSampling", "llm.prediction.repeatPenalty"}


@pytest.fixture(scope="module")
def release(tmp_path_factory, smollm2):
    """A main folder declaring two stops (<|im_end|>, <file_sep>) and four sampling defaults, and its GGUF folder."""
    root = tmp_path_factory.mktemp("runtimes")
    main = tiny_model(root / "main", "llama", layers=1, hidden=64, intermediate=128, heads=2, kv_heads=1,
                      vocab=49152)
    for f in TOKENIZER_FILES:
        shutil.copy(smollm2 / f, main / f)
    (main / "generation_config.json").write_text(json.dumps({
        "bos_token_id": 1, "eos_token_id": [2, 5], "temperature": 0.6, "top_k": 20, "top_p": 0.9,
        "repetition_penalty": 1.1, "do_sample": True}))
    gguf = export_gguf(main, root / "gguf", ["Q8_0", "Q4_K_M"], name="Tiny", tags=["chat"], languages=["en"]).out_dir
    return main, gguf


def test_files_follow_their_documented_formats(release, tmp_path):
    main, gguf = release
    out = tmp_path / "repo"
    shutil.copytree(gguf, out)
    result = run(RuntimesOptions(), (main, out), out, main_repo="alice/Tiny", gguf_repo="alice/Tiny-GGUF",
                 system_prompt="You are terse.")
    assert sorted(f.path for f in result.files) == ["model.yaml", "params", "system"]

    params = json.loads((out / "params").read_text())
    assert set(params) <= set(OLLAMA_PARAMETERS)
    for key, value in params.items():
        kind = OLLAMA_PARAMETERS[key]
        if key == "stop":
            assert isinstance(value, list) and all(isinstance(v, str) for v in value)
        else:
            assert isinstance(value, kind) and not isinstance(value, bool), (key, value)
    assert params == {"stop": ["<|im_end|>", "<file_sep>"], "temperature": 0.6, "top_k": 20, "top_p": 0.9,
                      "repeat_penalty": 1.1}
    assert (out / "system").read_text() == "You are terse.\n"

    data = yaml.safe_load((out / "model.yaml").read_text())
    assert set(data) <= MODELYAML_KEYS and {"model", "base"} <= set(data)
    assert re.fullmatch(r"[^/]+/[^/]+", data["model"]) and data["model"] == "alice/tiny"
    assert data["base"] == [{"key": "alice/tiny-gguf",
                             "sources": [{"type": "huggingface", "user": "alice", "repo": "Tiny-GGUF"}]}]
    meta = data["metadataOverrides"]
    assert set(meta) <= MODELYAML_METADATA
    assert meta["domain"] == "llm" and meta["architectures"] == ["llama"] and meta["compatibilityTypes"] == ["gguf"]
    assert meta["minMemoryUsageBytes"] == min(p.stat().st_size for p in gguf.glob("*.gguf"))   # the smallest file
    fields = {f["key"]: f["value"] for f in data["config"]["operation"]["fields"]}
    assert set(fields) <= set(LMSTUDIO_PLAIN) | LMSTUDIO_CHECKED
    for key, value in fields.items():
        if key in LMSTUDIO_CHECKED:
            assert set(value) == {"checked", "value"} and value["checked"] is True
        else:
            assert isinstance(value, LMSTUDIO_PLAIN[key])
    assert fields["llm.prediction.stopStrings"] == params["stop"]
    assert fields["llm.prediction.repeatPenalty"]["value"] == 1.1 and fields["llm.prediction.topKSampling"] == 20

    # options turned off remove the files they made; nothing else in the folder is touched
    before = {p.name for p in out.iterdir()}
    result = run(RuntimesOptions(lmstudio=False), (main, out), out, main_repo="alice/Tiny",
                 gguf_repo="alice/Tiny-GGUF")
    assert [f.path for f in result.files] == ["params"]
    assert {p.name for p in out.iterdir()} == before - {"model.yaml", "system"}
    assert RuntimesOptions.model_validate(False).files is False


def _llama_server_options() -> set[str]:
    """llama-server's option names (long and short, without dashes) from the vendored llama.cpp's common/arg.cpp,
    plus the preset-only keys tools/server/README.md documents."""
    sdist = Path(os.environ.get("RELEASER_LLAMA_CPP_SDIST", Path.home() / ".cache/releaser/llama-cpp-sdist"))
    extracted = sdist / "src/llama_cpp_python-0.3.36/vendor/llama.cpp/common/arg.cpp"
    if extracted.is_file():
        text = extracted.read_text()
    elif (sdist / "llama_cpp_python-0.3.36.tar.gz").is_file():
        with tarfile.open(sdist / "llama_cpp_python-0.3.36.tar.gz") as tar:
            text = tar.extractfile("llama_cpp_python-0.3.36/vendor/llama.cpp/common/arg.cpp").read().decode()
    else:
        message = "the llama-cpp-python 0.3.36 sdist is missing: run tests/run.sh once"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return set(re.findall(r'"--?([a-z][a-z0-9-]*)"', text)) | {"load-on-startup", "stop-timeout"}


def test_models_ini_stanza_uses_llama_server_options(release):
    main, gguf = release
    facts = runtime_facts(main, gguf)
    text = models_ini(facts.sampling, "alice/Tiny-GGUF", "Q8_0")
    assert text.startswith("version = 1\n")   # a key before any section: configparser reads the rest
    ini = configparser.ConfigParser()
    ini.read_string(text.removeprefix("version = 1\n"))
    assert ini.sections() == ["Tiny-GGUF-Q8_0"]
    section = dict(ini["Tiny-GGUF-Q8_0"])
    assert set(section) <= _llama_server_options(), set(section) - _llama_server_options()
    assert section == {"hf-repo": "alice/Tiny-GGUF:Q8_0", "temp": "0.6", "top-k": "20", "top-p": "0.9",
                       "repeat-penalty": "1.1"}


def test_template_conformance_flags_what_llama_cpp_renders_otherwise(release, tmp_path):
    """ChatML renders the same through llama.cpp's built-in formatter; a template it does not know (Alpaca) and one it
    renders otherwise (Llama 2: spaces around the turns) are flagged, and the doctor reports it as a warning."""
    from conftest import require
    from releaser.runtimes.conformance import DIFFERS, SAME, UNKNOWN, check_template
    from releaser.tokenizer.doctor import diagnose
    from releaser.tokenizer.templates import load_template

    require("llama_cpp")
    chatml = check_template(load_template("chatml").source, "<|im_start|>", "<|im_end|>")
    assert chatml.status == SAME and chatml.builtin == chatml.jinja and chatml.jinja.endswith(
        "<|im_start|>user\nAnd of Italy?<|im_end|>\n<|im_start|>assistant\n")
    assert check_template(load_template("alpaca").source, "<s>", "</s>").status == UNKNOWN
    llama2 = check_template(load_template("llama2").source, "<s>", "</s>")
    assert llama2.status == DIFFERS and "Jinja" in llama2.detail and llama2.needs_jinja

    main, _ = release
    report = diagnose(main, runtimes=True)
    assert report.llama_cpp == SAME and "llamacpp-template" not in {f.code for f in report.findings}
    other = shutil.copytree(main, tmp_path / "alpaca")
    (other / "chat_template.jinja").write_text(load_template("alpaca").source)
    report = diagnose(other, runtimes=True)
    finding = next(f for f in report.findings if f.code == "llamacpp-template")
    assert report.llama_cpp == UNKNOWN and finding.severity == "warning" and "--jinja" in finding.fix
    assert "llamacpp-template" not in {f.code for f in diagnose(other).findings}   # only when asked


def test_gguf_card_tells_each_runtime_what_to_do(release, tmp_path):
    """The GGUF card: llama.cpp CLI and server with a curl example, the models.ini stanza, one-file download, Ollama
    (and its params file), LM Studio, memory scaled to the files, and why Q4_K_M's bits per weight are high (64- and 128-wide
    rows fall back from K-quants); the files carry the recipe's tags and languages."""
    from releaser.card.render import write_card
    from releaser.gguf.reader import GGUFFile
    from releaser.recipe import Recipe

    main, gguf = release
    out = shutil.copytree(gguf, tmp_path / "Tiny-GGUF")
    run(RuntimesOptions(), (main, out), out, main_repo="alice/Tiny", gguf_repo="alice/Tiny-GGUF")
    recipe = Recipe(name="alice/Tiny", description="A tiny model.", gguf={"quants": ["Q8_0", "Q4_K_M"]})
    card = write_card(out, out / "README.md", recipe, None, overwrite=True).path.read_text()
    for text in ("llama-server -hf alice/Tiny-GGUF:Q4_K_M", "curl http://localhost:8080/v1/chat/completions",
                 "hf-repo = alice/Tiny-GGUF:Q4_K_M", "temp = 0.6", "llama-server --models-preset models.ini",
                 'hf download alice/Tiny-GGUF --include "Tiny-Q4_K_M.gguf"', "Ollama reads this repo's `params` file",
                 "lms get alice/Tiny-GGUF", "`temp` 0.6", "per 4096 tokens of context",
                 "9 of 9 weight tensors fall back (6 to Q5_0, 3 to Q8_0): their rows are 64 or 128 wide"):
        assert text in card, text
    values = GGUFFile(gguf / "Tiny-Q4_K_M.gguf").values
    assert values["general.tags"] == ["chat"] and values["general.languages"] == ["en"]
    recipe = Recipe(name="alice/Tiny", description="A tiny model.", gguf={"quants": ["Q8_0"]}, runtimes=False)
    card = write_card(out, out / "README.md", recipe, None, overwrite=True).path.read_text()
    assert "models.ini" not in card


# -- Ollama's template file: only where Ollama's own detection would not pick the release's format -----------------
def _jinja_render(source, messages, bos, eos):
    from releaser.runtimes.conformance import _jinja

    return _jinja(source, messages, True, bos, eos)


@pytest.mark.parametrize("name", ["alpaca", "chatml", "gemma", "llama2", "llama3", "mistral", "phi3", "vicuna",
                                  "zephyr"])
def test_go_templates_render_as_the_jinja_templates(name, go_render):
    """Every built-in's Go form (Go's own text/template, run as Ollama runs it) writes the conversation exactly as
    the Jinja template does, BOS aside (llama.cpp adds it when it tokenizes); with a system turn too, where the Jinja
    template takes one (Gemma and Mistral refuse it: their Go forms fold it into the first user turn, as Ollama's)."""
    from releaser.runtimes.conformance import CONVERSATION
    from releaser.runtimes.files import ollama_template
    from releaser.tokenizer.templates import RENDER_ERRORS, load_template, with_default_system

    ct = load_template(name)
    bos, eos = "<s>", "</s>" if ct.eos is None else ct.eos
    go, why = ollama_template(ct, with_default_system(ct.source, "Be brief."), bos, eos)
    assert go is not None and ("default system prompt" if ct.ollama else "does not recognise") in why
    for messages in (CONVERSATION, CONVERSATION[1:]):
        try:
            expected = _jinja_render(ct.source, messages, bos, eos)
        except RENDER_ERRORS:
            assert name in ("gemma", "mistral")
            folded = go_render(go, messages)
            assert folded.count(messages[0]["content"]) == 1 and folded.index(messages[0]["content"]) < folded.index(
                messages[1]["content"])
            continue
        assert go_render(go, messages) == expected, name


def test_template_file_only_where_ollama_would_not_detect_the_format(release, tmp_path, go_render):
    """phi3 (Ollama's nearest template is 104 edits away, past its limit of 100) gets a template file that renders
    as the GGUF's Jinja template; chatml as written gets none (Ollama detects it), with a default system prompt it
    does; a custom template gets the card's single-turn translation; switching Ollama off removes the file."""
    from releaser.runtimes.conformance import CONVERSATION
    from releaser.runtimes.files import ollama_template
    from releaser.tokenizer.templates import load_template

    main, _ = release
    phi = shutil.copytree(main, tmp_path / "phi3")
    source = load_template("phi3").source
    (phi / "chat_template.jinja").write_text(source)
    gguf = export_gguf(phi, tmp_path / "gguf", ["Q8_0"], name="Tiny").out_dir
    result = run(RuntimesOptions(), (phi, gguf), gguf, main_repo="alice/Tiny", gguf_repo="alice/Tiny-GGUF",
                 chat_template="phi3")
    assert "template" in [f.path for f in result.files]
    assert "does not recognise 'phi3'" in result.facts["ollama_template"]
    assert go_render((gguf / "template").read_text(), CONVERSATION) == _jinja_render(source, CONVERSATION, "", "")
    run(RuntimesOptions(ollama=False), (phi, gguf), gguf, main_repo="alice/Tiny", gguf_repo="alice/Tiny-GGUF",
        chat_template="phi3")
    assert not (gguf / "template").exists() and not (gguf / "params").exists()

    chatml = load_template("chatml")
    assert ollama_template(chatml, chatml.source, "", "<|im_end|>") == (
        None, "Ollama recognises the chat template as its 'chatml' template")
    assert ollama_template(None, chatml.source, "", "<|im_end|>")[0] is None
    custom = tmp_path / "mine.jinja"
    custom.write_text("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
                      "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    go, why = ollama_template(load_template(custom), custom.read_text(), "", "<|end|>")
    assert "translated from 'mine'" in why and go.endswith("<|assistant|>{{ .Response }}<|end|>")
    with pytest.raises(Exception, match="would break Ollama's Go template"):
        ollama_template(load_template("phi3"), source, "", "{{")
