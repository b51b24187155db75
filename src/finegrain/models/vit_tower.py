"""Dense-capable walk over open_clip's ``VisionTransformer`` (OpenAI / LAION style ViTs).

The tower reuses open_clip's modules and parameters as they are (so state dicts stay open_clip's) and
adds what open_clip hides: run-time position-embedding interpolation, a forward on a subset of patch
tokens with the indices to restore order, CLS->patch attention per layer and head, and dense features
whose last block runs without attention mixing (v-only, as MaskCLIP / CLIPSelf).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import DataError
from .tower import DENSE_MODES, DenseTower, TowerOutput, UnsupportedModelError


def interpolate_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int], new_grid: tuple[int, int],
                          num_prefix_tokens: int = 1) -> torch.Tensor:
    """Resize a position embedding ``(..., P + gh*gw, W)`` whose ``P = num_prefix_tokens`` prefix tokens (CLS)
    come first to ``new_grid``: the prefix is kept, the patch grid is resized by plain bicubic interpolation
    (``align_corners=False``, no antialiasing), as the FineCLIP, CLIPSelf and DetailCLIP releases resize
    (timm's ``resample_abs_pos_embed`` and open_clip's load-time resize antialias, which changes the result
    even when enlarging)."""
    if tuple(grid) == tuple(new_grid):
        return pos_embed
    prefix, patches = pos_embed[..., :num_prefix_tokens, :], pos_embed[..., num_prefix_tokens:, :]
    width = pos_embed.shape[-1]
    patches = patches.reshape(-1, *grid, width).permute(0, 3, 1, 2)
    patches = F.interpolate(patches.float(), size=tuple(new_grid), mode="bicubic", align_corners=False)
    patches = patches.permute(0, 2, 3, 1).reshape(*pos_embed.shape[:-2], new_grid[0] * new_grid[1], width)
    return torch.cat([prefix, patches.to(pos_embed.dtype)], dim=-2)


def order_indices(keep: torch.Tensor, num_patches: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For ``keep`` ``(B, K)`` patch indices, return ``(removed (B, N-K), restore (B, N))``.

    ``restore`` puts the sequence ``[kept in keep's order, removed in ascending order]`` back into raster
    order: ``torch.gather(seq, 1, restore)``.
    """
    batch, k = keep.shape
    rank = torch.full((batch, num_patches), num_patches, dtype=torch.long, device=keep.device)
    rank.scatter_(1, keep, torch.arange(k, device=keep.device).expand(batch, k))
    shuffle = torch.argsort(rank, dim=1, stable=True)
    return shuffle[:, k:], torch.argsort(shuffle, dim=1)


