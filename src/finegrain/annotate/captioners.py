"""Captioners: one sentence per image (a region crop or a whole image), from a vision-language model or a
CLIP and a concept list.

- :class:`ImageToTextCaptioner`: any transformers image-to-text model (``AutoModelForImageTextToText``:
  BLIP, BLIP-2, GIT, LLaVA, Qwen2-VL, Florence-2, a ViT + GPT-2 ``VisionEncoderDecoderModel``, ...) with
  its processor; batched greedy generation, prompt tokens removed from the output.
- :class:`Blip2Captioner`: the same for BLIP-2, the annotator FineCLIP used (BLIP2-COCO-6.7B, i.e.
  ``Salesforce/blip2-opt-6.7b-coco``, prompt "Describe this image in one sentence." on each cropped
  region, FineCLIP §3.2).
- :class:`TemplateCaptioner`: RegionCLIP's rule-based captions: a CLIP picks the concept of a pool most
  similar to the image and writes it into a template ("a photo of a {}.").

:func:`build_captioner` builds one by name from options named as its ``from_pretrained`` arguments.
transformers is imported only when a model is loaded, so this module imports without it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from pathlib import Path
from urllib.parse import urlparse

import open_clip
import torch
from PIL import Image
from torch import nn

from finegrain.data.images import to_rgb
from finegrain.errors import DataError
from finegrain.eval.classification import class_text_embeddings
from finegrain.eval.encode import batched, evaluating
from finegrain.eval.prompts import TEMPLATE_SETS, load_class_names
from finegrain.models import create_model, get_tokenizer
from finegrain.models.factory import PretrainedWeightsUnavailable, network_unavailable

DEFAULT_PROMPT = "Describe this image in one sentence."
PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# RegionCLIP's concept embeddings average these 81 prompts (its clip_prompt_utils.get_prompt_templates):
# the 80 OpenAI ImageNet templates and "{}."
REGIONCLIP_TEMPLATES = ("{}.", *TEMPLATE_SETS["openai"].templates)


def rgb_images(images: Sequence[Image.Image]) -> list[Image.Image]:
    """Images of any Pillow mode as 8-bit RGB (alpha composited on white, 16-bit scaled)."""
    return [to_rgb(image, f"image {i}") for i, image in enumerate(images)]


def resolve_dtype(precision: str | None, device: str | torch.device) -> torch.dtype:
    """The weights' dtype for ``precision``: ``bf16`` | ``fp16`` | ``fp32``, or None for bf16 on CUDA and
    fp32 elsewhere."""
    if precision is None:
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if precision not in PRECISIONS:
        raise DataError(f"precision must be one of {sorted(PRECISIONS)} or None, got {precision!r}")
    return PRECISIONS[precision]


def generated_tokens(outputs: torch.Tensor, input_ids: torch.Tensor | None) -> torch.Tensor:
    """The new tokens of ``generate``'s ``(B, T)`` output. Decoder-only language models return the ``(B, L)``
    input ids (image tokens and prompt) followed by the continuation in some transformers versions and
    only the continuation in others: the first ``L`` tokens are dropped exactly when they are the input."""
    if input_ids is None:
        return outputs
    length = input_ids.shape[1]
    if outputs.shape[1] >= length and torch.equal(outputs[:, :length], input_ids.to(outputs.device)):
        return outputs[:, length:]
    return outputs


def prompt_text(processor, prompt: str) -> str:
    """The text given to the processor for ``prompt``: the prompt itself, or, for a processor with a chat
    template (LLaVA, Qwen2-VL, ...), one user turn of an image and the prompt, then the assistant's cue."""
    if getattr(processor, "chat_template", None) is None:
        return prompt
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def check_checkpoint_reachable(checkpoint: str) -> None:
    """Fail fast, in one line, when ``checkpoint`` is neither a local folder nor in the Hugging Face cache and
    the hub cannot be reached (transformers would retry for half a minute, then fail)."""
    if Path(checkpoint).exists():
        return
    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(checkpoint, "config.json"), str):
        return
    why = network_unavailable(urlparse(constants.ENDPOINT).hostname)
    if why is not None:
        raise PretrainedWeightsUnavailable(
            f"captioner model {checkpoint!r} is neither a local folder nor in the Hugging Face cache "
            f"({constants.HF_HUB_CACHE}) and the network is unavailable ({why}): download it where there is "
            f"network (hf download {checkpoint} --local-dir DIR) and pass the folder (finegrain annotate "
            "--caption-model DIR)")


