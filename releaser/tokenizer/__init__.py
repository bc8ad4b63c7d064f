"""Tokenizer doctor: find and fix stop tokens, chat templates, pad/BOS and untrained rows of HF model folders."""

from .doctor import DoctorReport, diagnose
from .findings import Finding
from .fix import FixReport, FixSpec, fix_tokenizer
from .stoptest import StopResult, stop_test
from .templates import ChatTemplate, TemplateError, builtin_names, load_template

__all__ = ["ChatTemplate", "DoctorReport", "Finding", "FixReport", "FixSpec", "StopResult", "TemplateError",
           "builtin_names", "diagnose", "fix_tokenizer", "load_template", "stop_test"]