def restore_tokens(kept: torch.Tensor, restore: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """Scatter kept tokens ``(B, K, C)`` back to raster order ``(B, N, C)``; removed slots get ``fill`` ``(C,)``."""
    batch, k, channels = kept.shape
    num_patches = restore.shape[1]
    seq = torch.cat([kept, fill.to(kept.dtype).expand(batch, num_patches - k, channels)], dim=1)
    return torch.gather(seq, 1, restore.unsqueeze(-1).expand(-1, -1, channels))


def dense_map(feats: torch.Tensor, grid: tuple[int, int], restore: torch.Tensor | None = None) -> torch.Tensor:
    """Patch features ``(B, K, D)`` -> map ``(B, D, h, w)``; with ``restore`` (a kept-token pass) the K kept
    patches go to their places and removed ones are zero."""
    if restore is not None:
        feats = restore_tokens(feats, restore, feats.new_zeros(feats.shape[-1]))
    return feats.transpose(1, 2).reshape(feats.shape[0], -1, *grid)


def _qkv(block: ResidualAttentionBlock, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v of a block's attention on ``x`` ``(B, N, W)``, each ``(B, heads, N, W/heads)``."""
    attn = block.attn
    qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
    batch, n, _ = x.shape
    return qkv.view(batch, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)


def _finish_block(block: ResidualAttentionBlock, x: torch.Tensor, mixed: torch.Tensor) -> torch.Tensor:
    """The rest of the block after token mixing ``mixed`` ``(B, N, W)`` (before ``out_proj``): layer-scaled
    residual, then the MLP branch."""
    x = x + block.ls_1(block.attn.out_proj(mixed))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def _merge_heads(attended: torch.Tensor) -> torch.Tensor:
    """``(B, heads, N, W/heads)`` -> ``(B, N, W)``."""
    return attended.transpose(1, 2).flatten(2)


def block_forward(block: ResidualAttentionBlock, x: torch.Tensor) -> torch.Tensor:
    """The block's forward, computing what open_clip's does (``nn.MultiheadAttention``) with one SDPA call
    on batch-first heads: no sequence-first transposes or packed-projection copies. Hooks on the block
    itself do not fire (its sub-modules' do)."""
    q, k, v = _qkv(block, x)
    dropout = block.attn.dropout if block.training else 0.0
    return _finish_block(block, x, _merge_heads(F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)))


def block_with_cls_attention(block: ResidualAttentionBlock, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`block_forward` that also returns the CLS query's attention over the patch keys
    ``(B, heads, N-1)``. Only the CLS row of the attention matrix is formed; the block's output uses SDPA."""
    q, k, v = _qkv(block, x)
    cls_logits = (q[:, :, :1].float() @ k.float().transpose(-2, -1)) * q.shape[-1] ** -0.5
    cls_attention = cls_logits.softmax(dim=-1)[:, :, 0, 1:]
    return _finish_block(block, x, _merge_heads(F.scaled_dot_product_attention(q, k, v))), cls_attention


def block_v_only(block: ResidualAttentionBlock, x: torch.Tensor) -> torch.Tensor:
    """A block with attention replaced by each token attending to itself: ``out_proj(v_proj(ln_1(x)))``."""
    attn = block.attn
    width = x.shape[-1]
    return _finish_block(block, x, F.linear(block.ln_1(x), attn.in_proj_weight[2 * width:],
                                            attn.in_proj_bias[2 * width:]))


def block_indices(indices: int | Sequence[int], num_layers: int) -> list[int]:
    """timm's convention: an int n means the last n blocks; a sequence lists block indices, negative ones
    counting from the end. Returns sorted 0-based indices; out of range is an error."""
    if isinstance(indices, int):
        if not 1 <= indices <= num_layers:
            raise DataError(f"indices={indices}: ask for 1 to {num_layers} last blocks")
        return list(range(num_layers - indices, num_layers))
    chosen = sorted({i % num_layers if -num_layers <= i < num_layers else num_layers for i in indices})
    if not chosen or chosen[-1] >= num_layers:
        raise DataError(f"block indices {list(indices)} must lie in [-{num_layers}, {num_layers - 1}] "
                        f"(the tower has {num_layers} blocks)")
    return chosen


class OpenCLIPViTTower(DenseTower):
    """Dense API over an open_clip ``VisionTransformer``. Holds a reference, owns no parameters."""

    def __init__(self, visual: nn.Module):
        if not isinstance(visual, VisionTransformer):
            raise UnsupportedModelError(
                f"dense features need an open_clip VisionTransformer tower, got {type(visual).__name__} "
                "(timm-trunk towers have their own; ResNet towers are not supported)")
        problems = []
        if visual.attn_pool is not None:
            problems.append("attentional pooling (attentional_pool)")
        if visual.pool_type != "tok":
            problems.append(f"pool_type={visual.pool_type!r} (only 'tok' is supported)")
        if visual.final_ln_after_pool:
            problems.append("final_ln_after_pool=True")
        if any(not isinstance(b, ResidualAttentionBlock) for b in visual.transformer.resblocks):
            problems.append("custom attention blocks (qk_norm / scaled-cosine attention)")
        if visual.proj is None:
            problems.append("no projection (pruned head)")
        if problems:
            raise UnsupportedModelError("this open_clip ViT config is not supported for dense features: "
                                        + "; ".join(problems))
        self.visual = visual

    block_prefix = "transformer.resblocks"
    patch_embed_prefix = "conv1"
    post_prefixes = ("ln_post", "proj")

    @property
    def patch_size(self) -> tuple[int, int]:
        return tuple(self.visual.patch_size)

    @property
    def num_layers(self) -> int:
        return len(self.visual.transformer.resblocks)

    @property
    def num_heads(self) -> int:
        return self.visual.transformer.resblocks[0].attn.num_heads

    @property
    def width(self) -> int:
        return self.visual.transformer.width

    @property
    def blocks(self) -> list[nn.Module]:
        return list(self.visual.transformer.resblocks)

    def grid_size(self, image_hw: tuple[int, int]) -> tuple[int, int]:
        ph, pw = self.patch_size
        if image_hw[0] % ph or image_hw[1] % pw:
            raise DataError(f"image size {tuple(image_hw)} is not a multiple of the patch size {(ph, pw)}")
        return image_hw[0] // ph, image_hw[1] // pw

    def residual_branches(self, block: ResidualAttentionBlock) -> tuple[nn.Module, nn.Module]:
        return block.ls_1, block.ls_2

    def _embed(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Patch tokens with CLS and position embeddings, ``(B, 1+N, W)`` before ``ln_pre``."""
        visual = self.visual
        grid = self.grid_size(images.shape[-2:])
        x = visual.conv1(images).flatten(2).transpose(1, 2)
        cls = visual.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1)
        pos = interpolate_pos_embed(visual.positional_embedding, visual.grid_size, grid)
        return x + pos.to(x.dtype), grid

    def _run_block(self, block: nn.Module, fn, x: torch.Tensor):
        if self.visual.transformer.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(fn, block, x, use_reentrant=False)
        return fn(block, x)

    def _project(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.visual.ln_post(tokens) @ self.visual.proj

    def forward_intermediates(self, images: torch.Tensor, indices: int | Sequence[int] = 1,
                              norm: bool = False, v_only_last: bool = False) -> list[torch.Tensor]:
        """Patch-token outputs of chosen blocks as ``(B, W, h, w)`` maps (timm's ``forward_intermediates``).

        ``indices``: an int n takes the last n blocks; a sequence takes those block indices (0-based,
        negative counts from the end). ``norm`` applies the final LayerNorm (``ln_post``). ``v_only_last``:
        the last block, when chosen, runs without attention mixing (F-ViT's fourth map; :meth:`project_dense`
        of it is :meth:`forward`'s ``dense="v_only"`` map). Blocks after the last one asked for are not run.
        """
        chosen = block_indices(indices, self.num_layers)
        visual = self.visual
        x, grid = self._embed(images)
        x = visual.ln_pre(x)
        maps = []
        for i, block in enumerate(visual.transformer.resblocks[:max(chosen) + 1]):
            last = v_only_last and i == self.num_layers - 1
            x = self._run_block(block, block_v_only if last else block_forward, x)
            if i in chosen:
                patches = (visual.ln_post(x) if norm else x)[:, 1:]
                maps.append(patches.transpose(1, 2).reshape(x.shape[0], -1, *grid).contiguous())  # NCHW, as timm
        return maps

    def project_dense(self, tokens: torch.Tensor, grid: tuple[int, int],
                      restore: torch.Tensor | None = None) -> torch.Tensor:
        """Last-block patch tokens ``(B, K, W)`` (before ``ln_post``) -> projected, L2-normalised map
        ``(B, D, h, w)``; ``restore`` as :func:`dense_map`."""
        return dense_map(F.normalize(self._project(tokens), dim=-1), grid, restore)

    def forward(self, images: torch.Tensor, keep: torch.Tensor | None = None, cls_attention: bool = False,
                dense: str | None = None, tokens: bool = False) -> TowerOutput:
        """Run the tower once and return what was asked for.

        Args:
            images: ``(B, 3, H, W)``; H and W multiples of the patch size (position embeddings are
                interpolated for sizes other than the model's).
            keep: ``(B, K)`` indices of the patches to encode (CLS always kept); None keeps all.
            cls_attention: also return CLS->patch attention of every layer, ``(B, L, heads, K)``.
            dense: ``"v_only"`` or ``"plain"``: also return projected, L2-normalised patch features
                ``(B, D, h, w)``. ``v_only`` runs the last block without attention mixing; blocks before it
                are shared with the global path. With ``keep``, the map holds the kept patches (of the
                kept-token pass) at their places and zeros at the removed ones.
            tokens: also return all output tokens after ``ln_post``, unprojected, ``(B, 1+K, W)``.
        """
        if dense is not None and dense not in DENSE_MODES:
            raise ValueError(f"dense must be one of {DENSE_MODES}, got {dense!r}")
        visual = self.visual
        x, grid = self._embed(images)
        out = TowerOutput(grid_size=grid)
        if keep is not None:
            _, out.restore = order_indices(keep, x.shape[1] - 1)
            patches = torch.gather(x[:, 1:], 1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
            x = torch.cat([x[:, :1], patches], dim=1)
        elif dense is None and not cls_attention:
            x = visual.patch_dropout(x)  # FLIP-style speed-up for the global path only (train mode)
        x = visual.ln_pre(x)

        blocks = visual.transformer.resblocks
        attentions = []
        for i, block in enumerate(blocks):
            if dense == "v_only" and i == len(blocks) - 1:
                dense_tokens = self._run_block(block, block_v_only, x)[:, 1:]
            if cls_attention:
                x, attn = self._run_block(block, block_with_cls_attention, x)
                attentions.append(attn)
            else:
                x = self._run_block(block, block_forward, x)

        if dense == "plain":
            dense_tokens = x[:, 1:]
        out.image_embed = self._project(x[:, 0])
        if tokens:
            out.tokens = visual.ln_post(x)
        if cls_attention:
            out.cls_attention = torch.stack(attentions, dim=1)
        if dense is not None:
            out.dense = self.project_dense(dense_tokens, grid, out.restore)
        return out
