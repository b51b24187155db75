"""A method exercising the trainer hooks (EMA teacher, evaluated/exported model, an unused parameter,
DDP options), registered for the tests as ``ema_clip_test``."""

import torch
from torch import nn

from finegrain.models import EMATeacher
from finegrain.objectives import register_method
from finegrain.objectives.clip import CLIP
from finegrain.param_rules import ParamRule


@register_method("ema_clip_test")
class EMAClip(CLIP):
    def __init__(self, options, model):
        super().__init__(options, model)
        self.teacher = EMATeacher({"visual": model.clip.visual})
        self.unused = nn.Parameter(torch.zeros(3))  # trainable, never in a loss

    def after_step(self, model, progress):
        self.teacher.update({"visual": model.clip.visual}, momentum=0.5)

    def ddp_options(self):
        return {"find_unused_parameters": True}

    def param_rules(self):
        return [ParamRule("model.clip.visual.conv1", trainable=False), ParamRule("method.unused", lr_scale=0.5)]

    def eval_model(self, model):
        return model.with_visual(self.teacher["visual"])


@register_method("noisy_clip_test")
class NoisyClip(CLIP):
    """CLIP whose image features get random noise (as masking or dropout would draw), with a bool feature;
    every features call is recorded."""

    def __init__(self, options, model):
        super().__init__(options, model)
        self.calls = []

    def features(self, model, batch, progress):
        out = super().features(model, batch, progress)
        out["image"] = torch.nn.functional.normalize(out["image"] + 0.1 * torch.randn_like(out["image"]), dim=-1)
        out["keep"] = torch.rand(len(out["image"])) > 0.5
        self.calls.append({k: v.detach().clone() for k, v in out.items()})
        return out


@register_method("extra_eval_test")
class ExtraEvalClip(CLIP):
    """CLIP that also evaluates a frozen copy of its initial vision tower, as "teacher"."""

    def __init__(self, options, model):
        super().__init__(options, model)
        self.teacher = EMATeacher({"visual": model.clip.visual})

    def extra_eval_models(self, model):
        return {"teacher": model.with_visual(self.teacher["visual"])}
