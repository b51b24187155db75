"""Captioners: BLIP-2 and generic transformers image-to-text models (tiny random models built in memory and
loaded back by path), RegionCLIP's template captioner, and building them by name."""

import subprocess
import sys

import pytest
import torch
from annotate_models import NUM_QUERY_TOKENS, tiny_blip2, tiny_vision_encoder_decoder
from photos import photo
from PIL import Image
from torch import nn
from torchvision import transforms

from finegrain.annotate.captioners import (
    REGIONCLIP_TEMPLATES,
    Blip2Captioner,
    ImageToTextCaptioner,
    TemplateCaptioner,
    build_captioner,
    generated_tokens,
    prompt_text,
    resolve_dtype,
)
from finegrain.eval.classification import class_text_embeddings
from finegrain.models import create_model, get_tokenizer

PROMPT = "Describe this image in one sentence."


@pytest.fixture(scope="module")
def blip2_path(tmp_path_factory):
    pytest.importorskip("transformers")
    return tiny_blip2(tmp_path_factory.mktemp("blip2"))


@pytest.fixture(scope="module")
def crops():
    """20 crops of different sizes from four photographs."""
    return [photo(name).crop((10 * i, 7 * i, 110 + 23 * i, 97 + 18 * i))
            for name in ("astronaut", "coffee", "chelsea", "rocket") for i in range(5)]


def load_blip2(path):
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    return Blip2ForConditionalGeneration.from_pretrained(path), Blip2Processor.from_pretrained(path)


def decoded(processor, tokens):
    return [text.strip() for text in processor.batch_decode(tokens, skip_special_tokens=True)]


def raw_blip2(path, images, text):
    """The model's own ``generate`` output and the processor's input ids, without the captioner."""
    model, processor = load_blip2(path)
    inputs = processor(images=images, text=text, return_tensors="pt")
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=8, do_sample=False), inputs.get("input_ids"), processor


# ----- stripping the prompt -----------------------------------------------------------------------------


def test_generated_tokens_drops_the_input_only_where_the_output_starts_with_it():
    input_ids = torch.tensor([[9, 9, 1, 5], [9, 9, 1, 6]])
    continuation = torch.tensor([[7, 8, 2], [4, 2, 0]])
    assert torch.equal(generated_tokens(torch.cat([input_ids, continuation], dim=1), input_ids), continuation)
    # versions that return only the continuation (here with the same length as the input): kept whole
    assert torch.equal(generated_tokens(continuation, input_ids), continuation)
    longer = torch.tensor([[1, 5, 7, 8, 2], [1, 6, 4, 2, 0]])
    assert torch.equal(generated_tokens(longer, input_ids), longer)
    assert torch.equal(generated_tokens(continuation, None), continuation)


def test_blip2_captions_leave_out_the_prompt_the_model_returns(blip2_path, crops):
    raw, input_ids, processor = raw_blip2(blip2_path, crops[:3], [PROMPT] * 3)
    assert torch.equal(raw[:, :input_ids.shape[1]], input_ids)  # generate returns image tokens + prompt first
    assert all(text.startswith("describe this image in one sentence.") for text in decoded(processor, raw))

    captions = Blip2Captioner.from_pretrained(blip2_path, max_new_tokens=8).caption(crops[:3])
    assert captions == decoded(processor, raw[:, input_ids.shape[1]:])
    assert all(caption and not caption.startswith("describe") for caption in captions)


def test_unconditional_blip2_captions_start_where_blip2_starts_by_itself(blip2_path, crops):
    raw, input_ids, processor = raw_blip2(blip2_path, crops[:3], None)  # the model adds image tokens + bos
    assert input_ids is None
    expected = decoded(processor, raw[:, NUM_QUERY_TOKENS + 1:])
    for prompt in (None, ""):
        captioner = Blip2Captioner.from_pretrained(blip2_path, prompt=prompt, max_new_tokens=8)
        assert captioner.caption(crops[:3]) == expected
        assert "prompt='' " in captioner.describe()


