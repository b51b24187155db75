"""Predictors: a loaded checkpoint run on new images with class names chosen at call time.

``load_predictor(CHECKPOINT)`` picks the predictor of what the checkpoint holds:

- a ``finetune-det`` run (Mask R-CNN): :class:`InstanceDetector`, boxes, scores, labels and masks of its classes;
- a ``finetune-ovd`` run (F-ViT): :class:`OpenVocabularyDetector`, boxes, scores and labels of ANY class names;
- a ``finetune-seg`` run (UperNet / linear): :class:`Segmenter`, label maps (and probabilities);
- anything else (a finegrain pretraining run, an open_clip model and tag, a released checkpoint):
  :class:`ClipPredictor`, training-free open-vocabulary segmentation from dense features, classification of
  images and of given boxes, and image / text / region embeddings.

Every predictor runs the same code as the held-out evaluation of its kind (the test pipelines of the recipes), so
the two cannot drift apart; coordinates are the input image's pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import open_clip
import torch
from PIL import Image

from ..devices import PRECISIONS, autocast, pick_device
from ..errors import DataError
from ..eval.box_classification import box_embeddings, box_probabilities
from ..eval.classification import class_text_embeddings
from ..eval.encode import evaluating
from ..eval.prompts import class_name_sets, load_class_names
from ..eval.segmentation import dense_logits, slide_inference
from ..models.factory import get_tokenizer
from .inputs import ImageInput, load_input, load_inputs, model_pixels
from .loading import LoadedCheckpoint, load_checkpoint
from .results import Classification, Detections, Segmentation

Images = ImageInput | Sequence[ImageInput]


def _class_list(classes: str | Sequence[str] | None, default=tuple) -> list[str]:
    """Class names given as a list, a built-in list name, a file (its path without a comma), or a comma-separated
    string (one name without a comma is one class); ``default()`` when None."""
    if classes is None:
        return list(default())
    if isinstance(classes, str):
        named_list = classes in class_name_sets() or ("," not in classes and Path(classes).is_file())
        if not named_list:
            classes = [name.strip() for name in classes.split(",") if name.strip()]
    else:
        classes = [str(name) for name in classes]
    return load_class_names(classes)  # checks the names are given and distinct


class Predictor:
    """A checkpoint ready to predict: ``predictor(images, classes=None) -> list`` of results, one per image.

    ``images``: a path, a PIL image, or a sequence of them. ``classes``: names (a list, ``"a,b,c"``, a built-in
    list name or a file); ``None`` gives :attr:`default_classes`. ``precision``: ``fp32`` | ``bf16`` | ``fp16``.
    """

    kind = "predictions"

    def __init__(self, loaded: LoadedCheckpoint, device: torch.device, precision: str = "fp32",
                 batch_size: int = 8):
        self.loaded, self.model, self.device = loaded, loaded.model, device
        if precision not in PRECISIONS:
            raise DataError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
        self.precision, self.batch_size = precision, batch_size

    @property
    def default_classes(self) -> list[str]:
        raise NotImplementedError

    def classes(self, classes: str | Sequence[str] | None = None) -> list[str]:
        """The class names a call with ``classes`` predicts (``None``: :attr:`default_classes`)."""
        return _class_list(classes, lambda: self.default_classes)

    def __call__(self, images: Images, classes: str | Sequence[str] | None = None, **options) -> list:
        loaded = load_inputs(images)
        names = self.classes(classes)
        with autocast(self.device, self.precision):
            return self.predict(loaded, names, **options)

    def predict(self, images: list[Image.Image], classes: list[str], **options) -> list:
        """Results of RGB ``images`` for the class names ``classes`` (the public entry is ``__call__``)."""
        raise NotImplementedError

    def _subset(self, classes: list[str], trained: Sequence[str]) -> list[int]:
        """Indices of ``classes`` among the ``trained`` ones of a closed-set model (a ``DataError`` for others)."""
        index = {name: i for i, name in enumerate(trained)}
        unknown = [name for name in classes if name not in index]
        if unknown:
            raise DataError(f"classes {unknown[:5]} are not classes of this {self.loaded.method_name} checkpoint, "
                            f"which knows only {len(trained)}: {list(trained)[:8]}...; any class name needs an "
                            "open-vocabulary model (finetune-ovd, or a CLIP checkpoint)")
        return [index[name] for name in classes]


class InstanceDetector(Predictor):
    """Mask R-CNN (``finetune-det``): :class:`Detections` with masks; ``classes`` keeps a subset of its classes.
    One image per forward, as its held-out evaluation (:func:`~finegrain.finetune.detection.detect_image`)."""

    kind = "detection"

    @property
    def default_classes(self) -> list[str]:
        return list(self.loaded.task.class_names)

    def predict(self, images: list[Image.Image], classes: list[str], score_threshold: float = 0.0) -> list[Detections]:
        from ..finetune.detection import detect_image

        task = self.loaded.task
        wanted = torch.tensor(self._subset(classes, task.class_names))
        new_index = torch.full((len(task.class_names),), -1, dtype=torch.long)
        new_index[wanted] = torch.arange(len(wanted))
        pp = open_clip.get_model_preprocess_cfg(self.model.clip)
        results = []
        for image in images:
            det = detect_image(task, image, pp["mean"], pp["std"], self.device)
            keep = (new_index[det["labels"]] >= 0) & (det["scores"] >= score_threshold)
            results.append(Detections(det["boxes"][keep], det["scores"][keep], new_index[det["labels"][keep]],
                                      classes, (image.height, image.width),
                                      det["masks"][keep] if "masks" in det else None))
        return results


class OpenVocabularyDetector(Predictor):
    """F-ViT (``finetune-ovd``): :class:`Detections` of any class names, embedded by the checkpoint's frozen text
    tower with the recipe's prompt templates (once per vocabulary); the classes it was trained on with boxes take
    the base exponent ``alpha``, all others the novel one ``beta``. Default classes: the trained (base) ones."""

    kind = "detection"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._vocabularies: dict[tuple[str, ...], object] = {}

    @property
    def default_classes(self) -> list[str]:
        return list(self.loaded.task.base)

    def vocabulary(self, classes: Sequence[str]):
        """The :class:`~finegrain.finetune.ovd.Vocabulary` of ``classes``, computed once per class list."""
        key = tuple(classes)
        if key not in self._vocabularies:
            self._vocabularies[key] = self.loaded.task.vocabulary(self.model, list(classes))
        return self._vocabularies[key]

    def predict(self, images: list[Image.Image], classes: list[str], score_threshold: float = 0.0) -> list[Detections]:
        vocabulary = self.vocabulary(classes)
        results = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start:start + self.batch_size]
            for image, (boxes, scores, labels) in zip(chunk, self.loaded.task.detect(self.model, chunk, vocabulary)):
                keep = scores >= score_threshold
                results.append(Detections(boxes[keep].float().cpu(), scores[keep].float().cpu(),
                                          labels[keep].cpu(), classes, (image.height, image.width)))
        return results


class Segmenter(Predictor):
    """A fine-tuned segmenter (``finetune-seg``): :class:`Segmentation` by its recipe's test pipeline (sliding
    windows, the test scales and flips); ``classes`` keeps a subset of its classes (each pixel takes the best of
    them)."""

    kind = "segmentation"

    @property
    def default_classes(self) -> list[str]:
        return list(self.loaded.task.class_names)

    def predict(self, images: list[Image.Image], classes: list[str],
                probabilities: bool = False) -> list[Segmentation]:
        task = self.loaded.task
        subset = self._subset(classes, task.class_names)
        slide = task.slide_inference(self.batch_size)
        with evaluating(task):
            return [_segmentation(slide, task.window_logits, image, self.device, classes, subset, probabilities)
                    for image in images]


def _segmentation(slide, window_logits, image: Image.Image, device: torch.device, classes: list[str],
                  subset: list[int] | None, probabilities: bool) -> Segmentation:
    """One image's :class:`Segmentation` through ``slide`` (a :class:`~finegrain.eval.segmentation.SlideInference`):
    the label map is the argmax of the scores over ``subset`` (all classes: None), as the evaluation takes it."""
    scores = slide.scores(window_logits, image, device)
    if subset is not None:
        scores = scores[subset]
    probs = None
    if probabilities:
        probs = scores.softmax(dim=0) if len(slide.views) == 1 else scores / scores.sum(dim=0, keepdim=True)
        probs = probs.float().cpu()
    return Segmentation(scores.argmax(dim=0).cpu(), classes, probs)


class ClipPredictor(Predictor):
    """Any CLIP, training-free. ``predictor(images, classes)`` segments (:meth:`segment`); :meth:`classify`,
    :meth:`classify_boxes`, :meth:`embed_images`, :meth:`embed_texts`, :meth:`embed_boxes` and
    :meth:`dense_features` give the rest. Class names are embedded with prompt ``templates`` (default OpenAI's
    80 ImageNet prompts, as the segmentation and classification evaluations use), once per list."""

    kind = "segmentation"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._classifiers: dict[tuple, torch.Tensor] = {}
        self.tokenizer = get_tokenizer(self.model.name)

    @property
    def default_classes(self) -> list[str]:
        raise DataError("a CLIP model has no classes of its own: give the class names (classes=[...])")

    def classifier(self, classes: Sequence[str], templates: str | Sequence[str] = "openai") -> torch.Tensor:
        """``(C, D)`` L2-normalised text embeddings of ``classes`` (prompt ensemble), computed once per list."""
        key = (tuple(classes), templates if isinstance(templates, str) else tuple(templates))
        if key not in self._classifiers:
            with torch.autocast(self.device.type, enabled=False):
                self._classifiers[key] = class_text_embeddings(self.model, self.tokenizer, list(classes), templates,
                                                               device=self.device, progress=False)
        return self._classifiers[key]

    def segment(self, images: Images, classes: str | Sequence[str], **options) -> list[Segmentation]:
        """Open-vocabulary segmentation from dense features, the segmentation evaluation's pipeline. Options:
        ``templates``, ``dense_mode`` (``v_only`` | ``plain``), ``inference`` (``slide`` | ``whole``),
        ``short_side`` (448; None keeps the size), ``window`` / ``stride`` (default the model's input size and
        half of it), ``probabilities``."""
        return self(images, classes, **options)

    def predict(self, images: list[Image.Image], classes: list[str], templates: str | Sequence[str] = "openai",
                 dense_mode: str = "v_only", inference: str = "slide", short_side: int | None = 448,
                 window: int | Sequence[int] | None = None, stride: int | Sequence[int] | None = None,
                 probabilities: bool = False) -> list[Segmentation]:
        slide = slide_inference(self.model, inference, short_side, window, stride, batch_size=self.batch_size)
        classifier = self.classifier(classes, templates)
        with evaluating(self.model):
            window_logits = dense_logits(self.model, classifier, dense_mode)
            return [_segmentation(slide, window_logits, image, self.device, classes, None, probabilities)
                    for image in images]

    def classify(self, images: Images, classes: str | Sequence[str],
                 templates: str | Sequence[str] = "openai") -> list[Classification]:
        """Zero-shot classification: per image, softmax probabilities over ``classes`` at the model's logit
        scale, the image through the model's val transform (resize, centre crop), as the zero-shot evaluation."""
        names = _class_list(classes)
        classifier = self.classifier(names, templates)
        embeddings = self.embed_images(images)
        logits = self.model.logit_scale.exp().float() * embeddings.to(self.device) @ classifier.T.float()
        return [Classification(row.cpu(), names) for row in logits.softmax(dim=-1)]

    def classify_boxes(self, image: ImageInput, boxes: torch.Tensor | Sequence[Sequence[float]],
                       classes: str | Sequence[str], way: str = "roi", templates: str | Sequence[str] = "vild",
                       masks: torch.Tensor | None = None) -> Classification:
        """The ``(K, 4)`` xyxy ``boxes`` of one image classified over ``classes`` as the box-classification
        evaluation does (``way``: ``roi`` dense-feature RoIAlign, ``crop`` the crops, ``mask`` pooled masks
        ``(K, H, W)``): ``scores`` ``(K, C)``."""
        names = _class_list(classes)
        classifier = self.classifier(names, templates)
        with autocast(self.device, self.precision):
            scores = box_probabilities(self.model, load_input(image), boxes, classifier, way, masks=masks,
                                       device=self.device)
        return Classification(scores, names)

    def embed_images(self, images: Images) -> torch.Tensor:
        """``(N, D)`` L2-normalised image embeddings (the model's val transform), on the CPU."""
        pp = open_clip.get_model_preprocess_cfg(self.model.clip)
        transform = open_clip.image_transform(self.model.image_size, is_train=False, mean=pp["mean"], std=pp["std"])
        pictures = load_inputs(images)
        out = []
        with evaluating(self.model), autocast(self.device, self.precision):
            for start in range(0, len(pictures), self.batch_size):
                pixels = torch.stack([transform(p) for p in pictures[start:start + self.batch_size]]).to(self.device)
                out.append(self.model.encode_image(pixels, normalize=True).float().cpu())
        return torch.cat(out)

    def embed_texts(self, texts: str | Sequence[str]) -> torch.Tensor:
        """``(N, D)`` L2-normalised text embeddings, on the CPU."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        with evaluating(self.model), autocast(self.device, self.precision):
            return self.model.encode_text(self.tokenizer(texts).to(self.device), normalize=True).float().cpu()

    def embed_boxes(self, image: ImageInput, boxes: torch.Tensor | Sequence[Sequence[float]]) -> torch.Tensor:
        """``(K, D)`` L2-normalised region embeddings of xyxy ``boxes`` (RoIAlign on the dense features, the
        ``roi`` way of :meth:`classify_boxes`), on the CPU."""
        with autocast(self.device, self.precision):
            return box_embeddings(self.model, load_input(image), boxes, device=self.device).cpu()

    def dense_features(self, images: Images, dense_mode: str = "v_only") -> torch.Tensor:
        """``(N, D, h, w)`` dense features of images squashed to the model's input size, on the CPU."""
        _, pixels = model_pixels(self.model, load_inputs(images))
        with evaluating(self.model), autocast(self.device, self.precision):
            return self.model.encode_dense(pixels.to(self.device), mode=dense_mode).float().cpu()


PREDICTORS = {"finetune-det": InstanceDetector, "finetune-ovd": OpenVocabularyDetector, "finetune-seg": Segmenter}


def load_predictor(checkpoint: str | Path, device: str | torch.device = "auto", precision: str = "fp32",
                   batch_size: int = 8) -> Predictor:
    """The predictor of ``checkpoint``: a finegrain run's ``*.pt`` (a fine-tuning run gives its detector or
    segmenter, any other a :class:`ClipPredictor`), or ``NAME:PRETRAINED`` (an open_clip model and tag or file, a
    released checkpoint: ``ViT-B-16:openai``). ``device``: ``auto`` (the GPU when there is one) | ``cpu`` |
    ``cuda[:i]``; ``precision``: ``fp32`` | ``bf16`` | ``fp16``; ``batch_size``: images (or windows) per forward."""
    device = pick_device(device)
    loaded = load_checkpoint(checkpoint, device)
    return PREDICTORS.get(loaded.method_name, ClipPredictor)(loaded, device, precision, batch_size)
