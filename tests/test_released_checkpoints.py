"""Released FineCLIP / CLIPSelf (EVA-CLIP) and DetailCLIP checkpoints: key conversion into open_clip models.

Tiny fake checkpoints carry the released key names (EVA-CLIP fork: eva_vit_model.py / rope.py / transformer.py;
DetailCLIP: models.py) with random values; the converted open_clip model's image embedding is compared with
the released forward written out below from those keys, and every converted tensor with its source.
"""

import json
import logging
import math

import open_clip
import pytest
import torch
import torch.nn.functional as F
from test_models import plain_bicubic_resize
from timm.models import register_model
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer

from finegrain.cli import main
from finegrain.models.released import (
    DETAILCLIP,
    EVA_CLIP,
    ReleasedCheckpointError,
    convert_released,
    detect_format,
    read_released,
    unwrap,
)

WIDTH, HEADS, DEPTH, PATCH, SIZE, EMBED, HIDDEN = 64, 2, 2, 8, 32, 48, 128
HEAD_DIM, GRID = WIDTH // HEADS, SIZE // PATCH
TEXT = {"context_length": 8, "vocab_size": 50, "width": 32, "heads": 2, "layers": 1}


def _trunk_kwargs(kwargs):
    """timm.create_model's arguments a bare model class takes (drops pretrained_cfg, cache_dir)."""
    return {k: v for k, v in kwargs.items() if k not in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")}


@register_model
def eva02_released_test_patch8_clip_32(pretrained=False, **kwargs):
    """EVA02-CLIP's trunk layout (as timm's eva02_base_patch16_clip_224) at a tiny size."""
    return Eva(img_size=SIZE, patch_size=PATCH, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS, qkv_fused=False,
               mlp_ratio=HIDDEN / WIDTH, swiglu_mlp=True, scale_mlp=True, scale_attn_inner=True,
               use_rot_pos_emb=True, ref_feat_shape=(16, 16), **_trunk_kwargs(kwargs))


@register_model
def vit_released_test_patch8_32(pretrained=False, **kwargs):
    """timm's vit_base_patch16_224 layout at a tiny size."""
    model = VisionTransformer(img_size=SIZE, patch_size=PATCH, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS,
                              **_trunk_kwargs(kwargs))
    model.default_cfg = {}  # read by open_clip's TimmModel when it adds a projection
    return model


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("released_configs")
    eva = {"embed_dim": EMBED, "custom_text": True, "text_cfg": TEXT,
           "vision_cfg": {"image_size": SIZE, "timm_model_name": "eva02_released_test_patch8_clip_32",
                          "timm_model_pretrained": False, "timm_pool": "token", "timm_proj": None}}
    detail = {"embed_dim": EMBED, "quick_gelu": True, "text_cfg": TEXT,  # as detailclip-timm-vit-b-16
              "vision_cfg": {"image_size": SIZE, "timm_model_name": "vit_released_test_patch8_32",
                             "timm_model_pretrained": False, "timm_pool": "token", "timm_proj": "linear",
                             "timm_proj_bias": False}}
    for name, cfg in (("eva-released-test", eva), ("detailclip-released-test", detail)):
        (folder / f"{name}.json").write_text(json.dumps(cfg))
        open_clip.add_model_config(folder / f"{name}.json")
    return folder


def _randn(*shape):
    return torch.randn(*shape) * 0.2


def _ln(prefix):
    return {f"{prefix}.weight": 1 + _randn(WIDTH if "ffn_ln" not in prefix else HIDDEN),
            f"{prefix}.bias": _randn(WIDTH if "ffn_ln" not in prefix else HIDDEN)}


def _text_keys(prefix=""):
    w, sd = TEXT["width"], {}
    sd[f"{prefix}token_embedding.weight"] = _randn(TEXT["vocab_size"], w)
    sd[f"{prefix}positional_embedding"] = _randn(TEXT["context_length"], w)
    for i in range(TEXT["layers"]):
        b = f"{prefix}transformer.resblocks.{i}."
        sd.update({b + "ln_1.weight": 1 + _randn(w), b + "ln_1.bias": _randn(w),
                   b + "attn.in_proj_weight": _randn(3 * w, w), b + "attn.in_proj_bias": _randn(3 * w),
                   b + "attn.out_proj.weight": _randn(w, w), b + "attn.out_proj.bias": _randn(w),
                   b + "ln_2.weight": 1 + _randn(w), b + "ln_2.bias": _randn(w),
                   b + "mlp.c_fc.weight": _randn(4 * w, w), b + "mlp.c_fc.bias": _randn(4 * w),
                   b + "mlp.c_proj.weight": _randn(w, 4 * w), b + "mlp.c_proj.bias": _randn(w)})
    sd.update({f"{prefix}ln_final.weight": 1 + _randn(w), f"{prefix}ln_final.bias": _randn(w),
               f"{prefix}text_projection": _randn(w, EMBED), "logit_scale": torch.tensor(math.log(1 / 0.07))})
    return sd


def eva_clip_rope(grid: int = GRID) -> tuple[torch.Tensor, torch.Tensor]:
    """EVA-CLIP's VisionRotaryEmbeddingFast buffers (dim = head_dim / 2, pt_seq_len 16, ft_seq_len = grid), as
    built at the model's size and rebuilt at another (``recalculate``: positions ``arange(g) / g * 16``)."""
    dim = HEAD_DIM // 2
    freqs = 1.0 / (10000 ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
    t = torch.arange(grid) / grid * 16
    freqs = (t[:, None] * freqs[None]).repeat_interleave(2, dim=-1)  # (grid, dim), pairs repeated
    freqs = torch.cat([freqs[:, None].expand(grid, grid, dim), freqs[None].expand(grid, grid, dim)], dim=-1)
    freqs = freqs.reshape(-1, HEAD_DIM)
    return freqs.cos(), freqs.sin()


def eva_clip_state_dict() -> dict:
    """A tiny EVA02-CLIP state dict with the released names (subln, naiveswiglu, rope, qkv_bias)."""
    cos, sin = eva_clip_rope()
    sd = {"visual.cls_token": _randn(1, 1, WIDTH), "visual.pos_embed": _randn(1, GRID * GRID + 1, WIDTH),
          "visual.patch_embed.proj.weight": _randn(WIDTH, 3, PATCH, PATCH),
          "visual.patch_embed.proj.bias": _randn(WIDTH), "visual.rope.freqs_cos": cos, "visual.rope.freqs_sin": sin}
    for i in range(DEPTH):
        b = f"visual.blocks.{i}."
        sd.update(_ln(b + "norm1"))
        sd.update({b + "attn.q_proj.weight": _randn(WIDTH, WIDTH), b + "attn.k_proj.weight": _randn(WIDTH, WIDTH),
                   b + "attn.v_proj.weight": _randn(WIDTH, WIDTH), b + "attn.q_bias": _randn(WIDTH),
                   b + "attn.v_bias": _randn(WIDTH), b + "attn.rope.freqs_cos": cos, b + "attn.rope.freqs_sin": sin,
                   b + "attn.proj.weight": _randn(WIDTH, WIDTH), b + "attn.proj.bias": _randn(WIDTH)})
        sd.update(_ln(b + "attn.inner_attn_ln"))
        sd.update(_ln(b + "norm2"))
        sd.update({b + "mlp.w1.weight": _randn(HIDDEN, WIDTH), b + "mlp.w1.bias": _randn(HIDDEN),
                   b + "mlp.w2.weight": _randn(HIDDEN, WIDTH), b + "mlp.w2.bias": _randn(HIDDEN),
                   b + "mlp.w3.weight": _randn(WIDTH, HIDDEN), b + "mlp.w3.bias": _randn(WIDTH)})
        sd.update(_ln(b + "mlp.ffn_ln"))
    sd.update(_ln("visual.norm"))
    sd.update({"visual.head.weight": _randn(EMBED, WIDTH), "visual.head.bias": _randn(EMBED)})
    sd.update(_text_keys("text."))
    return sd


def detailclip_state_dict() -> dict:
    """A tiny DetailCLIP state dict with the released names, training-only parts included."""
    sd = {"visual.cls_token": _randn(1, 1, WIDTH), "visual.pos_embed": _randn(1, GRID * GRID + 1, WIDTH),
          "visual.patch_embed.proj.weight": _randn(WIDTH, 3, PATCH, PATCH), "visual.patch_embed.proj.bias": _randn(WIDTH)}
    for i in range(DEPTH):
        b = f"visual.blocks.{i}."
        sd.update(_ln(b + "norm1"))
        sd.update(_ln(b + "norm2"))
        sd.update({b + "attn.qkv.weight": _randn(3 * WIDTH, WIDTH), b + "attn.qkv.bias": _randn(3 * WIDTH),
                   b + "attn.proj.weight": _randn(WIDTH, WIDTH), b + "attn.proj.bias": _randn(WIDTH),
                   b + "mlp.fc1.weight": _randn(4 * WIDTH, WIDTH), b + "mlp.fc1.bias": _randn(4 * WIDTH),
                   b + "mlp.fc2.weight": _randn(WIDTH, 4 * WIDTH), b + "mlp.fc2.bias": _randn(WIDTH)})
    sd.update(_ln("visual.norm"))
    sd["image_projection"] = _randn(WIDTH, EMBED)
    sd.update(_text_keys())
    sd.update({"visual_ema.cls_token": _randn(1, 1, WIDTH), "transformer_e.resblocks.0.ln_1.weight": _randn(32),
               "image_projection_e": _randn(WIDTH, EMBED), "text_projection_e": _randn(32, EMBED),
               "mask_token": _randn(1, 1, WIDTH), "decoder_embed.weight": _randn(WIDTH, WIDTH),
               "decoder_pos_embed": _randn(1, GRID * GRID + 1, WIDTH), "decoder_blocks.0.norm1.weight": _randn(WIDTH),
               "decoder_norm.weight": _randn(WIDTH), "reconstruction_pred.weight": _randn(3 * PATCH * PATCH, WIDTH),
               "ibot_head.last_layer.weight": _randn(8, WIDTH), "ibot_head_e.last_layer.weight": _randn(8, WIDTH)})
    return sd


def _layer_norm(x, sd, prefix, eps):
    return F.layer_norm(x, x.shape[-1:], sd[prefix + ".weight"], sd[prefix + ".bias"], eps)


def _patches(sd, images):
    """Patch tokens with CLS and position embeddings; at another size the embedding is resized by plain bicubic
    (the releases' ``rescale_positional_embedding`` / ``interpolate_pos_embed``)."""
    x = F.conv2d(images, sd["visual.patch_embed.proj.weight"], sd["visual.patch_embed.proj.bias"], stride=PATCH)
    grid = math.isqrt(sd["visual.pos_embed"].shape[1] - 1)
    pos = plain_bicubic_resize(sd["visual.pos_embed"], (grid, grid), tuple(x.shape[-2:]))
    x = x.flatten(2).transpose(1, 2)
    return torch.cat([sd["visual.cls_token"].expand(len(x), -1, -1), x], 1) + pos


def _heads(x):
    return x.reshape(x.shape[0], x.shape[1], HEADS, -1).transpose(1, 2)  # (B, heads, N, head_dim)


def _rotate(t, cos, sin):
    """EVA-CLIP rope: t * cos + rotate_half(t) * sin, rotate_half over interleaved pairs."""
    pairs = t.reshape(*t.shape[:-1], -1, 2)
    half = torch.stack([-pairs[..., 1], pairs[..., 0]], -1).flatten(-2)
    return t * cos + half * sin


def eva_clip_encode_image(sd, images):
    """The released EVA-CLIP VisionTransformer.forward (eval, non-xattn path), then head; at another (square)
    size with its rebuilt RoPE."""
    x, eps = _patches(sd, images), 1e-6
    cos, sin = eva_clip_rope(images.shape[-1] // PATCH)
    for i in range(DEPTH):
        b = f"visual.blocks.{i}."
        h = _layer_norm(x, sd, b + "norm1", eps)
        q = _heads(F.linear(h, sd[b + "attn.q_proj.weight"], sd[b + "attn.q_bias"]))
        k = _heads(F.linear(h, sd[b + "attn.k_proj.weight"]))
        v = _heads(F.linear(h, sd[b + "attn.v_proj.weight"], sd[b + "attn.v_bias"]))
        q = torch.cat([q[:, :, :1], _rotate(q[:, :, 1:], cos, sin)], 2)
        k = torch.cat([k[:, :, :1], _rotate(k[:, :, 1:], cos, sin)], 2)
        attn = ((q * HEAD_DIM ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
        a = (attn @ v).transpose(1, 2).flatten(2)
        x = x + F.linear(_layer_norm(a, sd, b + "attn.inner_attn_ln", eps), sd[b + "attn.proj.weight"],
                         sd[b + "attn.proj.bias"])
        h = _layer_norm(x, sd, b + "norm2", eps)
        h = F.silu(F.linear(h, sd[b + "mlp.w1.weight"], sd[b + "mlp.w1.bias"])) * F.linear(
            h, sd[b + "mlp.w2.weight"], sd[b + "mlp.w2.bias"])
        x = x + F.linear(_layer_norm(h, sd, b + "mlp.ffn_ln", eps), sd[b + "mlp.w3.weight"], sd[b + "mlp.w3.bias"])
    return F.linear(_layer_norm(x, sd, "visual.norm", eps)[:, 0], sd["visual.head.weight"], sd["visual.head.bias"])


def detailclip_encode_image(sd, images):
    """The released DetailCLIP encode_image (timm 0.5.4 ViT, eval, no mask): norm(x)[:, 0] @ image_projection."""
    x, eps = _patches(sd, images), 1e-6
    for i in range(DEPTH):
        b = f"visual.blocks.{i}."
        q, k, v = F.linear(_layer_norm(x, sd, b + "norm1", eps), sd[b + "attn.qkv.weight"],
                           sd[b + "attn.qkv.bias"]).chunk(3, -1)
        attn = ((_heads(q) @ _heads(k).transpose(-2, -1)) * HEAD_DIM ** -0.5).softmax(-1)
        x = x + F.linear((attn @ _heads(v)).transpose(1, 2).flatten(2), sd[b + "attn.proj.weight"],
                         sd[b + "attn.proj.bias"])
        h = F.gelu(F.linear(_layer_norm(x, sd, b + "norm2", eps), sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"]))
        x = x + F.linear(h, sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"])
    return _layer_norm(x, sd, "visual.norm", eps)[:, 0] @ sd["image_projection"]


def _converted_model(name, sd):
    model = open_clip.create_model(name).eval()
    model.load_state_dict(convert_released(sd, model), strict=True)
    return model


def test_detect_format_tells_the_two_released_layouts_from_open_clip():
    assert detect_format(eva_clip_state_dict()) == EVA_CLIP
    assert detect_format(detailclip_state_dict()) == DETAILCLIP
    assert detect_format(open_clip.create_model("finegrain-test").state_dict()) is None


def test_unwrap_takes_state_dict_and_strips_ddp_prefix():
    sd = {"a": torch.zeros(1)}
    assert unwrap({"epoch": 3, "state_dict": {"module.a": sd["a"]}}).keys() == {"a"}
    assert unwrap(sd) is sd


def test_unwrap_looks_in_model_then_module_then_state_dict_as_the_release():
    sd, other = {"a": torch.zeros(1)}, {"b": torch.zeros(1)}
    assert unwrap({"model": sd, "epoch": 1}) is sd
    assert unwrap({"module": {"module.a": sd["a"]}}).keys() == {"a"}
    assert unwrap({"state_dict": other, "module": sd, "model": "EVA02-CLIP-B-16"}) is sd  # a name is no state dict


@pytest.mark.parametrize("wrapper", ["model", "module"])
def test_released_file_wrapped_in_model_or_module_is_converted(configs, tmp_path, wrapper):
    from finegrain.models import create_model

    torch.manual_seed(6)
    sd = eva_clip_state_dict()
    torch.save({wrapper: sd, "epoch": 2}, tmp_path / "released.pt")
    assert read_released(tmp_path / "released.pt").keys() == sd.keys()
    model = create_model("eva-released-test", pretrained=str(tmp_path / "released.pt")).eval()
    images = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), eva_clip_encode_image(sd, images), atol=1e-4, rtol=1e-4)


def test_eva_clip_converted_tensors_equal_their_sources(configs):
    torch.manual_seed(0)
    sd = eva_clip_state_dict()
    model = open_clip.create_model("eva-released-test")
    out = convert_released(sd, model)
    b, t = "visual.blocks.1.attn.", "visual.trunk.blocks.1."
    assert torch.equal(out[t + "attn.q_proj.weight"], sd[b + "q_proj.weight"])
    assert torch.equal(out[t + "attn.k_proj.weight"], sd[b + "k_proj.weight"])
    assert torch.equal(out[t + "attn.q_proj.bias"], sd[b + "q_bias"])
    assert torch.equal(out[t + "attn.v_proj.bias"], sd[b + "v_bias"])
    assert t + "attn.k_proj.bias" not in model.state_dict()  # no k bias in either: k is unbiased, as released
    assert torch.equal(out[t + "attn.norm.weight"], sd[b + "inner_attn_ln.weight"])
    assert torch.equal(out[t + "mlp.fc1_g.weight"], sd["visual.blocks.1.mlp.w1.weight"])
    assert torch.equal(out[t + "mlp.fc1_x.weight"], sd["visual.blocks.1.mlp.w2.weight"])
    assert torch.equal(out[t + "mlp.fc2.weight"], sd["visual.blocks.1.mlp.w3.weight"])
    assert torch.equal(out[t + "mlp.norm.bias"], sd["visual.blocks.1.mlp.ffn_ln.bias"])
    assert torch.equal(out["visual.trunk.head.weight"], sd["visual.head.weight"])
    text = [k for k in sd if k.startswith("text.")]
    assert text and all(torch.equal(out[k], sd[k]) for k in text)


def test_eva_clip_converted_image_embedding_equals_released_forward(configs):
    torch.manual_seed(1)
    sd = eva_clip_state_dict()
    model = _converted_model("eva-released-test", sd)
    images = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        got = model.encode_image(images)
    torch.testing.assert_close(got, eva_clip_encode_image(sd, images), atol=1e-4, rtol=1e-4)


def test_detailclip_converted_image_embedding_equals_released_forward(configs):
    torch.manual_seed(2)
    sd = detailclip_state_dict()
    model = _converted_model("detailclip-released-test", sd)
    images = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        got = model.encode_image(images)
    torch.testing.assert_close(got, detailclip_encode_image(sd, images), atol=1e-4, rtol=1e-4)
    out = model.state_dict()
    assert torch.equal(out["visual.head.proj.weight"], sd["image_projection"].t())
    text = [k for k in sd if k.startswith(("transformer.", "token_embedding", "ln_final")) or k == "text_projection"]
    assert text and all(torch.equal(out[k], sd[k]) for k in text)


def test_unknown_and_missing_keys_are_an_error_listing_them(configs):
    sd = eva_clip_state_dict()
    sd["visual.blocks.0.attn.extra_scale"] = torch.ones(1)
    sd["teacher.cls_token"] = torch.ones(1)
    del sd["visual.blocks.1.mlp.w3.bias"]
    with pytest.raises(ReleasedCheckpointError) as e:
        convert_released(sd, open_clip.create_model("eva-released-test"))
    message = str(e.value)
    assert "unknown source keys: teacher.cls_token" in message
    assert "visual.trunk.blocks.1.mlp.fc2.bias" in message  # missing
    assert "visual.trunk.blocks.0.attn.extra_scale" in message  # unexpected


def test_released_checkpoint_into_a_non_timm_model_is_an_error():
    with pytest.raises(ReleasedCheckpointError, match="timm vision trunk"):
        convert_released(detailclip_state_dict(), open_clip.create_model("finegrain-test"))


def test_read_released_accepts_saved_args_and_ignores_other_checkpoints(tmp_path):
    import argparse

    sd = detailclip_state_dict()
    torch.save({"epoch": 1, "args": argparse.Namespace(lr=1.0), "state_dict": {f"module.{k}": v for k, v in sd.items()}},
               tmp_path / "released.pt")
    torch.save({"state_dict": open_clip.create_model("finegrain-test").state_dict()}, tmp_path / "open_clip.pt")
    assert read_released(tmp_path / "released.pt").keys() == sd.keys()
    assert read_released(tmp_path / "open_clip.pt") is None


def test_convert_command_writes_a_checkpoint_open_clip_loads(configs, tmp_path):
    torch.manual_seed(3)
    sd = eva_clip_state_dict()
    torch.save({"epoch": 6, "name": "clipself", "state_dict": sd}, tmp_path / "released.pt")
    assert main(["convert", "--checkpoint", str(tmp_path / "released.pt"), "--model", "eva-released-test",
                 "--output", str(tmp_path / "out.pt")]) == 0
    saved = torch.load(tmp_path / "out.pt", weights_only=True)
    assert saved["model_name"] == "eva-released-test"
    model = open_clip.create_model("eva-released-test", pretrained=str(tmp_path / "out.pt")).eval()
    images = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), eva_clip_encode_image(sd, images), atol=1e-4, rtol=1e-4)


def test_convert_command_says_nothing_of_random_weights(configs, tmp_path, caplog):
    """open_clip's "No pretrained weights loaded ... initialized randomly" is not shown: the weights are loaded."""
    torch.save({"state_dict": eva_clip_state_dict()}, tmp_path / "released.pt")
    with caplog.at_level(logging.INFO):
        assert main(["convert", "--checkpoint", str(tmp_path / "released.pt"), "--model", "eva-released-test",
                     "--output", str(tmp_path / "out.pt")]) == 0
    assert "No pretrained weights loaded" not in caplog.text
    assert "randomly" not in caplog.text


def test_release_model_names_are_open_clip_names_and_say_so(caplog):
    from finegrain.models import create_model, get_tokenizer, resolve_model_name

    names = {"EVA02-CLIP-B-16": "EVA02-B-16", "EVA02-CLIP-L-14": "EVA02-L-14", "EVA02-CLIP-L-14-336": "EVA02-L-14-336"}
    assert {name: resolve_model_name(name) for name in names} == names
    assert get_tokenizer("EVA02-CLIP-L-14")(["a dog"]).shape == (1, 77)
    with caplog.at_level(logging.INFO):
        model = create_model("EVA02-CLIP-B-16")
    assert model.name == "EVA02-B-16" and type(model.clip.visual.trunk).__name__ == "Eva"
    said = [r.getMessage() for r in caplog.records if "EVA02-CLIP-B-16" in r.getMessage()]
    assert said == ["model EVA02-CLIP-B-16 (the FineCLIP / CLIPSelf releases' name) is open_clip's EVA02-B-16"]


def test_convert_command_modes_are_exclusive(tmp_path, capsys):
    assert main(["convert", "--checkpoint", "x.pt", "--captions", "c.json", "--output", str(tmp_path / "o")]) == 2
    assert "either" in capsys.readouterr().err
    assert main(["convert", "--checkpoint", "x.pt", "--output", str(tmp_path / "o")]) == 2
    assert "--model" in capsys.readouterr().err


def test_create_model_converts_a_released_file(configs, tmp_path):
    from finegrain.models import create_model

    torch.manual_seed(4)
    sd = detailclip_state_dict()
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "released.pt")
    model = create_model("detailclip-released-test", pretrained=str(tmp_path / "released.pt")).eval()
    images = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), detailclip_encode_image(sd, images), atol=1e-4, rtol=1e-4)


OTHER_SIZE = 7 * PATCH  # neither the released size nor a multiple of it


def test_detailclip_position_embeddings_are_resized_for_another_image_size(configs, tmp_path):
    """A model built at another size loads the file with position embeddings resized by plain bicubic, as
    DetailCLIP's ``interpolate_pos_embed`` does, and then embeds images as the release would."""
    from finegrain.models import create_model

    torch.manual_seed(5)
    sd = detailclip_state_dict()
    torch.save(sd, tmp_path / "released.pt")
    model = create_model("detailclip-released-test", pretrained=str(tmp_path / "released.pt"), image_size=OTHER_SIZE)
    grid = OTHER_SIZE // PATCH
    expected = plain_bicubic_resize(sd["visual.pos_embed"], (GRID, GRID), (grid, grid))
    torch.testing.assert_close(model.clip.visual.trunk.pos_embed, expected, atol=1e-6, rtol=0)
    images = torch.randn(2, 3, OTHER_SIZE, OTHER_SIZE)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), detailclip_encode_image(sd, images), atol=1e-5,
                                   rtol=1e-4)


def test_eva_clip_at_another_size_equals_released_forward(configs, tmp_path):
    """Built at the released size and run at another, or built at another size: the image embedding is the
    release's at that size (position embedding resized by plain bicubic, RoPE rebuilt as ``recalculate``)."""
    from finegrain.models import create_model

    torch.manual_seed(7)
    sd = eva_clip_state_dict()
    torch.save(sd, tmp_path / "released.pt")
    images = torch.randn(2, 3, OTHER_SIZE, OTHER_SIZE)
    expected = eva_clip_encode_image(sd, images)
    native = create_model("eva-released-test", pretrained=str(tmp_path / "released.pt")).eval()
    built = create_model("eva-released-test", pretrained=str(tmp_path / "released.pt"), image_size=OTHER_SIZE).eval()
    grid = OTHER_SIZE // PATCH
    torch.testing.assert_close(built.clip.visual.trunk.pos_embed,
                               plain_bicubic_resize(sd["visual.pos_embed"], (GRID, GRID), (grid, grid)), atol=1e-6, rtol=0)
    with torch.no_grad():
        for model in (native, built):
            torch.testing.assert_close(model.encode_image(images), expected, atol=1e-5, rtol=1e-4)
