"""Dense-capable walk over open_clip's ``TimmModel`` towers whose trunk is a timm ``Eva`` (EVA02-CLIP) or a
timm ``VisionTransformer`` (e.g. DetailCLIP's student).

Like :mod:`finegrain.models.vit_tower`, the tower reuses timm's modules and parameters as they are (state
dicts stay open_clip's) and adds run-time position-embedding resizing (absolute and rotary), a forward on a
subset of patch tokens (rotary embeddings follow the kept tokens), CLS->patch attention per layer and head,
v-only dense features and intermediate block outputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from open_clip.timm_model import TimmModel
from timm.layers import PatchEmbed, RotaryEmbeddingCat, apply_rot_embed_cat
from timm.layers.attention import Attention
from timm.models.eva import Eva, EvaAttention, EvaBlock
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import DataError
from .tower import DENSE_MODES, DenseTower, TowerOutput, UnsupportedModelError
from .vit_tower import block_indices, dense_map, interpolate_pos_embed, order_indices


def rope_for_grid(rope: RotaryEmbeddingCat | None, grid: tuple[int, int]) -> torch.Tensor | None:
    """Eva's concatenated sin/cos rotary embedding ``(h*w, 2*dim)`` for a patch grid, as timm's
    ``set_input_size`` would rebuild it; None without RoPE. With ``ref_feat_shape`` (EVA02-CLIP: 16x16) the
    positions of a ``g``-long axis are ``arange(g) / g * ref``: the EVA-CLIP release's rebuild at a new size
    (``VisionRotaryEmbeddingFast.recalculate``, square grids only there), per axis here."""
    if rope is None:
        return None
    if rope.feat_shape is None:  # timm's dynamic_img_size mode: built per call
        return rope.get_embed(shape=list(grid))
    if tuple(rope.feat_shape) == tuple(grid):
        return rope.get_embed()
    return rope._build_embed_cat(list(grid), rope.bands, dtype=rope.pos_embed.dtype)


def _split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """``(B, N, heads*d)`` -> ``(B, heads, N, d)``."""
    return t.unflatten(-1, (heads, -1)).transpose(1, 2)


def _v_proj(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The value projection alone, with its bias: ``(B, N, W)`` -> ``(B, N, heads*d)``."""
    if isinstance(attn, EvaAttention):
        if attn.qkv is None:
            return attn.v_proj(x)
        return F.linear(x, attn.qkv.weight.chunk(3)[2], attn.v_bias)
    bias = None if attn.qkv.bias is None else attn.qkv.bias.chunk(3)[2]
    return F.linear(x, attn.qkv.weight.chunk(3)[2], bias)


def _qkv(attn: nn.Module, x: torch.Tensor, rope: torch.Tensor | None):
    """q, k, v ``(B, heads, N, d)`` of a timm ``Attention`` / ``EvaAttention`` on normed ``x`` ``(B, N, W)``,
    after q/k norms and (Eva) RoPE on the patch tokens; ``rope`` is ``(N-1, 2*dim)`` or ``(B, 1, N-1, 2*dim)``."""
    if isinstance(attn, EvaAttention):
        if attn.qkv is None:
            q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
        else:
            bias = None if attn.q_bias is None else torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
            q, k, v = F.linear(x, attn.qkv.weight, bias).chunk(3, dim=-1)
    else:
        q, k, v = attn.qkv(x).chunk(3, dim=-1)
    q, k, v = (_split_heads(t, attn.num_heads) for t in (q, k, v))
    q, k = attn.q_norm(q), attn.k_norm(k)
    if rope is not None:
        half = attn.rotate_half
        q = torch.cat([q[:, :, :1], apply_rot_embed_cat(q[:, :, 1:], rope, half=half)], dim=2).type_as(v)
        k = torch.cat([k[:, :, :1], apply_rot_embed_cat(k[:, :, 1:], rope, half=half)], dim=2).type_as(v)
    return q, k, v


