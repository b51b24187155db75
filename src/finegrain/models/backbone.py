"""A finegrain vision tower as the multi-scale backbone of a dense head (segmentation, detection).

:class:`ViTBackbone` takes chosen blocks' patch maps from any dense tower (open_clip ViT, timm Eva / ViT
trunks) at any input size and, as BEiT / iBOT / ViTDet do, turns the single-stride maps into a pyramid
with :class:`SimpleFeaturePyramid`. :func:`layer_decay_param_groups` gives the layer-wise learning-rate
decay groups of the BEiT fine-tuning protocol (:func:`layer_decay_rules`: the same as parameter rules, for
finegrain's trainer, as iBOT's release applies them). Nothing here knows a task or a head.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from timm.layers import drop_path
from torch import nn

from ..errors import DataError
from ..param_rules import ParamRule
from .clip import FinegrainCLIP
from .vit_tower import block_indices

# Blocks 4, 6, 8 and 12 of a 12-block tower (BEiT / iBOT: out_indices 3, 5, 7, 11); deeper towers take the
# same fractions of their depth.
DEFAULT_BLOCK_FRACTIONS = (1 / 3, 1 / 2, 2 / 3, 1.0)
# position and class embeddings (timm's and open_clip's names): no weight decay in layer_decay_param_groups (BEiT's
# rule as written; iBOT's release decays them, see layer_decay_rules)
NO_DECAY_SUFFIXES = ("pos_embed", "cls_token", "positional_embedding", "class_embedding")


def fraction_block(num_layers: int, fraction: float) -> int:
    """The 0-based block at ``fraction`` of the depth: ``round(L f) - 1``, at least 0."""
    return max(round(num_layers * fraction) - 1, 0)


def default_block_indices(num_layers: int) -> list[int]:
    """0-based indices of the blocks at :data:`DEFAULT_BLOCK_FRACTIONS` of the depth: ``[3, 5, 7, 11]`` for
    12 blocks, ``[7, 11, 15, 23]`` for 24."""
    return [fraction_block(num_layers, f) for f in DEFAULT_BLOCK_FRACTIONS]


class SimpleFeaturePyramid(nn.Module):
    """Four single-stride ViT maps -> strides ``s/4, s/2, s, 2s`` (``s`` the patch size), channels kept.

    As in BEiT / iBOT's segmentation backbone: two 2x2 transposed convolutions with BatchNorm and GELU
    between them (x4), one transposed convolution (x2), identity, 2x2 max-pooling (x1/2).
    """

    def __init__(self, width: int):
        super().__init__()
        self.up4 = nn.Sequential(nn.ConvTranspose2d(width, width, 2, stride=2), nn.BatchNorm2d(width), nn.GELU(),
                                 nn.ConvTranspose2d(width, width, 2, stride=2))
        self.up2 = nn.ConvTranspose2d(width, width, 2, stride=2)
        self.same = nn.Identity()
        self.down2 = nn.MaxPool2d(2, stride=2)

    def forward(self, maps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Four ``(B, W, h, w)`` maps (shallow to deep) -> ``(B, W, 4h, 4w)``, ``(B, W, 2h, 2w)``,
        ``(B, W, h, w)``, ``(B, W, h/2, w/2)``."""
        if len(maps) != 4:
            raise ValueError(f"the simple feature pyramid takes 4 block maps, got {len(maps)}")
        return [layer(x) for layer, x in zip((self.up4, self.up2, self.same, self.down2), maps)]


