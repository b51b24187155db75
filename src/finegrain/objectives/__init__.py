"""Training objectives: loss terms (one per file) and methods that compose them, behind a registry."""

from . import clip, clipself, detailclip, fineclip  # noqa: F401  (each registers its method by its name)
from .base import EvalContext, Method, NoOptions, Progress
from .contrastive import ContrastiveLoss, MaskedContrastiveLoss
from .registry import (
    complete_method_options,
    create_method,
    get_method_class,
    list_methods,
    method_options,
    register_method,
)

__all__ = ["ContrastiveLoss", "EvalContext", "MaskedContrastiveLoss", "Method", "NoOptions", "Progress",
           "complete_method_options", "create_method", "get_method_class", "list_methods", "method_options",
           "register_method"]
