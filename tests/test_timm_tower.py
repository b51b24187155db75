"""The dense-model contract for open_clip timm-trunk towers (timm Eva / VisionTransformer), checked against
references computed with timm's and open_clip's own modules."""

import copy
import json

import pytest
import timm
import torch
import torch.nn.functional as F
from test_models import (
    check_dense_map_of_kept_tokens,
    check_kept_token_forward,
    images_for,
    plain_bicubic_resize,
)
from timm.models.eva import Eva

from finegrain.models import FinegrainCLIP, UnsupportedModelError, create_model
from finegrain.models.timm_tower import TimmTower, rope_for_grid

TEXT = {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}


def timm_config(tmp_path, name, timm_name, **vision):
    cfg = {"embed_dim": 32, "custom_text": True, "text_cfg": TEXT,
           "vision_cfg": {"image_size": 224, "timm_model_name": timm_name, "timm_model_pretrained": False,
                          "timm_pool": "token", **vision}}
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def with_trunk(tmp_path, timm_name, size, **kwargs):
    """A FinegrainCLIP whose open_clip TimmModel gets a small timm trunk built with ``kwargs`` (structure of
    ``timm_name``: e.g. EVA02-CLIP's separate q/k/v, sub-LN and normed SwiGLU), projecting to 32 in timm's head."""
    clip = create_model(timm_config(tmp_path, "swap", "eva02_tiny_patch14_224", timm_proj=None), image_size=28).clip
    clip.visual.trunk = timm.create_model(timm_name, img_size=size, num_classes=32, global_pool="token", **kwargs)
    clip.visual.image_size = (size, size)
    return FinegrainCLIP(clip)


def eva02_tiny(tmp_path):  # fused qkv with q/v biases, SwiGLU (packed), RoPE; built at 56 px (4x4 grid)
    return create_model(timm_config(tmp_path, "eva02-tiny", "eva02_tiny_patch14_224", timm_proj=None), image_size=56)


def eva02_clip(tmp_path):  # EVA02-CLIP blocks (eva02_base_patch16_clip_224) shrunk, plus layer-scale
    return with_trunk(tmp_path, "eva02_base_patch16_clip_224", 48, embed_dim=64, depth=2, num_heads=4,
                      init_values=0.1)


def vit_tiny(tmp_path):  # DetailCLIP student's structure: conv bias, no pre-norm, eps 1e-6, linear proj no bias
    return create_model(timm_config(tmp_path, "vit-tiny", "vit_tiny_patch16_224", timm_proj="linear"), image_size=48)


def vit_layerscale_qknorm(tmp_path):
    return with_trunk(tmp_path, "vit_base_patch16_224", 32, embed_dim=64, depth=2, num_heads=4, init_values=0.1,
                      qk_norm=True)


VARIANTS = {f.__name__: f for f in (eva02_tiny, eva02_clip, vit_tiny, vit_layerscale_qknorm)}


@pytest.fixture(params=sorted(VARIANTS))
def model(request, tmp_path):
    torch.manual_seed(0)
    m = VARIANTS[request.param](tmp_path).eval()
    with torch.no_grad():  # random init leaves biases / layer-scale trivial; perturb so every path matters
        for p in m.clip.visual.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return m


def trunk_embed(trunk, x):
    """timm's own embedding: tokens after ``norm_pre`` and the rotary embedding (Eva) or None."""
    x = trunk.patch_embed(x)
    x, rope = trunk._pos_embed(x) if isinstance(trunk, Eva) else (trunk._pos_embed(x), None)
    return trunk.norm_pre(x), rope


def run_block(block, x, rope, **kwargs):
    return block(x, rope=rope, **kwargs) if rope is not None else block(x, **kwargs)


def project(visual, normed_tokens):
    trunk = visual.trunk
    return visual.head(trunk.head(trunk.fc_norm(normed_tokens)))


def test_tower_is_picked_by_type(model):
    assert isinstance(model.tower, TimmTower)
    assert model.tower.num_layers == len(model.clip.visual.trunk.blocks)
    assert model.tower.num_heads == model.clip.visual.trunk.blocks[0].attn.num_heads


def test_global_embedding_matches_open_clip(model):
    x = images_for(model)
    assert (model.encode_image(x) - model.clip.encode_image(x)).abs().max() <= 1e-5
    text = torch.randint(0, 49408, (2, model.context_length))
    out = model(x, text)
    ref_img, ref_txt, _ = model.clip(x, text)[:3]
    assert (out["image_features"] - ref_img).abs().max() <= 1e-5
    assert (out["text_features"] - ref_txt).abs().max() <= 1e-5