class ViTBackbone(nn.Module):
    """A :class:`FinegrainCLIP`'s vision tower returning feature maps for a dense head.

    ``forward(images)`` gives an ordered dict ``{"0": ..., "1": ..., ...}`` (torchvision's backbone
    convention, so ``torchvision.ops.FeaturePyramidNetwork`` and its detectors take it), each ``(B, W, h_i,
    w_i)`` with ``W`` = :attr:`out_channels` and strides :attr:`strides`.

    Args:
        model: the CLIP whose vision tower to use (its text tower is not kept).
        block_indices: the blocks to read: 0-based ints (negative from the end) or fractions of the depth (floats
            in (0, 1]); default :func:`default_block_indices`. A block may be read for several levels.
        pyramid: pass four block maps through a :class:`SimpleFeaturePyramid` (strides patch/4 .. 2*patch);
            False returns the block maps as they are (all at the patch stride).
        drop_path_rate: stochastic depth, rising linearly over the blocks from 0 to this rate (training only).
        own_tower: register the vision tower as this module's ``visual`` (its parameters, state dict); False
            when a module holding the backbone also holds the model (a fine-tuning method beside its model).
        v_only_last: the tower's last block, when read, runs without attention mixing (F-ViT's backbone).
        final_norm: every block map passes through the tower's final norm (open_clip's ``ln_post``, timm's
            ``norm``), one module shared by all maps and trained with them (iBOT's ``out_with_norm``); the
            residual stream the next block reads is not normalised.

    The tower's parameters keep their open_clip names under ``visual.``; the parameters after the last block
    (final norm, projection) are not used and are frozen so that DDP sees no unused trainable parameter, except
    the final norm with ``final_norm``.
    """

    def __init__(self, model: FinegrainCLIP, block_indices: Sequence[int | float] | None = None, pyramid: bool = True,
                 drop_path_rate: float = 0.0, own_tower: bool = True, v_only_last: bool = False,
                 final_norm: bool = False):
        super().__init__()
        if own_tower:
            self.visual = model.visual
        else:  # the tower stays the model's only (a module holding both saves and counts it once)
            self._visual = [model.visual]
        self.tower = model.tower
        layers = self.tower.num_layers
        self.block_indices = _checked_indices(block_indices, layers, pyramid)
        self.v_only_last, self.final_norm = v_only_last, final_norm
        self.pyramid = SimpleFeaturePyramid(self.tower.width) if pyramid else None
        names = [name for name, _ in self.tower_module.named_parameters()]
        # the tower's post-block prefixes that hold parameters (EVA02 has no fc_norm ones), frozen but the final
        # norm when the maps use it
        used = (self.tower.post_prefixes[0],) if final_norm else ()
        self.post_prefixes = [p for p in self.tower.post_prefixes
                              if p not in used and any(_under(name, (p,)) for name in names)]
        for name, param in self.tower_module.named_parameters():
            if _under(name, self.post_prefixes):
                param.requires_grad_(False)
        if not 0.0 <= drop_path_rate < 1.0:
            raise DataError(f"drop_path_rate must lie in [0, 1), got {drop_path_rate}")
        for i, block in enumerate(self.tower.blocks):
            rate = drop_path_rate * i / max(layers - 1, 1)
            if rate > 0:
                for branch in self.tower.residual_branches(block):
                    branch.register_forward_hook(_drop_path_hook(rate))

    @property
    def tower_module(self) -> nn.Module:
        """The vision tower (open_clip's ``visual``), registered here or not (``own_tower``)."""
        return self.visual if hasattr(self, "visual") else self._visual[0]

    @property
    def out_channels(self) -> int:
        return self.tower.width

    @property
    def strides(self) -> list[float]:
        """Input pixels per feature-map cell of each output (3.5 for a patch-14 tower's x4 level)."""
        patch = self.tower.patch_size[0]
        if self.pyramid is None:
            return [patch] * len(self.block_indices)
        return [patch / 4, patch / 2, patch, patch * 2]

    def block_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """``(B, 3, H, W)`` -> the chosen blocks' maps ``(B, W, H/p, W/p)``, before the pyramid (a block chosen for
        several levels gives each the same map)."""
        unique = sorted(set(self.block_indices))
        maps = self.tower.forward_intermediates(images, unique, norm=self.final_norm, v_only_last=self.v_only_last)
        return [maps[unique.index(i)] for i in self.block_indices]

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        """``(B, 3, H, W)``, H and W multiples of the patch size (of twice it with the pyramid) -> maps."""
        maps = self.block_maps(images)
        if self.pyramid is not None:
            maps = self.pyramid(maps)
        return OrderedDict((str(i), m) for i, m in enumerate(maps))


def _checked_indices(indices: Sequence[int | float] | None, num_layers: int, pyramid: bool) -> list[int]:
    """Sorted 0-based blocks: ints are indices (negative from the end), floats in (0, 1] fractions of the depth
    (``f`` -> block ``round(L f) - 1``, so ``[1/3, 1/2, 2/3, 1.0]`` is ``[3, 5, 7, 11]`` of 12 and ``[0, 1, 2, 3]`` of
    4). A shallow tower may read one block for several levels (2 blocks: ``[0, 0, 0, 1]``)."""
    if indices is None:
        return default_block_indices(num_layers)
    chosen = []
    for index in indices:
        if isinstance(index, float):
            if not 0 < index <= 1:
                raise DataError(f"block fractions must lie in (0, 1] (of the tower's {num_layers} blocks), got {index}")
            chosen.append(fraction_block(num_layers, index))
        else:
            chosen += block_indices([index], num_layers)
    if pyramid and len(chosen) != 4:
        raise DataError(f"the simple feature pyramid reads 4 blocks (indices or fractions of the depth), got "
                        f"{list(indices)}")
    return sorted(chosen)