class ImageToTextCaptioner:
    """Captions from a transformers image-to-text ``model`` and its ``processor`` (objects already built).

    ``batch_size`` images go through each ``generate`` call, greedy (``num_beams=1``) unless ``num_beams``
    says otherwise, at most ``max_new_tokens`` tokens. ``prompt`` (None or "": unconditional captioning) is
    given with every image; the tokenizer pads on the left, so that batched prompts of different lengths
    (images with different numbers of image tokens) end where generation starts. The model is moved to
    ``device`` and put in eval mode. ``name`` starts :meth:`describe`.
    """

    default_name = "hf"
    unconditional_text: str | None = None  # text given to the processor when there is no prompt

    def __init__(self, model: nn.Module, processor, prompt: str | None = DEFAULT_PROMPT,
                 max_new_tokens: int = 30, num_beams: int = 1, batch_size: int = 16,
                 device: str | torch.device = "cpu", name: str | None = None):
        options = {"max_new_tokens": max_new_tokens, "num_beams": num_beams, "batch_size": batch_size}
        for key, value in options.items():
            if not isinstance(value, int) or value < 1:
                raise DataError(f"captioner option {key} must be a positive integer, got {value!r}")
        self.model = model.to(device).eval()
        self.processor = processor
        tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.padding_side = "left"
        self.prompt = prompt or None
        self.text = prompt_text(processor, self.prompt) if self.prompt else self.unconditional_text
        self.max_new_tokens = max_new_tokens
        self.num_beams = num_beams
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.name = name or self.default_name

    @classmethod
    def from_pretrained(cls, checkpoint: str | Path, prompt: str | None = DEFAULT_PROMPT,
                        max_new_tokens: int = 30, num_beams: int = 1, batch_size: int = 16,
                        device: str = "cpu", precision: str | None = None) -> ImageToTextCaptioner:
        """Load ``checkpoint`` (a local directory or a Hugging Face hub id) in ``precision`` (see
        :func:`resolve_dtype`) onto ``device``."""
        try:
            import transformers  # noqa: F401
        except ImportError as e:
            raise ImportError(f"the {cls.default_name} captioner needs transformers: "
                              "pip install 'finegrain[annotate]'") from e
        check_checkpoint_reachable(str(checkpoint))
        model, processor = cls.load(str(checkpoint), resolve_dtype(precision, device))
        return cls(model, processor, prompt=prompt, max_new_tokens=max_new_tokens, num_beams=num_beams,
                   batch_size=batch_size, device=device)

    @staticmethod
    def load(checkpoint: str, dtype: torch.dtype) -> tuple[nn.Module, object]:
        """``(model, processor)`` of ``checkpoint`` by transformers' Auto classes; a checkpoint that has an
        image processor and a tokenizer but no processor (a ``VisionEncoderDecoderModel``) gets the two
        joined in a ``VisionTextDualEncoderProcessor`` (which only routes images and text to them)."""
        import transformers
        from transformers import (
            AutoImageProcessor,
            AutoProcessor,
            AutoTokenizer,
            VisionTextDualEncoderProcessor,
        )

        # transformers 5 has AutoModelForImageTextToText only; 4.x also the older AutoModelForVision2Seq
        auto = getattr(transformers, "AutoModelForImageTextToText", None)
        model = (auto or transformers.AutoModelForVision2Seq).from_pretrained(checkpoint, dtype=dtype)
        processor = AutoProcessor.from_pretrained(checkpoint)
        if not hasattr(processor, "image_processor"):
            processor = VisionTextDualEncoderProcessor(AutoImageProcessor.from_pretrained(checkpoint),
                                                       AutoTokenizer.from_pretrained(checkpoint))
        return model, processor

    def describe(self) -> str:
        checkpoint = getattr(self.model, "name_or_path", "") or "in-memory"
        precision = {v: k for k, v in PRECISIONS.items()}.get(self.model.dtype, str(self.model.dtype))
        beams = f" num_beams={self.num_beams}" if self.num_beams != 1 else ""
        return (f"{self.name}:{checkpoint} prompt={self.prompt or ''!r} max_new_tokens={self.max_new_tokens}"
                f"{beams} {precision}")

    def caption(self, images: Sequence[Image.Image]) -> list[str]:
        captions = []
        for batch in batched(rgb_images(images), self.batch_size):
            captions.extend(self._caption_batch(batch))
        return captions

    @torch.no_grad()
    def _caption_batch(self, images: list[Image.Image]) -> list[str]:
        texts = None if self.text is None else [self.text] * len(images)
        # PIL images are height x width x channels: said explicitly, since a crop 3 pixels wide or high would
        # otherwise be taken for channels-first by some image processors
        inputs = self.processor(images=images, text=texts, return_tensors="pt", padding=True,
                                input_data_format="channels_last")
        inputs = {key: self._to_device(value) for key, value in inputs.items()}
        outputs = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False,
                                      num_beams=self.num_beams)
        new = generated_tokens(outputs, inputs.get("input_ids"))
        return [caption.strip() for caption in self.processor.batch_decode(new, skip_special_tokens=True)]

    def _to_device(self, value):
        """A processor output on the model's device; floating tensors (pixels) in the model's dtype."""
        if not isinstance(value, torch.Tensor):
            return value
        return value.to(self.device, self.model.dtype if value.is_floating_point() else value.dtype)


