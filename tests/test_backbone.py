"""The dense backbone adapter: block maps through the simple feature pyramid, stochastic depth, frozen parts
after the blocks, and layer-wise learning-rate decay groups."""

import json

import pytest
import torch
from test_timm_tower import eva02_tiny, vit_tiny
from torch import nn
from torchvision.ops import FeaturePyramidNetwork

from finegrain.models import create_model
from finegrain.models.backbone import (
    SimpleFeaturePyramid,
    ViTBackbone,
    default_block_indices,
    layer_decay_param_groups,
)

TEXT = {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}


def vit(tmp_path, layers=4):
    """An open_clip ViT with ``layers`` blocks of width 64, patch 8, built at 32 px."""
    path = tmp_path / f"vit-{layers}.json"
    path.write_text(json.dumps({"embed_dim": 32, "text_cfg": TEXT,
                                "vision_cfg": {"image_size": 32, "layers": layers, "width": 64, "patch_size": 8}}))
    torch.manual_seed(0)
    return create_model(str(path))


def test_default_blocks_are_4_6_8_12_of_12_and_the_same_fractions_of_deeper_towers():
    assert default_block_indices(12) == [3, 5, 7, 11]
    assert default_block_indices(24) == [7, 11, 15, 23]
    assert default_block_indices(6) == [1, 2, 3, 5]