def _under(name: str, prefixes: Sequence[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _drop_path_hook(rate: float):
    def hook(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        return drop_path(output, rate, module.training)
    return hook


def parameter_layer(name: str, block_prefix: str, num_layers: int, post_prefixes: Sequence[str] = ()) -> int:
    """The layer id of a :class:`ViTBackbone` parameter for layer-wise decay (BEiT's rule): 0 for the
    embeddings (everything of the tower before its blocks), ``i + 1`` for block ``i``, ``num_layers + 1`` for
    what follows the blocks (the tower's ``post_prefixes``, e.g. its final norm; pyramid, heads)."""
    if not name.startswith("visual."):
        return num_layers + 1
    inner = name[len("visual."):]
    if inner.startswith(block_prefix + "."):
        return int(inner[len(block_prefix) + 1:].split(".")[0]) + 1
    return num_layers + 1 if _under(inner, post_prefixes) else 0


def layer_decay_rules(backbone: ViTBackbone, prefix: str, layer_decay: float) -> list[ParamRule]:
    """Layer-wise learning-rate decay as parameter rules, for a training module in which the backbone's tower is
    named ``prefix`` (e.g. ``"model.clip.visual"``): one rule per tower parameter, ``lr_scale = layer_decay **
    (L + 1 - layer)`` (:func:`parameter_layer`); everything else (pyramid, heads) keeps scale 1. Weight decay
    is the trainer's (none on tensors of rank < 2 and biases): position and class embeddings of rank 2 or more
    are decayed, as in iBOT's release (its exemption by name never matched the prefixed names)."""
    tower, rules = backbone.tower, []
    for name, _ in backbone.tower_module.named_parameters():
        layer = parameter_layer(f"visual.{name}", tower.block_prefix, tower.num_layers, tower.post_prefixes)
        rules.append(ParamRule(f"{prefix}.{name}", lr_scale=layer_decay ** (tower.num_layers + 1 - layer)))
    return rules


def layer_decay_param_groups(module: nn.Module, backbone: ViTBackbone, lr: float, weight_decay: float,
                             layer_decay: float, no_weight_decay: Sequence[str] = ()) -> list[dict]:
    """AdamW parameter groups with layer-wise learning-rate decay, for a module holding ``backbone``.

    A parameter of layer ``l`` (:func:`parameter_layer`, names relative to ``backbone`` found inside
    ``module``) gets ``lr * layer_decay ** (L + 1 - l)``, L the number of blocks: the head trains at ``lr``,
    the embeddings at ``lr * layer_decay ** (L + 1)``. Weight decay is 0 for rank < 2 tensors (norms,
    biases, class and position embeddings of open_clip) and names ending in one of ``no_weight_decay``
    (default: timm's ``pos_embed`` / ``cls_token``); else ``weight_decay``. Each group carries ``lr_scale``
    and ``layer_id``; frozen parameters are left out.
    """
    prefix = next((n + "." for n, m in module.named_modules() if m is backbone), None)
    if prefix is None:
        raise ValueError("layer_decay_param_groups: the backbone is not a submodule of the module")
    prefix = "" if prefix == "." else prefix
    exempt_suffixes = tuple(no_weight_decay) or NO_DECAY_SUFFIXES
    num_layers = backbone.tower.num_layers
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        inner = name[len(prefix):] if name.startswith(prefix) else ""
        layer = (parameter_layer(inner, backbone.tower.block_prefix, num_layers, backbone.tower.post_prefixes)
                 if inner else num_layers + 1)
        decay = param.ndim >= 2 and not name.endswith(exempt_suffixes)
        group = groups.setdefault((layer, decay), {
            "params": [], "names": [], "layer_id": layer, "weight_decay": weight_decay if decay else 0.0,
            "lr_scale": layer_decay ** (num_layers + 1 - layer)})
        group["params"].append(param)
        group["names"].append(name)
    for group in groups.values():
        group["lr"] = lr * group["lr_scale"]
    return [groups[k] for k in sorted(groups)]