class Blip2Captioner(ImageToTextCaptioner):
    """BLIP-2 (``Blip2ForConditionalGeneration`` + ``Blip2Processor``) captions; see
    :class:`ImageToTextCaptioner`. The processor must put ``num_query_tokens`` image tokens before each text
    (transformers >= 4.47 layout): a processor without ``num_query_tokens`` gets the model's, and its image
    token must be the one the model's config names (else the images would be silently ignored). ``options``:
    those of :class:`ImageToTextCaptioner`."""

    default_name = "blip2"
    unconditional_text = ""  # the tokenizer's bos after the image tokens, as BLIP-2's own unconditional start

    def __init__(self, model: nn.Module, processor, **options):
        config = model.config
        if processor.num_query_tokens is None:
            processor.num_query_tokens = config.num_query_tokens
        image_token = processor.tokenizer.convert_tokens_to_ids(str(processor.image_token))
        if processor.num_query_tokens != config.num_query_tokens or image_token != config.image_token_id:
            raise DataError(f"BLIP-2 processor and model disagree: processor num_query_tokens="
                            f"{processor.num_query_tokens}, image token id {image_token}; model config "
                            f"num_query_tokens={config.num_query_tokens}, "
                            f"image_token_id={config.image_token_id}")
        super().__init__(model, processor, **options)

    @staticmethod
    def load(checkpoint: str, dtype: torch.dtype) -> tuple[nn.Module, object]:
        from transformers import Blip2ForConditionalGeneration, Blip2Processor

        return (Blip2ForConditionalGeneration.from_pretrained(checkpoint, dtype=dtype),
                Blip2Processor.from_pretrained(checkpoint))


def clip_eval_transform(model: nn.Module) -> Callable[[Image.Image], torch.Tensor]:
    """open_clip's evaluation preprocessing of ``model``: resize, centre crop to ``model.image_size``,
    normalise with the model's mean/std (CLIP's when it has none)."""
    cfg = open_clip.get_model_preprocess_cfg(model)
    return open_clip.image_transform(model.image_size, is_train=False, mean=cfg.get("mean"),
                                     std=cfg.get("std"), resize_mode=cfg.get("resize_mode"),
                                     interpolation=cfg.get("interpolation"))


