"""The dense-model contract, checked for every ViT family and config we ship (timm-style), against
references computed with open_clip's own modules."""

import json
import math

import open_clip
import pytest
import torch
import torch.nn.functional as F

from finegrain.models import (
    UnsupportedModelError,
    create_model,
    interpolate_pos_embed,
    model_from_checkpoint,
    order_indices,
    restore_tokens,
)

BASE = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}


def variant(tmp_path, name, **vision):
    cfg = json.loads(json.dumps(BASE))
    top = {k: vision.pop(k) for k in list(vision) if k in ("quick_gelu",)}
    cfg["vision_cfg"].update(vision)
    cfg.update(top)
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return str(path)


VARIANTS = {
    "finegrain-test": None,
    "finegrain-tiny": None,
    "detailclip-tiny": None,
    "layerscale": {"ls_init_value": 0.1},
    "quickgelu-no-ln-pre": {"quick_gelu": True, "no_ln_pre": True},
    "rectangular": {"image_size": [32, 48]},
}


@pytest.fixture(params=sorted(VARIANTS))
def model(request, tmp_path):
    torch.manual_seed(0)
    spec = VARIANTS[request.param]
    name = request.param if spec is None else variant(tmp_path, request.param, **spec)
    m = create_model(name).eval()
    # random init leaves LayerScale/positional terms tiny; perturb so every path matters in comparisons
    with torch.no_grad():
        for p in m.clip.visual.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return m


def images_for(m, batch=2, scale=1):
    h, w = m.image_size
    return torch.randn(batch, 3, h * scale, w * scale)


def test_global_embedding_matches_open_clip(model):
    x = images_for(model)
    ours = model.encode_image(x)
    ref = model.clip.encode_image(x)
    assert (ours - ref).abs().max() <= 1e-5
    text = torch.randint(0, 49408, (2, model.context_length))
    out = model(x, text)
    ref_img, ref_txt, ref_scale = model.clip.eval()(x, text)[:3]
    assert (out["image_features"] - ref_img).abs().max() <= 1e-5
    assert (out["text_features"] - ref_txt).abs().max() <= 1e-5
    assert out["logit_scale"] == ref_scale


def reference_blocks(visual, x):
    """Tokens entering the last block, via open_clip's own embedding and blocks."""
    x = visual._embeds(x)
    for block in visual.transformer.resblocks[:-1]:
        x = block(x)
    return x


