"""Runtime files of a GGUF repo (Ollama's ``params``/``system``, LM Studio's ``model.yaml``) and the llama-server
``models.ini`` stanza of its card, all from one source: the main folder's stops and sampling defaults."""

from .files import RuntimeFacts, lmstudio_model_yaml, models_ini, ollama_params, runtime_facts

__all__ = ["RuntimeFacts", "lmstudio_model_yaml", "models_ini", "ollama_params", "runtime_facts"]
