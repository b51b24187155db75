"""The contract every dense-capable vision tower implements, and the dispatcher that picks one.

Objectives and evaluators talk to :class:`finegrain.models.FinegrainCLIP`, which talks to a tower through
this contract only; a new backbone family (e.g. timm EVA02 trunks) plugs in by adding a tower class and
picking it in ``finegrain.models.clip.build_tower``. This module imports no tower implementation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from ..errors import DataError

DENSE_MODES = ("v_only", "plain")


class UnsupportedModelError(DataError):
    """The model's architecture cannot provide the requested dense features."""


@dataclass
class TowerOutput:
    """What one tower pass returns; fields not asked for stay None.

    image_embed: ``(B, D)`` projected global embedding (not normalised).
    tokens: ``(B, 1+K, W)`` all tokens after the final norm, unprojected (CLS first).
    dense: ``(B, D, h, w)`` projected, L2-normalised patch features (with ``keep``: the kept patches at their
    places, zeros at the removed ones).
    cls_attention: ``(B, L, heads, K)`` CLS-query attention over patch keys, per layer and head.
    restore: ``(B, N)`` indices putting ``[kept, removed]`` back in raster order (when ``keep`` given).
    grid_size: ``(h, w)`` patch grid of the input.
    """

    grid_size: tuple[int, int]
    image_embed: torch.Tensor | None = None
    tokens: torch.Tensor | None = None
    dense: torch.Tensor | None = None
    cls_attention: torch.Tensor | None = None
    restore: torch.Tensor | None = None


class DenseTower(Protocol):
    """A vision tower's dense API (see :class:`finegrain.models.vit_tower.OpenCLIPViTTower`). Objectives
    reach the vision tower only through this contract (``model.tower``) and ``FinegrainCLIP``'s methods."""

    patch_size: tuple[int, int]
    num_layers: int
    num_heads: int
    width: int  # token width of the blocks
    blocks: list  # the transformer blocks, in order (regional compilation compiles each)
    # parameter-name prefixes, relative to the vision tower module: its transformer blocks and its patch
    # embedding (for rules such as "train the blocks only" or "freeze the patch embedding")
    block_prefix: str
    patch_embed_prefix: str
    # parameter-name prefixes of what follows the blocks (final norm, pooling, projection): unused by
    # block feature maps (``forward_intermediates``), so a dense backbone freezes them
    post_prefixes: tuple[str, ...]

    def grid_size(self, image_hw: tuple[int, int]) -> tuple[int, int]: ...

    def residual_branches(self, block: nn.Module) -> tuple[nn.Module, nn.Module]:
        """The block's submodules whose outputs are added to the residual stream (attention, MLP), where
        stochastic depth applies."""
        ...

    def forward(self, images: torch.Tensor, keep: torch.Tensor | None = None, cls_attention: bool = False,
                dense: str | None = None, tokens: bool = False) -> TowerOutput: ...

    def forward_intermediates(self, images: torch.Tensor, indices: int | Sequence[int] = 1,
                              norm: bool = False, v_only_last: bool = False) -> list[torch.Tensor]: ...

    def project_dense(self, tokens: torch.Tensor, grid: tuple[int, int],
                      restore: torch.Tensor | None = None) -> torch.Tensor: ...