def test_dense_v_only_matches_self_attention_reference(model):
    """v-only == the last block with an attention mask letting each token attend only to itself."""
    x = images_for(model)
    visual = model.clip.visual
    h = reference_blocks(visual, x)
    n = h.shape[1]
    only_self = torch.full((n, n), float("-inf")).fill_diagonal_(0.0)
    last = visual.transformer.resblocks[-1]
    h = last(h, attn_mask=only_self)
    ref = F.normalize(visual.ln_post(h[:, 1:]) @ visual.proj, dim=-1)
    dense = model.encode_dense(x)
    b, d, gh, gw = dense.shape
    assert (b, d, gh * gw) == (2, model.clip.visual.output_dim, n - 1)
    torch.testing.assert_close(dense.flatten(2).transpose(1, 2), ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(dense.norm(dim=1), torch.ones(b, gh, gw), atol=1e-5, rtol=0)


def test_dense_plain_matches_open_clip_tokens(model):
    x = images_for(model)
    visual = model.clip.visual
    visual.output_tokens = True
    try:
        _, tokens = visual(x)
    finally:
        visual.output_tokens = False
    ref = F.normalize(tokens @ visual.proj, dim=-1)
    dense = model.encode_dense(x, mode="plain")
    torch.testing.assert_close(dense.flatten(2).transpose(1, 2), ref, atol=1e-5, rtol=1e-4)


def block_outputs(model, x):
    """Every block's output tokens ``(B, 1+N, W)`` by forward hooks on open_clip's own forward."""
    outputs = []
    hooks = [b.register_forward_hook(lambda _m, _i, out: outputs.append(out))
             for b in model.clip.visual.transformer.resblocks]
    try:
        model.clip.visual(x)
    finally:
        for h in hooks:
            h.remove()
    return outputs


def test_intermediates_match_open_clip_block_outputs(model):
    x = images_for(model)
    ref = block_outputs(model, x)
    grid = model.tower.grid_size(model.image_size)
    as_map = lambda t: t[:, 1:].transpose(1, 2).reshape(t.shape[0], -1, *grid)
    layers = len(ref)
    got = model.forward_intermediates(x, indices=[0, -1])
    torch.testing.assert_close(got[0], as_map(ref[0]), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got[1], as_map(ref[-1]), atol=1e-5, rtol=1e-4)
    last_two = model.forward_intermediates(x, indices=2, norm=True)
    assert len(last_two) == min(2, layers)
    torch.testing.assert_close(last_two[-1], as_map(model.clip.visual.ln_post(ref[-1])), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="must lie in"):
        model.forward_intermediates(x, indices=[layers])


def test_block_forward_matches_open_clip_block_in_training_with_gradients(model):
    """The tower's own SDPA block forward computes open_clip's block (nn.MultiheadAttention) and its gradients."""
    from finegrain.models.vit_tower import block_forward

    block = model.clip.visual.transformer.resblocks[0].train()
    x = torch.randn(2, 17, block.ln_1.normalized_shape[0])
    outputs, grads = [], []
    for forward in (lambda t: block(t), lambda t: block_forward(block, t)):
        block.zero_grad()
        xi = x.clone().requires_grad_()
        out = forward(xi)
        out.square().sum().backward()
        outputs.append(out)
        grads.append([xi.grad, block.attn.in_proj_weight.grad, block.attn.out_proj.weight.grad])
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-5, rtol=1e-4)
    for ours, ref in zip(grads[1], grads[0]):
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_intermediates_stop_after_the_last_block_asked_for():
    torch.manual_seed(0)
    model = create_model("finegrain-tiny").eval()  # 4 blocks
    calls = []
    hooks = [b.mlp.register_forward_hook(lambda m, i, o, k=k: calls.append(k))
             for k, b in enumerate(model.clip.visual.transformer.resblocks)]
    maps = model.forward_intermediates(torch.randn(1, 3, 64, 64), indices=[1])
    for h in hooks:
        h.remove()
    assert calls == [0, 1] and maps[0].shape == (1, 128, 8, 8)