def test_dense_v_only_matches_self_attention_reference(model):
    """v-only == the last block (timm's own, RoPE included) with a mask letting each token attend to itself."""
    x = images_for(model)
    visual = model.clip.visual
    trunk = visual.trunk
    h, rope = trunk_embed(trunk, x)
    for block in trunk.blocks[:-1]:
        h = run_block(block, h, rope)
    n = h.shape[1]
    only_self = torch.full((n, n), float("-inf")).fill_diagonal_(0.0)
    h = run_block(trunk.blocks[-1], h, rope, attn_mask=only_self)
    ref = F.normalize(project(visual, trunk.norm(h[:, 1:])), dim=-1)
    dense = model.encode_dense(x)
    b, d, gh, gw = dense.shape
    assert (b, d, gh * gw) == (2, 32, n - 1)
    torch.testing.assert_close(dense.flatten(2).transpose(1, 2), ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(dense.norm(dim=1), torch.ones(b, gh, gw), atol=1e-5, rtol=0)


def test_dense_plain_matches_timm_features(model):
    x = images_for(model)
    visual = model.clip.visual
    ref = F.normalize(project(visual, visual.trunk.forward_features(x)[:, 1:]), dim=-1)
    dense = model.encode_dense(x, mode="plain")
    torch.testing.assert_close(dense.flatten(2).transpose(1, 2), ref, atol=1e-5, rtol=1e-4)


def test_intermediates_match_timm_forward_intermediates(model):
    x = images_for(model)
    trunk = model.clip.visual.trunk
    for indices, norm in (([0, -1], False), (2, True)):
        ref = trunk.forward_intermediates(x, indices=indices, norm=norm, intermediates_only=True)
        got = model.forward_intermediates(x, indices=indices, norm=norm)
        assert len(got) == len(ref) == 2
        for g, r in zip(got, ref):
            torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="must lie in"):
        model.forward_intermediates(x, indices=[len(trunk.blocks)])