# ----- batching, image modes, precision ------------------------------------------------------------------


def test_batched_captions_equal_one_at_a_time_captions(blip2_path, crops):
    batched = Blip2Captioner.from_pretrained(blip2_path, batch_size=7, max_new_tokens=10).caption(crops)
    single = Blip2Captioner.from_pretrained(blip2_path, batch_size=1, max_new_tokens=10).caption(crops)
    assert batched == single
    assert len(batched) == len(crops) and len(set(batched)) > 5  # the captions depend on the image


def test_images_of_any_mode_are_captioned_as_their_rgb_conversion(blip2_path, crops):
    captioner = Blip2Captioner.from_pretrained(blip2_path, max_new_tokens=6)
    grey, palette, opaque = crops[0].convert("L"), crops[5].convert("P"), crops[10].convert("RGBA")
    as_rgb = [grey.convert("RGB"), palette.convert("RGB"), crops[10]]
    assert captioner.caption([grey, palette, opaque]) == captioner.caption(as_rgb)
    assert captioner.caption([]) == []


def test_precision_sets_the_weights_dtype_and_is_described(blip2_path, crops):
    assert resolve_dtype(None, "cpu") == torch.float32 and resolve_dtype(None, "cuda") == torch.bfloat16
    captioner = Blip2Captioner.from_pretrained(blip2_path, precision="bf16", max_new_tokens=4)
    assert captioner.model.dtype == torch.bfloat16
    assert captioner.describe() == (f"blip2:{blip2_path} prompt='Describe this image in one sentence.' "
                                    "max_new_tokens=4 bf16")
    assert len(captioner.caption(crops[:2])) == 2  # pixels are cast to the weights' dtype
    with pytest.raises(ValueError, match=r"precision must be one of \['bf16', 'fp16', 'fp32'\]"):
        Blip2Captioner.from_pretrained(blip2_path, precision="half")


def test_bad_generation_options_name_the_option(blip2_path):
    with pytest.raises(ValueError, match="max_new_tokens must be a positive integer, got 0"):
        Blip2Captioner.from_pretrained(blip2_path, max_new_tokens=0)


# ----- BLIP-2 processor and model agreement ----------------------------------------------------------------


def test_blip2_processor_without_num_query_tokens_takes_the_models(blip2_path, crops):
    model, processor = load_blip2(blip2_path)
    expected = Blip2Captioner(model, processor, max_new_tokens=5).caption(crops[:2])
    processor.num_query_tokens = None  # as processors saved before transformers 4.47
    assert Blip2Captioner(model, processor, max_new_tokens=5).caption(crops[:2]) == expected
    assert processor.num_query_tokens == NUM_QUERY_TOKENS


def test_blip2_processor_disagreeing_with_the_model_is_an_error(blip2_path):
    model, processor = load_blip2(blip2_path)
    processor.num_query_tokens = NUM_QUERY_TOKENS + 1
    with pytest.raises(ValueError, match=f"processor num_query_tokens={NUM_QUERY_TOKENS + 1}.*model config "
                                         f"num_query_tokens={NUM_QUERY_TOKENS}"):
        Blip2Captioner(model, processor)


# ----- generic image-to-text models ------------------------------------------------------------------------


def test_hf_captioner_loads_blip2_through_the_auto_classes(blip2_path, crops):
    captioner = build_captioner("hf", checkpoint=blip2_path, max_new_tokens=8)
    assert type(captioner.model).__name__ == "Blip2ForConditionalGeneration"
    assert captioner.describe().startswith(f"hf:{blip2_path} prompt=")
    blip2 = Blip2Captioner.from_pretrained(blip2_path, max_new_tokens=8)
    assert captioner.caption(crops[:4]) == blip2.caption(crops[:4])