def test_boxes_pool_the_cells_they_cover(model):
    x = images_for(model)
    dense = model.encode_dense(x)
    ph, pw = model.patch_size
    one_cell = torch.tensor([[pw, ph, 2 * pw, 2 * ph]], dtype=torch.float32)  # cell (row 1, col 1)
    four_cells = torch.tensor([[0, 0, 2 * pw, 2 * ph]], dtype=torch.float32)  # cells (0..1, 0..1)
    emb = model.encode_boxes(x, [torch.cat([one_cell, four_cells]), torch.zeros(0, 4)])
    assert emb.shape == (2, dense.shape[1])  # image 1 has no boxes
    torch.testing.assert_close(emb[0], dense[0, :, 1, 1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(emb[1], F.normalize(dense[0, :, :2, :2].mean((1, 2)), dim=0), atol=1e-5, rtol=1e-4)

    padded = torch.stack([torch.cat([one_cell, four_cells]), torch.cat([four_cells, one_cell])])
    valid = torch.tensor([[True, True], [False, True]])
    emb_padded = model.encode_boxes(x, padded, valid=valid)
    assert emb_padded.shape == (2, 2, dense.shape[1])
    torch.testing.assert_close(emb_padded[0], emb, atol=1e-6, rtol=0)
    assert emb_padded[1, 0].abs().sum() == 0
    torch.testing.assert_close(emb_padded[1, 1], dense[1, :, 1, 1], atol=1e-5, rtol=1e-4)
    assert model.encode_boxes(x, [torch.zeros(0, 4), torch.zeros(0, 4)]).shape == (0, dense.shape[1])


def test_cls_attention_matches_multihead_attention_weights(model):
    x = images_for(model)
    visual = model.clip.visual
    h = visual._embeds(x)
    expected = []
    for block in visual.transformer.resblocks:
        y = block.ln_1(h)
        _, weights = block.attn(y, y, y, need_weights=True, average_attn_weights=False)
        expected.append(weights[:, :, 0, 1:])
        h = block(h)
    attn = model.cls_attention(x)
    layers, heads = len(visual.transformer.resblocks), visual.transformer.resblocks[0].attn.num_heads
    gh, gw = attn.shape[-2:]
    assert attn.shape == (2, layers, heads, gh, gw)
    torch.testing.assert_close(attn.flatten(3), torch.stack(expected, 1), atol=1e-5, rtol=1e-4)


def check_kept_token_forward(model):
    """Encoding all patches in a shuffled order and restoring gives the unshuffled forward's tokens
    (attention is permutation-equivariant once positions are added; rotary ones travel with their tokens);
    a subset keeps K tokens and the restore fills the others. Shared by every tower family's tests."""
    x = images_for(model)
    full = model.forward_tower(x, tokens=True)
    n = full.tokens.shape[1] - 1
    perm = torch.stack([torch.randperm(n), torch.randperm(n)])
    out = model.forward_tower(x, keep=perm, tokens=True)
    restored = restore_tokens(out.tokens[:, 1:], out.restore, torch.zeros(out.tokens.shape[-1]))
    torch.testing.assert_close(restored, full.tokens[:, 1:], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.image_embed, full.image_embed, atol=1e-5, rtol=1e-4)

    keep = perm[:, : n // 2]
    part = model.forward_tower(x, keep=keep, tokens=True, cls_attention=True)
    assert part.tokens.shape == (2, 1 + n // 2, full.tokens.shape[-1])
    assert part.cls_attention.shape[-1] == n // 2
    fill = torch.full((part.tokens.shape[-1],), 7.0)
    restored = restore_tokens(part.tokens[:, 1:], part.restore, fill)
    for b in range(2):
        kept = set(keep[b].tolist())
        for i in range(n):
            assert bool((restored[b, i] == 7.0).all()) == (i not in kept)


def test_kept_token_forward_restores_order(model):
    check_kept_token_forward(model)


def check_dense_map_of_kept_tokens(model):
    """One call gives a kept-token pass and its dense map: with every patch kept (shuffled) it is the full
    dense map; with half of them, kept places hold unit features, removed ones zeros, and the global
    embedding is the kept-token pass's. Shared by every tower family's tests."""
    x = images_for(model)
    n = model.forward_tower(x, tokens=True).tokens.shape[1] - 1
    perm = torch.stack([torch.randperm(n), torch.randperm(n)])
    for mode in ("v_only", "plain"):
        full = model.forward_tower(x, dense=mode).dense
        shuffled = model.forward_tower(x, keep=perm, dense=mode)
        torch.testing.assert_close(shuffled.dense, full, atol=1e-5, rtol=1e-4)
    keep = perm[:, : n // 2]
    part = model.forward_tower(x, keep=keep, dense="v_only", tokens=True)
    assert part.dense.shape == full.shape and part.tokens.shape[1] == 1 + n // 2
    norms = part.dense.flatten(2).norm(dim=1)  # (B, N)
    kept = torch.zeros(2, n, dtype=torch.bool).scatter_(1, keep, True)
    torch.testing.assert_close(norms[kept], torch.ones(int(kept.sum())))
    assert (norms[~kept] == 0).all()
    torch.testing.assert_close(part.image_embed, model.forward_tower(x, keep=keep).image_embed)


def test_dense_map_and_kept_tokens_in_one_call(model):
    check_dense_map_of_kept_tokens(model)


def test_order_indices_by_hand():
    removed, restore = order_indices(torch.tensor([[3, 0]]), 5)
    assert removed.tolist() == [[1, 2, 4]]
    # sequence [3, 0, 1, 2, 4] -> raster order: position of patch i in that sequence
    assert restore.tolist() == [[1, 2, 3, 0, 4]]


def bicubic_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """``(n_out, n_in)`` weights of plain bicubic resizing, written out: Keys' cubic kernel (a = -0.75), half-pixel
    centres (``align_corners=False``), edge samples repeated, no antialiasing (the releases' ``F.interpolate``)."""
    a = -0.75

    def kernel(d):
        d = abs(d)
        return ((a + 2) * d - (a + 3)) * d * d + 1 if d <= 1 else ((a * d - 5 * a) * d + 8 * a) * d - 4 * a

    weights = torch.zeros(n_out, n_in, dtype=torch.float64)
    for o in range(n_out):
        src = (o + 0.5) * n_in / n_out - 0.5
        for i in range(math.floor(src) - 1, math.floor(src) + 3):
            weights[o, min(max(i, 0), n_in - 1)] += kernel(src - i)
    return weights


def plain_bicubic_resize(pos_embed: torch.Tensor, grid, new_grid) -> torch.Tensor:
    """A ``(..., 1 + gh*gw, W)`` position embedding (CLS first) resized to ``new_grid``, by ``bicubic_matrix``."""
    patches = pos_embed[..., 1:, :].double().reshape(*pos_embed.shape[:-2], *grid, pos_embed.shape[-1])
    resized = torch.einsum("oh,...hwc,pw->...opc", bicubic_matrix(grid[0], new_grid[0]), patches,
                           bicubic_matrix(grid[1], new_grid[1])).flatten(-3, -2)
    return torch.cat([pos_embed[..., :1, :], resized.to(pos_embed.dtype)], dim=-2)


def test_other_input_size_resizes_position_embeddings_by_plain_bicubic(model):
    """At a size other than the model's, position embeddings are resized as the releases resize them (plain
    bicubic, not open_clip's antialiased load-time resize): the embedding equals a model built at that size
    holding the hand-resized embedding."""
    h, w = model.image_size
    ph, pw = model.patch_size
    new = (h + 2 * ph, w + 4 * pw)
    grid, new_grid = (h // ph, w // pw), (new[0] // ph, new[1] // pw)
    pos = model.clip.visual.positional_embedding
    expected = plain_bicubic_resize(pos, grid, new_grid)
    torch.testing.assert_close(interpolate_pos_embed(pos, grid, new_grid), expected, atol=1e-6, rtol=0)
    resized = open_clip.create_model(model.name, force_image_size=new).eval()
    resized.load_state_dict({**model.clip.state_dict(), "visual.positional_embedding": expected})
    x = torch.randn(2, 3, *new)
    torch.testing.assert_close(model.encode_image(x), resized.encode_image(x), atol=1e-5, rtol=1e-4)
    assert model.encode_dense(x).shape[-2:] == new_grid


def test_state_dict_is_open_clips_both_ways(tmp_path):
    m = create_model("finegrain-test")
    path = tmp_path / "open_clip.pt"
    torch.save(m.clip.state_dict(), path)
    loaded = create_model("finegrain-test", pretrained=str(path))
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(loaded.encode_image(x), m.encode_image(x), atol=0, rtol=0)
    wrapped = tmp_path / "finegrain_ckpt.pt"
    torch.save({"state_dict": m.clip.state_dict(), "method": {}, "model_name": "finegrain-test",
                "config": {"model": {"name": "finegrain-test"}}}, wrapped)
    in_open_clip = open_clip.create_model("finegrain-test", pretrained=str(wrapped))
    torch.testing.assert_close(in_open_clip.encode_image(x), m.encode_image(x), atol=0, rtol=0)
    torch.testing.assert_close(model_from_checkpoint(wrapped).encode_image(x), m.encode_image(x), atol=0, rtol=0)


@pytest.mark.parametrize("vision, message", [
    ({"qk_norm": True}, "custom attention"),
    ({"attentional_pool": True}, "attentional pooling"),
    ({"pool_type": "avg"}, "pool_type"),
    ({"final_ln_after_pool": True}, "final_ln_after_pool"),
])
def test_unsupported_configs_are_rejected_clearly(tmp_path, vision, message):
    with pytest.raises(UnsupportedModelError, match=message):
        create_model(variant(tmp_path, "bad", **vision))


def test_vit_b16_at_224_matches_open_clip():
    torch.manual_seed(0)
    m = create_model("ViT-B-16").eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert (m.encode_image(x) - m.clip.encode_image(x)).abs().max() <= 1e-5
        assert m.encode_dense(x).shape == (1, 512, 14, 14)


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown model 'ViT-Q-99'"):
        create_model("ViT-Q-99")


def test_torchvision_ops_load():
    """A torch/torchvision mismatch makes the compiled ops fail to load; catch that at install time."""
    from torchvision.ops import nms, roi_align

    boxes = torch.tensor([[0.0, 0, 4, 4], [0, 0, 4, 5], [10, 10, 12, 12]])
    assert nms(boxes, torch.tensor([0.9, 0.8, 0.7]), 0.5).tolist() == [0, 2]
    feat = torch.arange(16.0).view(1, 1, 4, 4)
    out = roi_align(feat, [torch.tensor([[0.0, 0, 4, 4]])], (1, 1), aligned=True)
    assert out.item() == pytest.approx(7.5)
