"""Parameter rules: freeze parameters, or give them their own learning rate / weight decay, by name.

A leaf module: methods (``Method.param_rules``) and configs (``optim.param_groups``) both produce rules,
and the trainer's optimizer applies them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ParamRule:
    """Applies to the parameters whose name in the training module starts with ``prefix``.

    Names are those of the module the trainer optimises: ``model.clip.visual.conv1.weight`` (the
    open_clip model), ``method.<head>.…`` (modules a method owns). When several rules match a parameter,
    the last one decides each field it sets (method rules come first, then ``optim.param_groups``).
    """

    prefix: str
    trainable: bool | None = None  # False freezes (requires_grad off), True unfreezes, None leaves as is
    lr_scale: float | None = None  # learning rate = schedule x lr_scale (None: 1)
    weight_decay: float | None = None  # None: optim.weight_decay; parameters exempt from decay stay at 0

    def matches(self, name: str) -> bool:
        return name == self.prefix or name.startswith(self.prefix.rstrip(".") + ".")