def test_chat_template_puts_the_prompt_in_a_user_turn(blip2_path, crops):
    model, processor = load_blip2(blip2_path)
    assert prompt_text(processor, "what is this?") == "what is this?"
    plain = ImageToTextCaptioner(model, processor, prompt="question: what is this? answer:", max_new_tokens=6)
    expected = plain.caption(crops[:3])
    processor.chat_template = ("{% for m in messages %}{% for c in m['content'] %}"
                               "{% if c['type'] == 'text' %}question: {{ c['text'] }}{% endif %}"
                               "{% endfor %}{% endfor %}{% if add_generation_prompt %} answer:{% endif %}")
    assert prompt_text(processor, "what is this?") == "question: what is this? answer:"
    templated = ImageToTextCaptioner(model, processor, prompt="what is this?", max_new_tokens=6)
    assert templated.caption(crops[:3]) == expected


def test_vision_encoder_decoder_without_a_processor_captions(tmp_path, crops):
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer, VisionEncoderDecoderModel, ViTImageProcessor

    path = tiny_vision_encoder_decoder(tmp_path / "ved")
    captioner = ImageToTextCaptioner.from_pretrained(path, prompt=None, max_new_tokens=6)
    model, tokenizer = VisionEncoderDecoderModel.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    pixels = ViTImageProcessor.from_pretrained(path)(crops[:4], return_tensors="pt").pixel_values
    with torch.no_grad():
        raw = model.generate(pixel_values=pixels, max_new_tokens=6, do_sample=False)
    assert captioner.caption(crops[:4]) == decoded(tokenizer, raw)
    assert all(captioner.caption(crops[:4]))


# ----- template captioner ----------------------------------------------------------------------------------

COLOURS = ("red", "green", "blue")


class ColourCLIP(nn.Module):
    """A CLIP whose image embedding is the mean (r, g, b) of the pixels and whose text embedding is the
    one-hot of the colour its prompt names (the tokenizer below writes that colour's index)."""

    def encode_image(self, pixels, normalize=False):
        features = pixels.mean(dim=(2, 3))
        return nn.functional.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens, normalize=False):
        return nn.functional.one_hot(tokens[:, 0], len(COLOURS)).float()


def colour_tokenizer(texts):
    words = [text.rstrip(".").split() for text in texts]
    return torch.tensor([[next(i for i, c in enumerate(COLOURS) if c in w)] for w in words])


def test_template_captioner_writes_the_most_similar_concept():
    captioner = TemplateCaptioner(ColourCLIP(), colour_tokenizer, list(COLOURS), template="a {} region",
                                  transform=transforms.ToTensor(), batch_size=2)
    images = [Image.new("RGB", (9, 7), colour) for colour in ((200, 30, 40), (10, 20, 250), (40, 220, 100))]
    captions, scores = captioner.caption_with_scores(images)
    assert captions == ["a red region", "a blue region", "a green region"]
    expected = [200 / (200**2 + 30**2 + 40**2) ** 0.5, 250 / (10**2 + 20**2 + 250**2) ** 0.5,
                220 / (40**2 + 220**2 + 100**2) ** 0.5]
    assert scores == pytest.approx(expected, abs=1e-3)  # ToTensor's /255 rounding
    assert captioner.caption(images[:1]) == ["a red region"]
    assert captioner.caption_with_scores([]) == ([], [])


def test_template_captioner_matches_a_hand_computed_clip_classification(tmp_path, crops):
    concepts = tmp_path / "concepts.txt"
    concepts.write_text("cat\nrocket\ncup of coffee\n")
    captioner = build_captioner("template", model_name="finegrain-test", concepts=str(concepts), batch_size=8)
    assert captioner.describe() == (f"template:finegrain-test concepts={concepts}(3) "
                                    "template='a photo of a {}.' templates=regionclip")
    model, tokenizer = create_model("finegrain-test"), get_tokenizer("finegrain-test")
    model.load_state_dict(captioner.model.state_dict())  # random weights: the same ones
    names = ["cat", "rocket", "cup of coffee"]
    classifier = class_text_embeddings(model, tokenizer, names, REGIONCLIP_TEMPLATES, progress=False)
    transform = transforms.Compose([transforms.Resize(32, interpolation=transforms.InterpolationMode.BICUBIC),
                                    transforms.CenterCrop(32), transforms.ToTensor(),
                                    transforms.Normalize((0.48145466, 0.4578275, 0.40821073),
                                                         (0.26862954, 0.26130258, 0.27577711))])
    with torch.no_grad():
        pixels = torch.stack([transform(crop) for crop in crops])
        similarity = model.eval().encode_image(pixels, normalize=True) @ classifier.T
    captions, scores = captioner.caption_with_scores(crops)
    assert captions == [f"a photo of a {names[i]}." for i in similarity.argmax(dim=1).tolist()]
    assert scores == pytest.approx(similarity.max(dim=1).values.tolist(), abs=1e-5)