class TemplateCaptioner:
    """RegionCLIP's rule-based captions: ``template.format(concept)`` with the concept whose text embedding
    is most cosine-similar to the image's CLIP embedding.

    Args:
        model: a :class:`finegrain.models.FinegrainCLIP` (moved to ``device``).
        tokenizer: its text tokenizer.
        concepts: the concept pool: a list, a file (one per line) or a built-in class-name list
            (:func:`finegrain.eval.prompts.load_class_names`).
        template: the caption written for the chosen concept (``{}`` is the concept).
        templates: the prompts averaged into each concept's text embedding: ``"regionclip"`` (RegionCLIP's
            81 prompts) or what :func:`finegrain.eval.prompts.load_templates` takes.
        transform: PIL image -> ``(3, H, W)``; default :func:`clip_eval_transform`.
        concepts_name: the pool's name in :meth:`describe` (default: ``concepts`` when a name or file).
        model_label: the model's name in :meth:`describe` (default: ``model.name``).
        progress: a progress bar while the concept prompts are encoded (1,000 ImageNet classes x 81
            prompts take minutes on a CPU).

    Deviations from RegionCLIP: it matches RoI-pooled region features of the whole image, while a
    captioner sees each region as a crop, so here the CLIP embeds the crop; concept names go into the
    prompts as given (RegionCLIP drops "," and turns "+" into a space).
    """

    def __init__(self, model: nn.Module, tokenizer: Callable[[list[str]], torch.Tensor],
                 concepts: str | Sequence[str], template: str = "a photo of a {}.",
                 templates: str | Sequence[str] = "regionclip",
                 transform: Callable[[Image.Image], torch.Tensor] | None = None, batch_size: int = 64,
                 device: str | torch.device = "cpu", concepts_name: str | None = None,
                 model_label: str | None = None, progress: bool = False):
        if "{}" not in template:
            raise DataError(f"captioner option template must contain '{{}}' for the concept, "
                            f"got {template!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise DataError(f"captioner option batch_size must be a positive integer, got {batch_size!r}")
        self.model = model.to(device)
        self.concepts = load_class_names(concepts)
        self.concepts_name = concepts_name or (concepts if isinstance(concepts, str) else "list")
        self.template = template
        self.templates_name = templates if isinstance(templates, str) else f"list({len(templates)})"
        self.transform = transform or clip_eval_transform(model)
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.model_label = model_label or getattr(model, "name", "") or type(model).__name__
        prompts = REGIONCLIP_TEMPLATES if templates == "regionclip" else templates
        self.classifier = class_text_embeddings(model, tokenizer, self.concepts, prompts, batch_size, device,
                                                progress)  # (C, D)

    @classmethod
    def from_pretrained(cls, model_name: str, concepts: str | Sequence[str], pretrained: str | None = None,
                        template: str = "a photo of a {}.", templates: str | Sequence[str] = "regionclip",
                        batch_size: int = 64, device: str = "cpu", progress: bool = False) -> TemplateCaptioner:
        """A captioner with the CLIP ``model_name`` (any name :func:`finegrain.models.create_model` takes)
        and ``pretrained`` weights (an open_clip tag or a checkpoint file)."""
        model = create_model(model_name, pretrained, device=device)
        label = model_name + (f" pretrained={pretrained}" if pretrained else "")
        return cls(model, get_tokenizer(model_name), concepts, template=template, templates=templates,
                   batch_size=batch_size, device=device, model_label=label, progress=progress)

    def describe(self) -> str:
        return (f"template:{self.model_label} concepts={self.concepts_name}({len(self.concepts)}) "
                f"template={self.template!r} templates={self.templates_name}")

    def caption(self, images: Sequence[Image.Image]) -> list[str]:
        return self.caption_with_scores(images)[0]

    def caption_with_scores(self, images: Sequence[Image.Image]) -> tuple[list[str], list[float]]:
        """The captions and the cosine similarity of each image to its chosen concept."""
        best, scores = self.best_concepts(images)
        return [self.template.format(self.concepts[i]) for i in best.tolist()], scores.tolist()

    def best_concepts(self, images: Sequence[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(N,)`` index of each image's most similar concept and ``(N,)`` that cosine similarity."""
        similarities = []
        with evaluating(self.model):
            for batch in batched(rgb_images(images), self.batch_size):
                pixels = torch.stack([self.transform(image) for image in batch]).to(self.device)
                embeddings = self.model.encode_image(pixels, normalize=True).float()  # (b, D)
                similarities.append(embeddings @ self.classifier.T)  # (b, C)
        if not similarities:
            return torch.zeros(0, dtype=torch.long), torch.zeros(0)
        scores, best = torch.cat(similarities).max(dim=1)
        return best.cpu(), scores.cpu()


CAPTIONERS: dict[str, Callable[..., object]] = {
    "blip2": Blip2Captioner.from_pretrained,
    "hf": ImageToTextCaptioner.from_pretrained,
    "template": TemplateCaptioner.from_pretrained,
}


def build_captioner(name: str, **options) -> ImageToTextCaptioner | TemplateCaptioner:
    """The captioner ``name`` (``blip2`` | ``hf`` | ``template``) built by its ``from_pretrained`` from
    ``options`` (named as that method's arguments)."""
    if name not in CAPTIONERS:
        raise DataError(f"unknown captioner {name!r}; expected one of {sorted(CAPTIONERS)}")
    parameters = inspect.signature(CAPTIONERS[name]).parameters
    unknown = sorted(set(options) - set(parameters))
    missing = [key for key, p in parameters.items()
               if p.default is inspect.Parameter.empty and key not in options]
    problems = ([f"unknown options {unknown}"] if unknown else []) + (
        [f"missing options {missing}"] if missing else [])
    if problems:
        raise DataError(f"captioner {name!r}: {'; '.join(problems)}; its options are {list(parameters)}")
    return CAPTIONERS[name](**options)