def _layer_scales(block: nn.Module):
    """The block's two layer-scale maps (timm ``ls1``/``ls2`` or Eva's ``gamma_1``/``gamma_2``)."""
    if isinstance(block, EvaBlock):
        return [(lambda t, g=g: t if g is None else g * t) for g in (block.gamma_1, block.gamma_2)]
    return [block.ls1, block.ls2]


def _finish_block(block: nn.Module, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
    """The rest of a block after attention mixing: ``attn_out`` ``(B, N, heads*d)`` -> sub-LN (``attn.norm``),
    output projection, layer-scale, residual; then the MLP branch."""
    attn = block.attn
    ls_1, ls_2 = _layer_scales(block)
    x = x + block.drop_path1(ls_1(attn.proj_drop(attn.proj(attn.norm(attn_out)))))
    return x + block.drop_path2(ls_2(block.mlp(block.norm2(x))))


def block_forward(block: nn.Module, x: torch.Tensor, rope: torch.Tensor | None) -> torch.Tensor:
    """The block's own forward (timm's, SDPA inside)."""
    return block(x, rope=rope) if isinstance(block, EvaBlock) else block(x)


def block_with_cls_attention(block: nn.Module, x: torch.Tensor, rope: torch.Tensor | None):
    """One block's forward that also returns the CLS query's attention over the patch keys
    ``(B, heads, N-1)`` (explicit softmax of the CLS row only, RoPE applied); the output uses SDPA."""
    attn = block.attn
    q, k, v = _qkv(attn, block.norm1(x), rope)
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    cls_logits = (q[:, :, :1].float() @ k.float().transpose(-2, -1)) * q.shape[-1] ** -0.5
    cls_attention = cls_logits.softmax(dim=-1)[:, :, 0, 1:]
    return _finish_block(block, x, out.transpose(1, 2).flatten(2)), cls_attention


def block_v_only(block: nn.Module, x: torch.Tensor, rope: torch.Tensor | None = None) -> torch.Tensor:
    """A block with attention replaced by each token attending to itself: the v projection (with bias), then
    sub-LN, output projection, layer-scale and MLP as in the block (RoPE does not touch v)."""
    return _finish_block(block, x, _v_proj(block.attn, block.norm1(x)))


def _trunk_problems(trunk: nn.Module) -> list[str]:
    """Why a timm Eva / VisionTransformer trunk cannot give dense features (empty when it can)."""
    problems = []
    if trunk.global_pool != "token":
        problems.append(f"global_pool={trunk.global_pool!r} (only 'token' is supported)")
    if trunk.cls_token is None or trunk.num_prefix_tokens != 1:
        problems.append("prefix tokens other than one class token (register tokens or no class token)")
    if getattr(trunk, "attn_pool", None) is not None:
        problems.append("attention pooling ('map')")
    if not isinstance(trunk.patch_embed, PatchEmbed) or trunk.patch_embed.dynamic_img_pad:
        problems.append("patch embedding other than timm's PatchEmbed without padding")
    if isinstance(trunk, Eva):
        if trunk.rope_mixed or not isinstance(trunk.rope, (RotaryEmbeddingCat, type(None))):
            problems.append(f"rotary embedding {type(trunk.rope).__name__} (only 'cat' RoPE is supported)")
        elif trunk.rope is not None and trunk.rope.aug_active:
            problems.append("RoPE coordinate augmentation")
        if any(type(b) is not EvaBlock or type(b.attn) is not EvaAttention or b.attn.gate is not None
               for b in trunk.blocks):
            problems.append("Eva blocks other than pre-norm EvaBlock with ungated EvaAttention")
    elif any(type(b) is not Block or type(b.attn) is not Attention or b.attn.gate is not None
             for b in trunk.blocks):
        problems.append("ViT blocks other than timm's Block with ungated Attention")
    return problems


class TimmTower(DenseTower):
    """Dense API over an open_clip ``TimmModel`` with a timm ``Eva`` or ``VisionTransformer`` trunk (class
    token pooling; the projection is the trunk's head and/or open_clip's ``head``). Owns no parameters."""

    def __init__(self, visual: nn.Module):
        if not isinstance(visual, TimmModel):
            raise UnsupportedModelError(f"TimmTower needs an open_clip TimmModel, got {type(visual).__name__}")
        trunk = visual.trunk
        if not isinstance(trunk, (Eva, VisionTransformer)):
            raise UnsupportedModelError(f"dense features need a timm Eva or VisionTransformer trunk, got "
                                        f"{type(trunk).__name__}")
        problems = _trunk_problems(trunk)
        if "pool" in visual.head:
            problems.append("open_clip attention pooling head (timm_pool 'abs_attn' / 'rot_attn')")
        if problems:
            raise UnsupportedModelError(f"this timm trunk ({type(trunk).__name__}) is not supported for dense "
                                        "features: " + "; ".join(problems))
        self.visual = visual
        self.trunk = trunk

    block_prefix = "trunk.blocks"
    patch_embed_prefix = "trunk.patch_embed"
    post_prefixes = ("trunk.norm", "trunk.fc_norm", "trunk.head", "head")

    @property
    def patch_size(self) -> tuple[int, int]:
        return tuple(self.trunk.patch_embed.patch_size)

    @property
    def num_layers(self) -> int:
        return len(self.trunk.blocks)

    @property
    def num_heads(self) -> int:
        return self.trunk.blocks[0].attn.num_heads

    @property
    def width(self) -> int:
        return self.trunk.embed_dim

    @property
    def blocks(self) -> list[nn.Module]:
        return list(self.trunk.blocks)

    def grid_size(self, image_hw: tuple[int, int]) -> tuple[int, int]:
        ph, pw = self.patch_size
        if image_hw[0] % ph or image_hw[1] % pw:
            raise DataError(f"image size {tuple(image_hw)} is not a multiple of the patch size {(ph, pw)}")
        return image_hw[0] // ph, image_hw[1] // pw

    def residual_branches(self, block: nn.Module) -> tuple[nn.Module, nn.Module]:
        return block.drop_path1, block.drop_path2

    def _embed(self, images: torch.Tensor):
        """``(B, 1+N, W)`` tokens with CLS and absolute position embeddings (before ``norm_pre``), the
        rotary embedding ``(N, 2*dim)`` of the grid (None without RoPE) and the grid."""
        trunk = self.trunk
        grid = self.grid_size(images.shape[-2:])
        x = trunk.patch_embed.norm(trunk.patch_embed.proj(images).flatten(2).transpose(1, 2))
        cls = trunk.cls_token.expand(x.shape[0], -1, -1)  # not cast: under autocast the stream is fp32, as timm's
        pos = trunk.pos_embed
        if pos is not None:
            pos = interpolate_pos_embed(pos, trunk.patch_embed.grid_size, grid,
                                        num_prefix_tokens=0 if trunk.no_embed_class else trunk.num_prefix_tokens)
        if pos is not None and trunk.no_embed_class:
            x = torch.cat([cls, x + pos], dim=1)
        else:
            x = torch.cat([cls, x], dim=1)
            x = x if pos is None else x + pos
        rope = rope_for_grid(trunk.rope, grid) if isinstance(trunk, Eva) else None
        return trunk.pos_drop(x), rope, grid

    def _run_block(self, block: nn.Module, fn, x: torch.Tensor, rope: torch.Tensor | None):
        if self.trunk.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(fn, block, x, rope, use_reentrant=False)
        return fn(block, x, rope)

    def _project(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens after the trunk's final norm ``(..., W)`` -> ``(..., D)`` (fc_norm, trunk head, open_clip head)."""
        trunk = self.trunk
        return self.visual.head(trunk.head(trunk.head_drop(trunk.fc_norm(tokens))))

    def _patch_dropout_keep(self, batch: int, num_patches: int, device: torch.device) -> torch.Tensor | None:
        """Random kept-patch indices ``(B, K)`` of the trunk's own patch dropout (training only), as timm's."""
        drop = getattr(self.trunk, "patch_drop", None)
        prob = getattr(drop, "prob", 0.0)
        if drop is None or not self.trunk.training or prob == 0.0:
            return None
        num_keep = max(1, int(num_patches * (1.0 - prob)))
        keep = torch.argsort(torch.randn(batch, num_patches, device=device), dim=-1)[:, :num_keep]
        return keep.sort(dim=-1)[0] if drop.ordered else keep

    def forward_intermediates(self, images: torch.Tensor, indices: int | Sequence[int] = 1,
                              norm: bool = False, v_only_last: bool = False) -> list[torch.Tensor]:
        """Patch-token outputs of chosen blocks as ``(B, W, h, w)`` maps (timm's ``forward_intermediates``).

        ``indices``: an int n takes the last n blocks; a sequence takes those block indices (0-based,
        negative counts from the end). ``norm`` applies the trunk's final norm. ``v_only_last``: the last
        block, when chosen, runs without attention mixing (see
        :meth:`finegrain.models.vit_tower.OpenCLIPViTTower.forward_intermediates`). Later blocks are not run.
        """
        chosen = block_indices(indices, self.num_layers)
        x, rope, grid = self._embed(images)
        x = self.trunk.norm_pre(x)
        maps = []
        for i, block in enumerate(self.trunk.blocks[:max(chosen) + 1]):
            last = v_only_last and i == self.num_layers - 1
            x = self._run_block(block, block_v_only if last else block_forward, x, rope)
            if i in chosen:
                patches = (self.trunk.norm(x) if norm else x)[:, 1:]
                maps.append(patches.transpose(1, 2).reshape(x.shape[0], -1, *grid).contiguous())  # NCHW, as timm
        return maps

    def project_dense(self, tokens: torch.Tensor, grid: tuple[int, int],
                      restore: torch.Tensor | None = None) -> torch.Tensor:
        """Last-block patch tokens ``(B, K, W)`` (before the final norm) -> projected, L2-normalised map
        ``(B, D, h, w)``; ``restore`` as :func:`~finegrain.models.vit_tower.dense_map`."""
        return dense_map(F.normalize(self._project(self.trunk.norm(tokens)), dim=-1), grid, restore)

    def forward(self, images: torch.Tensor, keep: torch.Tensor | None = None, cls_attention: bool = False,
                dense: str | None = None, tokens: bool = False) -> TowerOutput:
        """Run the tower once and return what was asked for; arguments as
        :meth:`finegrain.models.vit_tower.OpenCLIPViTTower.forward`. With ``keep``, the rotary embeddings of
        the kept positions are gathered with the tokens."""
        if dense is not None and dense not in DENSE_MODES:
            raise ValueError(f"dense must be one of {DENSE_MODES}, got {dense!r}")
        trunk = self.trunk
        x, rope, grid = self._embed(images)
        out = TowerOutput(grid_size=grid)
        keep_given = keep is not None
        if keep is None and dense is None and not cls_attention:
            keep = self._patch_dropout_keep(x.shape[0], x.shape[1] - 1, x.device)
        if keep is not None:
            _, order = order_indices(keep, x.shape[1] - 1)
            out.restore = order if keep_given else None
            patches = torch.gather(x[:, 1:], 1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
            x = torch.cat([x[:, :1], patches], dim=1)
            if rope is not None:
                rope = rope[keep].unsqueeze(1)  # (B, 1, K, 2*dim): broadcast over heads
        x = trunk.norm_pre(x)

        attentions = []
        for i, block in enumerate(trunk.blocks):
            if dense == "v_only" and i == len(trunk.blocks) - 1:
                dense_tokens = self._run_block(block, block_v_only, x, rope)[:, 1:]
            if cls_attention:
                x, attn = self._run_block(block, block_with_cls_attention, x, rope)
                attentions.append(attn)
            else:
                x = self._run_block(block, block_forward, x, rope)

        if dense == "plain":
            dense_tokens = x[:, 1:]
        x = trunk.norm(x)
        out.image_embed = self._project(x[:, 0])
        if tokens:
            out.tokens = x
        if cls_attention:
            out.cls_attention = torch.stack(attentions, dim=1)
        if dense is not None:
            out.dense = self.project_dense(dense_tokens, grid, out.restore)
        return out
