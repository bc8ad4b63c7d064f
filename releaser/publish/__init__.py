"""Publishing a release: plan each repo's change from content hashes, show it, send only the difference (Hub via
huggingface_hub, or local mirror folders), delete what is stale, tag, verify."""

from .options import PublishError, PublishOptions
from .plan import RepoPlan, plan_repo
from .stage import run_publish

__all__ = ["PublishError", "PublishOptions", "RepoPlan", "plan_repo", "run_publish"]