def test_template_captioner_takes_a_built_in_concept_list_and_checks_its_template():
    model, tokenizer = create_model("finegrain-test"), get_tokenizer("finegrain-test")
    captioner = TemplateCaptioner(model, tokenizer, "pascal-context-59", templates="simple")
    assert captioner.describe() == ("template:finegrain-test concepts=pascal-context-59(59) "
                                    "template='a photo of a {}.' templates=simple")
    assert captioner.classifier.shape == (59, model.clip.text_projection.shape[1])
    with pytest.raises(ValueError, match="template must contain '{}' for the concept, got 'a photo'"):
        TemplateCaptioner(model, tokenizer, ["cat"], template="a photo")


# ----- building by name ------------------------------------------------------------------------------------


def test_build_captioner_errors_name_the_captioner_and_the_options():
    with pytest.raises(ValueError, match=r"unknown captioner 'blip3'; expected one of \['blip2', 'hf', 't"):
        build_captioner("blip3")
    with pytest.raises(ValueError, match=r"captioner 'blip2': unknown options \['beams', 'temperature'\]; "
                                         r"missing options \['checkpoint'\]; "
                                         r"its options are \['checkpoint', 'prompt', "):
        build_captioner("blip2", beams=3, temperature=0.7)
    with pytest.raises(ValueError, match=r"'template': missing options \['model_name', 'concepts'\]"):
        build_captioner("template")


def test_captioners_module_imports_without_transformers():
    code = ("import sys; sys.modules['transformers'] = None; import finegrain.annotate.captioners as c; "
            "print(c.build_captioner.__name__)")
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "build_captioner"


def test_template_captioner_shows_a_progress_bar_while_encoding_its_concept_prompts(capsys):
    model, tokenizer = create_model("finegrain-test"), get_tokenizer("finegrain-test")
    TemplateCaptioner(model, tokenizer, ["cat", "dog"], templates="simple", progress=True)
    assert "class prompts" in capsys.readouterr().err
    TemplateCaptioner(model, tokenizer, ["cat", "dog"], templates="simple")
    assert "class prompts" not in capsys.readouterr().err


def _no_network(address, timeout):
    raise OSError("no route to host")


@pytest.mark.parametrize("offline", ["env", "unreachable"])
def test_hub_captioner_offline_fails_at_once_naming_what_to_download_and_pass(tmp_path, monkeypatch, offline):
    from finegrain.models import factory
    from finegrain.models.factory import PretrainedWeightsUnavailable

    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    if offline == "env":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(factory.socket, "create_connection", _no_network)
    monkeypatch.chdir(tmp_path)
    why = "HF_HUB_OFFLINE" if offline == "env" else "huggingface.co is unreachable"
    with pytest.raises(PretrainedWeightsUnavailable, match=rf"'finegrain-test/not-cached'.*{why}.*hf download "
                                                           r"finegrain-test/not-cached --local-dir DIR.*--caption-model DIR"):
        Blip2Captioner.from_pretrained("finegrain-test/not-cached")


def test_local_captioner_folder_needs_no_network(blip2_path, monkeypatch):
    from finegrain.models import factory

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(factory.socket, "create_connection", _no_network)
    Blip2Captioner.from_pretrained(blip2_path)  # no error
