"""A method made of weighted terms and the sources of the features they share; ``a+b`` compositions.

:class:`TermMethod` builds, from :meth:`~TermMethod.parts_of` (terms with their loss keys and options, and
the options of the sources they read), the sources every term needs (each computed once per step, with
one tower pass per input), the merged sample spec, and the method hooks. FineCLIP, CLIPSelf and DetailCLIP
are TermMethods; :func:`composed_method` makes one from any ``+``-joined methods and terms, e.g.
``method.name: fineclip+detailclip``, whose options are one section per part (``method.fineclip.*``,
``method.detailclip.*``; a bare term's under its name, and the sources bare terms read under the source's
name, e.g. ``method.token_removal.keep_ratio``). Parts that set the same source must set it alike; two
sources holding the same module (a frozen and an EMA ``teacher``) or sample needs that cannot be met in
one sample are refused with one line.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import ConfigError
from ..param_rules import ParamRule
from ..sample_spec import AUGMENT_NONE, SampleSpec
from .base import Method, Progress
from .term import Features, Source, Term, source_classes

TEXT_FEATURES = frozenset({"text", "region_text"})


@dataclass(frozen=True)
class TermSpec:
    """A term of a method: its class, the key its loss is logged under (``<key>_loss``) and its options."""

    term: type[Term]
    key: str
    options: Any


def needed_features(terms: list[type[Term]], sources: dict[str, type[Source]], method: str = "") -> set[str]:
    """The features ``terms`` read and those their sources compute them from."""
    providers = {name: cls for cls in sources.values() for name in cls.provides}
    needed = set().union(*(t.needs for t in terms))
    pending = set(needed)
    while pending:
        name = pending.pop()
        if name not in providers:
            users = [t.term_name for t in terms if name in t.needs]
            raise ConfigError(f"method.name={method}: term {users[0]} reads feature {name!r}, which no source "
                              f"provides; features: {sorted(providers)}")
        new = providers[name].requires.get(name, set()) - needed
        needed |= new
        pending |= new
    return needed


def merge_sample_requests(requests: dict[str, dict], method: str = "") -> SampleSpec:
    """One sample spec from the sources' requests. Augmented views asked beside the unaugmented image
    (regions need it exact) become ``augmented_views`` next to it; any other disagreement is an error."""
    plain = any(r.get("augment") == AUGMENT_NONE for r in requests.values())
    merged: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for name, request in requests.items():
        if plain and request.get("views", 1) > 1:
            request = {"augmented_views": request["views"], "view_augment": request["augment"],
                       **{k: v for k, v in request.items() if k not in ("views", "augment")}}
        for key, value in request.items():
            if key in merged and merged[key] != value:
                raise ConfigError(f"method.name={method}: the {origin[key]} and {name} features need different samples "
                                  f"({key}: {merged[key]!r} vs {value!r})")
            merged[key], origin[key] = value, name
    return SampleSpec(**{"caption": "none", **merged})


class TermMethod(Method):
    """Weighted terms over shared features: ``<key>_loss = weight * term.loss`` for each term, in order."""

    @classmethod
    def parts_of(cls, options) -> tuple[list[TermSpec], dict[str, Any]]:
        """For ``options``: the terms (in the order their losses are summed) and the options of the sources
        they read (a source left out takes its defaults)."""
        raise NotImplementedError

    def __init__(self, options, model):
        super().__init__(options, model)
        specs, source_options = self.parts_of(options)
        classes = dict(sorted(source_classes().items(), key=lambda item: item[1].order))
        needed = needed_features([s.term for s in specs], classes, self.method_name)
        self.sources: dict[str, Source] = {}
        owners: dict[str, str] = {}
        for name, cls in classes.items():
            if not cls.provides & needed:
                continue
            source = cls(source_options.get(name) or cls.Options(), model, needed)
            for child, module in source.named_children():  # saved under the method, as the methods always were
                if child in owners:
                    raise ConfigError(f"method.name={self.method_name}: the {owners[child]} and {name} features each "
                                      f"need their own {child!r} (e.g. a frozen and an EMA teacher); a method holds one")
                owners[child] = name
                self.add_module(child, module)
            self.sources[name] = source
        if not needed & TEXT_FEATURES:
            model.lock_text_tower()  # no term reads text: the text tower takes no part in training
        self.terms: dict[str, Term] = {}
        for spec in specs:
            term = spec.term(spec.options, self.sources)
            self.add_module(f"{spec.key}_loss", term)
            self.terms[spec.key] = term
        self.feature_names = set().union(*(t.needs for t in self.terms.values()))
        if "regions" in self.sources:
            self.feature_names.add("box_valid")  # regions_per_image
        self.spec = merge_sample_requests({n: s.sample_request() for n, s in self.sources.items()}, self.method_name)

    @property
    def uses_logit_scale(self) -> bool:
        return any(t.uses_logit_scale for t in self.terms.values())

    # ----- the objective ------------------------------------------------------------------------------
    def sample_spec(self) -> SampleSpec:
        return self.spec

    @property
    def caches_features(self) -> bool:
        return all(s.per_sample for s in self.sources.values()) and all(t.per_sample for t in self.terms.values())

    def compute(self, model, batch: dict[str, torch.Tensor], progress: Progress) -> Features:
        """Every feature the terms need (and what it is computed from), each source in turn."""
        out: Features = {}
        for source in self.sources.values():
            source.compute(model, batch, out, progress)
        return out

    def forward(self, model, batch: dict[str, torch.Tensor], progress: Progress) -> dict[str, torch.Tensor]:
        return self.loss(model, self.compute(model, batch, progress), progress)

    def features(self, model, batch: dict[str, torch.Tensor], progress: Progress) -> Features:
        """The per-sample features the terms read (concatenated across accumulated micro-batches)."""
        out = self.compute(model, batch, progress)
        return {name: out[name] for name in out if name in self.feature_names}

    def loss(self, model, features: Features, progress: Progress) -> dict[str, torch.Tensor]:
        losses = {f"{key}_loss": term.options.weight * term.loss(model, features, progress)
                  for key, term in self.terms.items()}
        for source in self.sources.values():
            losses.update(source.metrics(features, progress))
        if self.uses_logit_scale:
            losses["logit_scale"] = model.logit_scale.exp().detach()
        for term in self.terms.values():
            losses.update(term.metrics(features, progress))
        return losses

    @torch.no_grad()
    def after_step(self, model, progress: Progress) -> None:
        for source in self.sources.values():
            source.after_step(model, progress)

    # ----- what the trainer asks ----------------------------------------------------------------------
    def param_rules(self) -> list[ParamRule]:
        rules = [] if self.uses_logit_scale else [ParamRule("model.clip.logit_scale", trainable=False)]
        return rules + [rule for source in self.sources.values() for rule in source.param_rules()]

    def extra_eval_models(self, model) -> dict:
        return {name: m for source in self.sources.values() for name, m in source.extra_eval_models(model).items()}

    def export_model(self, model):
        for source in self.sources.values():
            exported = source.export_model(model)
            if exported is not None:
                return exported
        return self.eval_model(model)


def composed_method(name: str, resolve) -> type[TermMethod]:
    """A :class:`TermMethod` class for ``name`` = parts joined by ``+``, each a TermMethod or a term
    (``resolve(part)`` returns its class). Its options hold one section per part, plus one per source a
    bare term reads (defaults)."""
    parts = {}
    for part in name.split("+"):
        cls = resolve(part)
        if part in parts:
            raise ConfigError(f"method.name={name}: {part!r} is named twice")
        if isinstance(cls, type) and issubclass(cls, Method) and not issubclass(cls, TermMethod):
            raise ConfigError(f"method.name={name}: {part!r} is a method not made of terms; it cannot be composed")
        parts[part] = cls
    sources = source_classes()
    bare = [cls for cls in parts.values() if issubclass(cls, Term)]
    bare_sources = [n for n, s in sources.items() if s.provides & needed_features(bare, sources, name)] if bare else []
    fields = [(part, cls.Options, field(default_factory=cls.Options)) for part, cls in parts.items()]
    fields += [(n, sources[n].Options, field(default_factory=sources[n].Options)) for n in bare_sources
               if n not in parts]
    options_cls = dataclasses.make_dataclass("Options", fields)

    class Composed(TermMethod):
        __doc__ = f"The terms of {' + '.join(parts)}, sharing their features."
        Options = options_cls

        @classmethod
        def parts_of(cls, options) -> tuple[list[TermSpec], dict[str, Any]]:
            specs: list[TermSpec] = []
            chosen: dict[str, tuple[str, Any]] = {}  # source -> (who set it, options)

            def choose(source: str, wanted, who: str) -> None:
                if source in chosen and chosen[source][1] != wanted:
                    first, value = chosen[source]
                    diff = next(f.name for f in dataclasses.fields(wanted)
                                if getattr(wanted, f.name) != getattr(value, f.name))
                    keys = [f"method.{p}.{diff}" for p in (first, who) if hasattr(getattr(options, p, None), diff)]
                    raise ConfigError(f"method.name={name}: {first} and {who} set the {source!r} features "
                                      f"differently ({diff}: {getattr(value, diff)!r} vs {getattr(wanted, diff)!r}); "
                                      f"set them alike{' with ' + ' or '.join(keys) if keys else ''}")
                chosen.setdefault(source, (who, wanted))

            for part, part_cls in parts.items():
                part_options = getattr(options, part)
                if issubclass(part_cls, Term):
                    specs.append(TermSpec(part_cls, part, part_options))
                    for source in bare_sources:
                        if sources[source].provides & needed_features([part_cls], sources, name):
                            choose(source, getattr(options, source), source)
                    continue
                part_specs, part_sources = part_cls.parts_of(part_options)
                specs += part_specs
                for source, source_options in part_sources.items():
                    choose(source, source_options, part)
            keys = [s.key for s in specs]
            if len(set(keys)) < len(keys):
                twice = next(k for k in keys if keys.count(k) > 1)
                raise ConfigError(f"method.name={name}: two parts compute {twice}_loss; compose different terms")
            return specs, {source: options for source, (_, options) in chosen.items()}

    Composed.__name__ = Composed.__qualname__ = "Composed_" + "_".join(parts)
    return Composed
