"""Loss terms and the shared features they read: the units a method is made of.

A :class:`Term` is one named loss (FineCLIP's region contrastive, DetailCLIP's iBOT patch loss, ...). It
declares the features it reads (``needs``: names such as ``"roi"``, ``"text"``, ``"student_logits"``) and
computes its unweighted loss from them; the method multiplies by the term's ``weight``. A :class:`Source`
computes features for every term that reads them: one tower pass serves all terms that need the same
input (the global embedding and the dense map of an image, the teacher's and the student's passes over
DetailCLIP's views). Sources own what the features need (a teacher, a decoder, heads) and say what the
samples must carry. :class:`finegrain.objectives.term_method.TermMethod` puts terms and sources together.

Terms register by name (:func:`register_term`), finegrain's own and those other packages declare as
``finegrain.terms`` entry points, so ``method.name: fineclip+my_term`` composes them from a config.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import EntryPoint
from typing import ClassVar

import torch
from torch import nn

from ..errors import ConfigError
from ..param_rules import ParamRule
from ..plugins import registrar, term_entry_points
from .base import Progress

Features = dict[str, torch.Tensor]


@dataclass
class TermOptions:
    """Options every term has (a term's own ``Options`` subclass this)."""

    weight: float = 1.0  # the term's loss is multiplied by this

    def __post_init__(self):
        if self.weight < 0:
            raise ConfigError(f"weight: expected a value >= 0, got {self.weight!r}")


class Term(nn.Module):
    """One loss: ``loss(model, features, progress)`` from the features named in ``needs``.

    ``features`` holds what the method's sources computed for the batch (see each source's ``provides``).
    ``uses_logit_scale``: the term multiplies by ``model.logit_scale`` (it stays trainable only if a term
    does). ``per_sample``: every feature it needs is per sample (first dim = samples or regions), so
    gradient accumulation may concatenate micro-batches' features before the loss. A term may hold state
    (a centre), saved with the method's checkpoint under ``<key>_loss``.
    """

    Options: type = TermOptions
    needs: frozenset[str] = frozenset()
    uses_logit_scale: bool = False
    per_sample: bool = True
    term_name: str = ""

    def __init__(self, options, sources: dict[str, Source]):
        super().__init__()
        self.options = options

    def loss(self, model, features: Features, progress: Progress) -> torch.Tensor:
        raise NotImplementedError

    def metrics(self, features: Features, progress: Progress) -> dict[str, torch.Tensor]:
        """Logged scalars besides the loss (e.g. a scheduled temperature)."""
        return {}


class Source(nn.Module):
    """Computes shared features (``provides``) with its ``Options``; ``compute`` adds those asked for to
    ``out`` (earlier sources' features are there already: e.g. the image pass's dense map for region
    pooling). Submodules (a teacher, a decoder, heads) are held by the method under their own names, so
    two sources holding the same name (a frozen and an EMA ``teacher``) cannot go together."""

    name: str = ""
    order: int = 0  # sources compute in this order (a source reads features of those before it)
    provides: frozenset[str] = frozenset()
    requires: ClassVar[dict[str, set[str]]] = {}  # feature -> features of other sources it is computed from
    per_sample: bool = True

    @dataclass
    class Options:
        pass

    def __init__(self, options, model, needed: set[str]):
        super().__init__()
        self.options = options
        self.needed = needed & self.provides

    def sample_request(self) -> dict:
        """The :class:`~finegrain.sample_spec.SampleSpec` fields this source's features need."""
        return {}

    def compute(self, model, batch: dict[str, torch.Tensor], out: Features, progress: Progress) -> None:
        raise NotImplementedError

    def metrics(self, features: Features, progress: Progress) -> dict[str, torch.Tensor]:
        return {}

    def param_rules(self) -> list[ParamRule]:
        return []

    @torch.no_grad()
    def after_step(self, model, progress: Progress) -> None:
        pass

    def extra_eval_models(self, model) -> dict:
        return {}

    def export_model(self, model):
        """The model to export (e.g. ensembled with a teacher), or None to leave it to others."""


def load_declared(entry: EntryPoint, base: type, what: str) -> type:
    """The class an entry point names, which must subclass ``base``; ``what`` names it in the error."""
    cls = entry.load()
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ConfigError(f"method.name: the entry point {entry.value!r} of {what} is not a finegrain "
                          f"{base.__name__} subclass")
    return cls


_SOURCES: dict[str, type[Source]] = {}


def register_source(cls: type[Source]) -> type[Source]:
    """Class decorator: make a source's features available to terms (finegrain's own sources)."""
    if cls.name in _SOURCES:
        raise ValueError(f"source {cls.name!r} is registered twice")
    _SOURCES[cls.name] = cls
    return cls


def source_classes() -> dict[str, type[Source]]:
    return dict(_SOURCES)


_TERMS: dict[str, type[Term]] = {}


register_term = registrar(_TERMS, "term", "Class decorator: make a term available to ``method.name: a+b`` "
                                          "compositions as ``name``.")


def list_terms() -> list[str]:
    """Registered terms and those installed packages declare as ``finegrain.terms`` entry points."""
    from . import clipself, detailclip, fineclip  # noqa: F401  (register finegrain's own terms)

    return sorted(set(_TERMS) | set(term_entry_points()))


def get_term_class(name: str) -> type[Term] | None:
    """The term named ``name`` (an entry point's class is imported on first use); None if there is none."""
    if name not in list_terms():
        return None
    if name not in _TERMS:
        cls = load_declared(term_entry_points()[name], Term, f"term {name!r}")
        if name not in _TERMS:
            register_term(name)(cls)
    return _TERMS[name]
