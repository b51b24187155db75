"""Training objectives: loss terms, the features they share, and methods made of terms, behind registries."""

from . import clip, clipself, detailclip, fineclip  # noqa: F401  (each registers its method and terms by name)
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
from .term import Source, Term, TermOptions, get_term_class, list_terms, register_term
from .term_method import TermMethod, TermSpec

__all__ = ["ContrastiveLoss", "EvalContext", "MaskedContrastiveLoss", "Method", "NoOptions", "Progress", "Source",
           "Term", "TermMethod", "TermOptions", "TermSpec", "complete_method_options", "create_method",
           "get_method_class", "get_term_class", "list_methods", "list_terms", "method_options", "register_method",
           "register_term"]