def test_boxes_pool_the_cells_they_cover(model):
    x = images_for(model)
    dense = model.encode_dense(x)
    ph, pw = model.patch_size
    one_cell = torch.tensor([[pw, ph, 2 * pw, 2 * ph]], dtype=torch.float32)
    four_cells = torch.tensor([[0, 0, 2 * pw, 2 * ph]], dtype=torch.float32)
    emb = model.encode_boxes(x, [torch.cat([one_cell, four_cells]), torch.zeros(0, 4)])
    assert emb.shape == (2, dense.shape[1])
    torch.testing.assert_close(emb[0], dense[0, :, 1, 1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(emb[1], F.normalize(dense[0, :, :2, :2].mean((1, 2)), dim=0), atol=1e-5, rtol=1e-4)


def test_cls_attention_matches_timm_explicit_softmax(model):
    """timm's non-fused attention path (explicit softmax, RoPE on q/k for Eva) captured at its attn_drop."""
    x = images_for(model)
    trunk = model.clip.visual.trunk
    weights, hooks = [], []
    for block in trunk.blocks:
        block.attn.fused_attn = False
        hooks.append(block.attn.attn_drop.register_forward_hook(lambda _m, _i, out: weights.append(out)))
    try:
        model.clip.visual(x)
    finally:
        for h in hooks:
            h.remove()
    expected = torch.stack([w[:, :, 0, 1:] for w in weights], 1)
    attn = model.cls_attention(x)
    assert attn.shape[:3] == (2, len(trunk.blocks), trunk.blocks[0].attn.num_heads)
    torch.testing.assert_close(attn.flatten(3), expected, atol=1e-5, rtol=1e-4)


def test_kept_token_forward_restores_order(model):
    """All patches in a shuffled order (RoPE gathered with them) + restore == the full forward; a subset
    keeps K tokens and fills the others."""
    check_kept_token_forward(model)


def test_dense_map_and_kept_tokens_in_one_call(model):
    check_dense_map_of_kept_tokens(model)


def test_other_input_size_matches_a_model_built_at_that_size(model):
    """Run-time resizing == timm's ``set_input_size`` to that size (RoPE rebuilt), holding the absolute position
    embedding resized by plain bicubic as the releases do (timm's own resize antialiases)."""
    h, w = model.image_size
    ph, pw = model.patch_size
    new = (h + 2 * ph, w + 4 * pw)
    x = torch.randn(2, 3, *new)
    resized = copy.deepcopy(model.clip.visual)
    resized.set_input_size(new)
    with torch.no_grad():
        resized.trunk.pos_embed.copy_(plain_bicubic_resize(model.clip.visual.trunk.pos_embed, (h // ph, w // pw),
                                                           (new[0] // ph, new[1] // pw)))
    torch.testing.assert_close(model.encode_image(x), resized(x), atol=1e-5, rtol=1e-4)
    assert model.encode_dense(x).shape[-2:] == (new[0] // ph, new[1] // pw)


def test_grad_checkpointing_gives_the_same_outputs_and_grads(model):
    x = images_for(model)
    outs = []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        assert model.clip.visual.trunk.grad_checkpointing == enable
        model.zero_grad()
        out = model.forward_tower(x, dense="v_only", cls_attention=True)
        (out.image_embed.sum() + out.dense.sum() + out.cls_attention.sum()).backward()
        grad = model.clip.visual.trunk.blocks[0].norm1.weight.grad.clone()
        outs.append((out.image_embed.detach(), out.dense.detach(), grad))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_rope_for_other_grid_equals_timm_rebuilt_rope():
    torch.manual_seed(0)
    trunk = timm.create_model("eva02_tiny_patch14_224", img_size=56)
    rope = rope_for_grid(trunk.rope, (5, 7))
    trunk.set_input_size((70, 98))
    torch.testing.assert_close(rope, trunk.rope.get_embed(), atol=0, rtol=0)
    assert rope_for_grid(trunk.rope, (5, 7)) is trunk.rope.get_embed()


def test_patch_dropout_in_training_keeps_the_rope_of_kept_tokens(tmp_path):
    """With the trunk's patch dropout active, the global path equals timm's (same random draw)."""
    m = with_trunk(tmp_path, "eva02_base_patch16_clip_224", 48, embed_dim=64, depth=2, num_heads=4,
                   patch_drop_rate=0.5).train()
    with torch.no_grad():
        for p in m.clip.visual.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(2, 3, 48, 48)
    torch.manual_seed(3)
    ours = m.encode_image(x)
    torch.manual_seed(3)
    ref = m.clip.visual(x)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)
    assert (ours - m.eval().encode_image(x)).abs().max() > 1e-3  # tokens were dropped


def test_released_configs_build_and_match_open_clip():
    """DetailCLIP's timm ViT-B/16 student config and open_clip's EVA02-B-16 at 224."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, 224, 224)
    for name in ("detailclip-timm-vit-b-16", "EVA02-B-16"):
        m = create_model(name).eval()
        with torch.no_grad():
            assert (m.encode_image(x) - m.clip.encode_image(x)).abs().max() <= 1e-5
            assert m.encode_dense(x).shape == (1, 512, 14, 14)
        if name == "detailclip-timm-vit-b-16":  # conv bias, no pre-norm, eps 1e-6, bias-free projection
            trunk = m.clip.visual.trunk
            assert trunk.patch_embed.proj.bias is not None and isinstance(trunk.norm_pre, torch.nn.Identity)
            assert trunk.norm.eps == 1e-6 and (len(trunk.blocks), trunk.embed_dim) == (12, 768)
            assert m.clip.visual.head.proj.bias is None and m.clip.visual.head.proj.out_features == 512


def test_unsupported_timm_trunks_are_refused_with_the_reason(tmp_path):
    with pytest.raises(UnsupportedModelError, match="timm trunk \\(convnext_tiny"):
        create_model(timm_config(tmp_path, "convnext", "convnext_tiny"))
    with pytest.raises(UnsupportedModelError, match="timm_pool='avg'"):
        create_model(timm_config(tmp_path, "avg", "vit_tiny_patch16_224", timm_pool="avg"))
    with pytest.raises(UnsupportedModelError, match="register tokens"):
        with_trunk(tmp_path, "eva02_tiny_patch14_224", 28, num_reg_tokens=1)
    with pytest.raises(UnsupportedModelError, match="Eva or VisionTransformer trunk, got ResNet"):
        clip = create_model(timm_config(tmp_path, "swap", "eva02_tiny_patch14_224", timm_proj=None)).clip
        clip.visual.trunk = timm.create_model("resnet10t", num_classes=32)
        FinegrainCLIP(clip)


def vit_tiny_64(tmp_path):  # an even 4x4 grid, as DetailCLIP's 2x2 blocks need
    return create_model(timm_config(tmp_path, "vit-tiny", "vit_tiny_patch16_224", timm_proj="linear"), image_size=64)


@pytest.mark.parametrize("make", [eva02_tiny, vit_tiny_64])
def test_method_rules_name_the_timm_trunks_parameters(tmp_path, make):
    """CLIPSelf trains the blocks only and DetailCLIP freezes the patch embedding, on timm trunks too."""
    from finegrain.objectives import create_method
    from finegrain.train.optim import apply_trainable_rules
    from finegrain.train.trainer import TrainModule

    model = make(tmp_path)
    method = create_method("clipself", None, model)
    apply_trainable_rules(TrainModule(model, method), method.param_rules())
    for name, p in model.clip.visual.named_parameters():
        assert p.requires_grad == name.startswith("trunk.blocks."), name
    model = make(tmp_path)
    method = create_method("detailclip", None, model)
    apply_trainable_rules(TrainModule(model, method), method.param_rules())
    frozen = {n for n, p in model.clip.visual.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in model.clip.visual.named_parameters() if n.startswith("trunk.patch_embed.")}


def test_bf16_autocast_embedding_equals_timms_under_autocast(model):
    """Under autocast the tower keeps timm's dtypes (an fp32 residual stream after the fp32 CLS / position
    embeddings join), so its embedding equals open_clip's forward under the same autocast."""
    x = images_for(model)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(model.encode_image(x).float(), model.clip.visual(x).float(), atol=1e-6, rtol=0)
