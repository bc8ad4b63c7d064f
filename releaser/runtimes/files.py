"""The runtime files' contents, from one source: the stops and sampling defaults the main folder states
(``generation_config.json``; the same ids and values every GGUF of the release carries) and the GGUF files.

Each format as its documentation defines it:

- Ollama reads repo-level files of a GGUF repo (https://huggingface.co/docs/hub/ollama, "Custom Chat Template and
  Parameters"): ``params`` is JSON whose keys are the Modelfile ``PARAMETER`` names
  (https://github.com/ollama/ollama/blob/main/docs/modelfile.mdx#valid-parameters-and-values: ``stop`` a list of
  strings, ``temperature``/``top_p``/``min_p``/``repeat_penalty`` floats, ``top_k`` an int), ``system`` the default
  system message as plain text, ``template`` a Go template over ``.Messages`` (Ollama otherwise picks the entry of its
  own list nearest to the GGUF's Jinja template, and prompts without roles when none is near: so it is written only
  where that detection would not pick the release's format);
- LM Studio's ``model.yaml`` (https://lmstudio.ai/docs/app/modelyaml, https://github.com/modelyaml/modelyaml):
  ``model`` (``publisher/model``), ``base`` (``key`` + ``sources`` of ``type: huggingface``, ``user``, ``repo``),
  ``metadataOverrides`` and ``config.operation.fields`` (``llm.prediction.*`` keys);
- llama-server's router presets (llama.cpp tools/server/README.md "Model presets", ``--models-preset FILE``): an INI
  file with ``version = 1`` and one section per model whose keys are llama-server's long option names without dashes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..errors import ModelError
from ..gguf.stops import declared_stop_ids, generation_config

OLLAMA_PARAMS, OLLAMA_SYSTEM, OLLAMA_TEMPLATE, LMSTUDIO_YAML = "params", "system", "template", "model.yaml"
FILES = (OLLAMA_PARAMS, OLLAMA_SYSTEM, OLLAMA_TEMPLATE, LMSTUDIO_YAML)

# generation_config.json key -> (Ollama PARAMETER, llama-server option, LM Studio key, LM Studio's {checked, value}
# form, value type)
SAMPLING = (
    ("temperature", "temperature", "temp", "llm.prediction.temperature", False, float),
    ("top_k", "top_k", "top-k", "llm.prediction.topKSampling", False, int),
    ("top_p", "top_p", "top-p", "llm.prediction.topPSampling", True, float),
    ("min_p", "min_p", "min-p", "llm.prediction.minPSampling", True, float),
    ("repetition_penalty", "repeat_penalty", "repeat-penalty", "llm.prediction.repeatPenalty", True, float),
)


@dataclass(frozen=True)
class RuntimeFacts:
    stops: list[str]                       # the text of every stop id the main folder declares
    sampling: dict[str, float | int]       # generation_config.json's sampling defaults (its own key names)
    architecture: str
    size_label: str | None                 # general.size_label, e.g. 135M
    context_length: int | None
    smallest: int                          # bytes of the smallest GGUF file (all its shards)
    files: dict[str, str] = field(default_factory=dict)   # quant type -> first file name
    system_prompt: str | None = None
    ollama_template: str | None = None     # the Go template Ollama needs (None: its detection finds the format)
    ollama_note: str = ""                  # why it is or is not written


def _sampling(folder: Path) -> dict[str, float | int]:
    gen = generation_config(folder)
    out = {}
    for name, *_, kind in SAMPLING:
        value = gen.get(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
            continue
        out[name] = kind(value)
    return out


def ollama_template(chat_template, gguf_template: str | None, bos: str, eos: str) -> tuple[str | None, str]:
    """(Ollama's ``template`` file or None, why): None where Ollama's detection picks the release's format from the
    GGUF's template text (``chat_template`` is the recipe's :class:`ChatTemplate`, None when the release keeps the
    model's own template); else the format's Go template (``NAME.gotmpl``) with the bos/eos text filled in, or for a
    template without one, the card's single-turn translation of the Jinja template (Ollama repeats it per turn)."""
    if chat_template is None or gguf_template is None:
        return None, "Ollama picks its template from the GGUF's chat template"
    if gguf_template == chat_template.source and chat_template.ollama:
        return None, f"Ollama recognises the chat template as its {chat_template.ollama!r} template"
    if "{{" in bos + eos or "}}" in bos + eos:
        raise ModelError(f"the bos/eos token text {bos!r}/{eos!r} would break Ollama's Go template; turn "
                         "runtimes.ollama off or fix the tokens")
    go = chat_template.go_template
    if go is None:
        from ..card.prompt import jinja_renderer, ollama_template as translate

        return translate(jinja_renderer(gguf_template, bos, eos), eos, bos), (
            f"template written: translated from {chat_template.name!r} (add {chat_template.name}.gotmpl beside it "
            "for a multi-turn Go template)")
    why = ("the default system prompt changes the template text" if chat_template.ollama
           else f"Ollama's detection does not recognise {chat_template.name!r}")
    return go.replace("@BOS@", bos).replace("@EOS@", eos), f"template written: {why}"


def runtime_facts(main_dir: str | Path, gguf_dir: str | Path, system_prompt: str | None = None,
                  chat_template=None) -> RuntimeFacts:
    """The facts the runtime files state, read from the main folder and the GGUF folder (its files' vocabulary names
    the declared stop ids); ``chat_template`` (a :class:`ChatTemplate`) is the format the recipe gave the model."""
    from ..card.quant_facts import gguf_facts
    from ..gguf.reader import GGUFFile

    facts = gguf_facts(Path(gguf_dir))
    values = GGUFFile(Path(gguf_dir) / facts.files[0].name).values
    tokens = values.get("tokenizer.ggml.tokens") or []
    ids = declared_stop_ids(main_dir, values.get("tokenizer.ggml.eos_token_id"))
    stops = [tokens[i] for i in ids if i < len(tokens)]
    if not stops:
        raise ModelError(f"{main_dir} declares no stop token (generation_config.json eos_token_id); fix the tokenizer "
                         "with releaser fix-tokenizer")
    def token(key: str) -> str:
        i = values.get(key)
        return tokens[i] if isinstance(i, int) and i < len(tokens) else ""

    go, note = ollama_template(chat_template, values.get("tokenizer.chat_template"),
                               token("tokenizer.ggml.bos_token_id"), token("tokenizer.ggml.eos_token_id"))
    return RuntimeFacts(stops, _sampling(Path(main_dir)), facts.architecture, values.get("general.size_label"),
                        facts.context_length, min(f.size for f in facts.files),
                        {f.quant_type: f.name for f in facts.files}, system_prompt, go, note)


def ollama_params(facts: RuntimeFacts) -> str:
    """Ollama's repo-level ``params`` (JSON): every stop token and the sampling defaults the folder states."""
    params: dict = {"stop": facts.stops}
    for name, ollama, *_ in SAMPLING:
        if name in facts.sampling:
            params[ollama] = facts.sampling[name]
    return json.dumps(params, indent=2, ensure_ascii=False) + "\n"


def _hub_id(repo: str) -> tuple[str, str]:
    user, name = repo.split("/", 1)
    return user, name


def lmstudio_model_yaml(facts: RuntimeFacts, main_repo: str, gguf_repo: str) -> str:
    """LM Studio's ``model.yaml``: the model (``publisher/model``, lower case as in LM Studio's catalog) resolving to
    the GGUF repo, its metadata, and the sampling defaults and stop strings as inference-time config."""
    user, name = _hub_id(gguf_repo)
    meta: dict = {"domain": "llm", "architectures": [facts.architecture], "compatibilityTypes": ["gguf"]}
    if facts.size_label:
        meta["paramsStrings"] = [facts.size_label]
    meta["minMemoryUsageBytes"] = facts.smallest
    if facts.context_length:
        meta["contextLengths"] = [facts.context_length]
    meta["vision"] = False
    fields = []
    for key, _, _, lms, checked, _ in SAMPLING:
        if key in facts.sampling:
            value = facts.sampling[key]
            fields.append({"key": lms, "value": {"checked": True, "value": value} if checked else value})
    fields.append({"key": "llm.prediction.stopStrings", "value": facts.stops})
    data = {"model": main_repo.lower(),
            "base": [{"key": gguf_repo.lower(), "sources": [{"type": "huggingface", "user": user, "repo": name}]}],
            "metadataOverrides": meta,
            "config": {"operation": {"fields": fields}}}
    head = "# model.yaml (https://lmstudio.ai/docs/app/modelyaml), written by releaser from the model's own files\n"
    return head + yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


# general.sampling.* short key -> generation_config.json key (the card reads the defaults back from a GGUF)
GGUF_SAMPLING = {"temp": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
                 "penalty_repeat": "repetition_penalty"}


def models_ini(sampling: dict[str, float | int], gguf_repo: str, quant: str) -> str:
    """A llama-server ``--models-preset`` file with one model, the GGUF repo's ``quant`` file, and the ``sampling``
    defaults (generation_config.json names) the folder states (llama-server also reads them from the file's
    ``general.sampling.*`` keys)."""
    lines = ["version = 1", "", f"[{gguf_repo.split('/', 1)[1]}-{quant}]", f"hf-repo = {gguf_repo}:{quant}"]
    for name, _, option, *_ in SAMPLING:
        if name in sampling:
            lines.append(f"{option} = {sampling[name]}")
    return "\n".join(lines) + "\n"


def write_plan(facts: RuntimeFacts, options, main_repo: str, gguf_repo: str) -> dict[str, str]:
    """File name -> content of the runtime files ``options`` turns on."""
    files = {}
    if options.ollama:
        files[OLLAMA_PARAMS] = ollama_params(facts)
        if facts.system_prompt:
            files[OLLAMA_SYSTEM] = facts.system_prompt.strip() + "\n"
        if facts.ollama_template:
            files[OLLAMA_TEMPLATE] = facts.ollama_template
    if options.lmstudio:
        files[LMSTUDIO_YAML] = lmstudio_model_yaml(facts, main_repo, gguf_repo)
    return files