@pytest.mark.parametrize("size", [(32, 32), (48, 64)])
def test_pyramid_shapes_and_strides_at_two_input_sizes(tmp_path, size):
    backbone = ViTBackbone(vit(tmp_path, layers=6)).eval()
    assert backbone.block_indices == [1, 2, 3, 5]
    assert backbone.strides == [2, 4, 8, 16]
    maps = backbone(torch.randn(2, 3, *size))
    assert list(maps) == ["0", "1", "2", "3"]
    for stride, m in zip(backbone.strides, maps.values()):
        assert m.shape == (2, 64, size[0] // stride, size[1] // stride)


def test_stride_16_level_is_the_chosen_block_map_and_stride_32_its_max_pool(tmp_path):
    model = vit(tmp_path, layers=6)
    backbone = ViTBackbone(model).eval()
    images = torch.randn(2, 3, 32, 48)
    maps = backbone(images)
    block_maps = model.tower.forward_intermediates(images, [1, 2, 3, 5])
    torch.testing.assert_close(maps["2"], block_maps[2])
    torch.testing.assert_close(maps["3"], nn.functional.max_pool2d(block_maps[3], 2))


def test_without_pyramid_the_block_maps_come_as_they_are(tmp_path):
    model = vit(tmp_path)
    backbone = ViTBackbone(model, block_indices=[1, 3], pyramid=False).eval()
    images = torch.randn(1, 3, 32, 32)
    for ours, ref in zip(backbone(images).values(), model.tower.forward_intermediates(images, [1, 3])):
        torch.testing.assert_close(ours, ref)
    assert backbone.strides == [8, 8]


def test_pyramid_needs_four_blocks_which_may_repeat(tmp_path):
    with pytest.raises(ValueError, match="reads 4 blocks"):
        ViTBackbone(vit(tmp_path), block_indices=[1, 2, 3])
    assert ViTBackbone(vit(tmp_path), block_indices=[1, 1, 2, 3]).block_indices == [1, 1, 2, 3]
    with pytest.raises(ValueError, match="takes 4 block maps"):
        SimpleFeaturePyramid(8)([torch.zeros(1, 8, 2, 2)] * 3)


def test_every_trainable_parameter_gets_a_gradient_and_the_projection_is_frozen(tmp_path):
    """No unused trainable parameter (DDP would need find_unused_parameters): what follows the blocks is frozen."""
    backbone = ViTBackbone(vit(tmp_path))
    frozen = {n for n, p in backbone.named_parameters() if not p.requires_grad}
    assert frozen == {"visual.ln_post.weight", "visual.ln_post.bias", "visual.proj"}
    sum(m.sum() for m in backbone(torch.randn(2, 3, 32, 32)).values()).backward()
    missing = [n for n, p in backbone.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing


def test_torchvision_fpn_takes_the_backbone_output(tmp_path):
    backbone = ViTBackbone(vit(tmp_path)).eval()
    fpn = FeaturePyramidNetwork([backbone.out_channels] * 4, 16)
    out = fpn(backbone(torch.randn(1, 3, 64, 64)))
    assert [tuple(m.shape[-2:]) for m in out.values()] == [(32, 32), (16, 16), (8, 8), (4, 4)]


def test_drop_path_changes_training_outputs_only_and_rises_over_the_blocks(tmp_path):
    model = vit(tmp_path)
    images = torch.randn(4, 3, 32, 32)
    reference = {k: v.detach() for k, v in ViTBackbone(model, pyramid=False).train()(images).items()}
    # hooks from the adapter above stay off (rate 0); a second adapter with drop path adds its own
    backbone = ViTBackbone(model, pyramid=False, drop_path_rate=0.5)
    torch.testing.assert_close(dict(backbone.eval()(images)), reference)
    torch.manual_seed(1)
    trained = backbone.train()(images)
    torch.testing.assert_close(trained["0"], reference["0"])  # block 0 of 4: rate 0
    assert not torch.allclose(trained["3"], reference["3"])


def test_drop_path_rate_out_of_range_is_refused(tmp_path):
    with pytest.raises(ValueError, match="drop_path_rate"):
        ViTBackbone(vit(tmp_path), drop_path_rate=1.0)


class Segmenter(nn.Module):
    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Conv2d(backbone.out_channels, 3, 1)


def test_layer_decay_groups_by_parameter_name(tmp_path):
    """Four blocks: embeddings at 0.5**5, block i at 0.5**(4 - i), head at 1; no decay on 1-D tensors and
    position / class embeddings."""
    model = Segmenter(ViTBackbone(vit(tmp_path)))
    groups = layer_decay_param_groups(model, model.backbone, lr=1.0, weight_decay=0.05, layer_decay=0.5)
    table = {name: (g["lr"], g["weight_decay"]) for g in groups for name in g["names"]}
    expected = {
        "backbone.visual.conv1.weight": (0.5 ** 5, 0.05),
        "backbone.visual.class_embedding": (0.5 ** 5, 0.0),
        "backbone.visual.positional_embedding": (0.5 ** 5, 0.0),
        "backbone.visual.ln_pre.weight": (0.5 ** 5, 0.0),
        "backbone.visual.transformer.resblocks.0.attn.in_proj_weight": (0.5 ** 4, 0.05),
        "backbone.visual.transformer.resblocks.0.attn.in_proj_bias": (0.5 ** 4, 0.0),
        "backbone.visual.transformer.resblocks.3.mlp.c_fc.weight": (0.5, 0.05),
        "backbone.visual.transformer.resblocks.3.ln_2.bias": (0.5, 0.0),
        "backbone.pyramid.up4.0.weight": (1.0, 0.05),
        "backbone.pyramid.up4.1.weight": (1.0, 0.0),
        "head.weight": (1.0, 0.05),
        "head.bias": (1.0, 0.0),
    }
    for name, value in expected.items():
        assert table[name] == pytest.approx(value), name
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(table) == trainable
    assert "backbone.visual.proj" not in table
    torch.optim.AdamW(groups)  # the groups are valid optimizer groups


def test_timm_eva_tower_gives_the_pyramid_and_its_own_layer_groups(tmp_path):
    model = eva02_tiny(tmp_path)  # 12 blocks, patch 14
    backbone = ViTBackbone(model, drop_path_rate=0.1).eval()
    maps = backbone(torch.randn(1, 3, 56, 112))
    assert [tuple(m.shape[-2:]) for m in maps.values()] == [(16, 32), (8, 16), (4, 8), (2, 4)]
    assert backbone.strides == [3.5, 7, 14, 28]
    groups = layer_decay_param_groups(backbone, backbone, lr=1.0, weight_decay=0.05, layer_decay=0.9)
    layer_of = {name: g["layer_id"] for g in groups for name in g["names"]}
    assert layer_of["visual.trunk.patch_embed.proj.weight"] == 0
    assert layer_of["visual.trunk.blocks.11.mlp.fc2.weight"] == 12
    assert layer_of["pyramid.up2.weight"] == 13
    assert not any(n.startswith(("visual.head", "visual.trunk.norm.")) for n in layer_of)


@pytest.mark.parametrize("build", [eva02_tiny, vit_tiny])
def test_timm_towers_leave_no_trainable_parameter_unused(tmp_path, build):
    backbone = ViTBackbone(build(tmp_path), drop_path_rate=0.2).train()
    size = 2 * 2 * backbone.tower.patch_size[0]
    sum(m.sum() for m in backbone(torch.randn(2, 3, size, size)).values()).backward()
    missing = [n for n, p in backbone.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    frozen = [n for n, p in backbone.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith(("visual.head", "visual.trunk.norm.", "visual.trunk.head")) for n in frozen)


@pytest.mark.parametrize("build", [eva02_tiny, vit_tiny, lambda path: vit(path, layers=8)],
                         ids=["timm-eva02", "timm-vit", "open_clip-vit"])
def test_v_only_last_map_is_the_dense_features_before_projection_and_earlier_maps_are_unchanged(tmp_path, build):
    """F-ViT's backbone: the last block's map runs v-only; projected, it is ``encode_dense``'s map, so one
    pass gives both."""
    model = build(tmp_path).eval()
    layers = model.tower.num_layers
    blocks = [layers // 4, layers // 2, 3 * layers // 4 - 1, layers - 1]
    backbone = ViTBackbone(model, block_indices=blocks, v_only_last=True).eval()
    size = 4 * model.patch_size[0]
    images = torch.randn(2, 3, size, 2 * size)
    with torch.no_grad():
        maps = backbone.block_maps(images)
        plain = model.tower.forward_intermediates(images, blocks)
        dense = backbone.tower.project_dense(maps[-1].flatten(2).transpose(1, 2), tuple(maps[-1].shape[-2:]))
        torch.testing.assert_close(dense, model.encode_dense(images), atol=1e-5, rtol=1e-4)
    for ours, ref in zip(maps[:-1], plain[:-1]):
        torch.testing.assert_close(ours, ref)
    assert not torch.allclose(maps[-1], plain[-1], atol=1e-3)
