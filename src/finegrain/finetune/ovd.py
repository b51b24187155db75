"""F-ViT open-vocabulary detection (``method.name: finetune-ovd``): a frozen CLIP tower as the detector's
backbone, trained on base classes only, whose regions are classified against the class names' text embeddings
and, at test time, also by the frozen CLIP's own region features (CLIPSelf's F-ViT; ``docs/ovd.md``).

Training samples carry the base classes' boxes only (``DenseTargets(class_names=base)``: novel-class regions
are dropped and counted as ``data/instances_unlisted``). The evaluation ``ovd`` detects base and novel classes
on ``data.val`` and scores them by OV-COCO's AP50 novel / base / all (``protocol: ov-coco``, pycocotools) or
OV-LVIS's mAP rare / common / frequent / all (``protocol: ov-lvis``, the ``lvis`` package) against the ground
truth json ``data.val.path``; for another source (``demo:val``, JSONL) the ground truth is built from its
records' labelled regions.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import open_clip
import torch
from PIL import Image
from torchvision.transforms import functional as TF
from tqdm import tqdm

from ..data.dense import DenseSample, keep_ratio_size, resize
from ..data.images import ImageError, load_image
from ..data.readers import coco_image_file
from ..data.records import RecordError
from ..errors import DataError
from ..eval.classification import class_text_embeddings
from ..eval.detection import check_ground_truth_file, detection_metrics, load_coco, lvis_metrics
from ..eval.encode import check_usable, report_skipped
from ..eval.prompts import load_class_names
from ..models import FinegrainCLIP
from ..models.factory import get_tokenizer
from ..models.roi import pool_boxes
from ..objectives import EvalContext, Progress
from ..objectives.registry import register_method
from ..sample_spec import DenseTargets, SampleSpec
from .base import BackboneOptions, DenseTask, TaskOptions, convert_norms, zero_padding
from .fvit import FViTHead

PROTOCOLS = ("ov-coco", "ov-lvis")


@dataclass
class Vocabulary:
    """Class names to detect: ``names``, their L2-normalised text embeddings ``(C, D)``, and ``base`` ``(C,)``, True
    for the classes trained with boxes (their scores take the exponent ``alpha``, the others ``beta``)."""

    names: list[str]
    embeddings: torch.Tensor
    base: torch.Tensor


@dataclass
class FViTOptions(TaskOptions):
    """F-ViT's settings (``method.*``); defaults are the OV-COCO ViT-B/16 config of the release (values and
    sources in ``docs/ovd.md``)."""

    backbone: BackboneOptions = field(default_factory=lambda: BackboneOptions(frozen=True))
    base_classes: str = "ov-coco-base"  # a built-in list or a file: the classes trained with boxes
    novel_classes: str = "ov-coco-novel"  # the classes never seen as boxes, detected at test time
    # classes also classified at test time (novel-like: exponent beta, competing for max_per_image) but never scored:
    # CLIM's 15 COCO classes outside the 48 / 17 split (ov-coco-extra); None: none
    extra_classes: str | None = None
    templates: str = "vild"  # prompt ensemble of the class (and background) embeddings
    image_size: int = 640  # training: keep-ratio resize to it x ratio_range, crop and pad to it; test: resize, pad
    ratio_range: tuple[float, float] = (0.1, 2.0)
    max_instances: int = 100  # boxes kept per training image
    drop_empty: bool = False  # leave out images without a base-class box (mmdet's filter_empty_gt)
    norm: str = "sync_batch"  # sync_batch | batch | group: the pyramid's, FPN's and box head's normalisation
    fpn_channels: int = 256
    anchor_scale: float = 8.0  # anchor size = scale x level stride
    rpn_convs: int = 2
    rpn_batch_size: int = 256
    rpn_pre_nms: int = 2000  # proposals per level before NMS
    rpn_post_nms: int = 1000  # proposals per image after NMS
    rpn_nms: float = 0.7
    rpn_pre_nms_test: int | None = None  # proposals per level before NMS at test time; None: rpn_pre_nms
    roi_batch_size: int = 512
    head_convs: int = 4
    head_fcs: int = 2
    fc_channels: int = 512
    class_relu: bool = True  # a ReLU after the class branch's projection (F-ViT's release; CLIM's has none)
    class_fcs: int = 0  # fcs (+ReLU) of fc_channels before the projection: CLIM's cls_fcs (1), F-ViT's none
    temperature: float = 50.0  # initial value of the learned temperature of the region logits
    learn_background: bool = False  # learn the background embedding (initialised from its prompt embedding)
    bg_weight: float = 0.6  # cross-entropy weight of the background class
    vlm_temperature: float = 75.0  # temperature of the frozen CLIP's region logits
    alpha: float = 0.1  # exponent of the CLIP score for base classes (and the background) at test time
    beta: float = 0.8  # exponent of the CLIP score for novel classes
    score_thr: float = 0.01
    nms: float = 0.4
    max_per_image: int = 100
    protocol: str = "ov-coco"  # ov-coco | ov-lvis


@register_method("finetune-ovd")
class FViTTask(DenseTask):
    """F-ViT on a frozen finegrain tower; see the module docstring."""

    Options = FViTOptions
    evaluations = ("ovd",)
    v_only_last = True  # the fourth map is the last block run without attention mixing, as released

    def __init__(self, options: FViTOptions, model: FinegrainCLIP):
        super().__init__(options, model)
        last = self.backbone.tower.num_layers - 1
        if self.backbone.block_indices[-1] != last:
            raise DataError(f"method.backbone.blocks must end with the last block ({last}): F-ViT reads its v-only "
                            f"output as the fourth map and as the CLIP region features; got "
                            f"{self.backbone.block_indices}")
        self.base = load_class_names(options.base_classes)
        self.novel = load_class_names(options.novel_classes)
        self.extra = load_class_names(options.extra_classes) if options.extra_classes else []
        lists = {"base_classes": self.base, "novel_classes": self.novel, "extra_classes": self.extra}
        for (key, names), (other, others) in itertools.combinations(lists.items(), 2):
            shared = sorted(set(names) & set(others))
            if shared:
                raise DataError(f"method.{key} and method.{other} share {shared[:5]}")
        if options.protocol not in PROTOCOLS:
            raise DataError(f"method.protocol must be one of {PROTOCOLS}, got {options.protocol!r}")
        multiple = 2 * model.patch_size[0]
        if options.image_size % multiple:
            raise DataError(f"method.image_size must be a multiple of {multiple} (twice the patch size), got "
                            f"{options.image_size}")
        with torch.no_grad():
            embed_dim = model.encode_text(torch.zeros(1, model.context_length, dtype=torch.long)).shape[-1]
        o = options
        self.head = FViTHead(
            self.backbone.out_channels, self.backbone.strides, embed_dim, len(self.base),
            len(self.novel) + len(self.extra), channels=o.fpn_channels, anchor_scale=o.anchor_scale,
            rpn_convs=o.rpn_convs, rpn_batch_size=o.rpn_batch_size, rpn_pre_nms=o.rpn_pre_nms,
            rpn_post_nms=o.rpn_post_nms, rpn_nms=o.rpn_nms, rpn_pre_nms_test=o.rpn_pre_nms_test,
            head_convs=o.head_convs, head_fcs=o.head_fcs, fc_channels=o.fc_channels, roi_batch_size=o.roi_batch_size,
            class_relu=o.class_relu, class_fcs=o.class_fcs, temperature=o.temperature,
            learn_background=o.learn_background)
        convert_norms(self, o.norm)  # the pyramid's, FPN's and box head's
        # base classes and the background take exponent alpha, novel (and extra) ones beta
        others = len(self.novel) + len(self.extra)
        self.register_buffer("base_mask", torch.tensor([True] * len(self.base) + [False] * others + [True]),
                             persistent=False)

    def sample_spec(self) -> SampleSpec:
        s = self.options.image_size
        dense = DenseTargets(kind="instances", num_classes=len(self.base), class_names=tuple(self.base),
                             max_instances=self.options.max_instances, scale=(s, s),
                             ratio_range=tuple(self.options.ratio_range), crop=(s, s), flip=0.5, pad=(s, s),
                             drop_empty=self.options.drop_empty)
        return SampleSpec(caption="none", augment="none", dense=dense)

    # ----- training -----------------------------------------------------------------------------------
    def forward(self, model: FinegrainCLIP, batch: dict[str, torch.Tensor],
                progress: Progress) -> dict[str, torch.Tensor]:
        self.ensure_class_embeddings(model)
        images, valid = batch["image"], batch["instance_valid"]
        boxes = [b[v].float() for b, v in zip(batch["instance_boxes"], valid)]
        labels = [lab[v] for lab, v in zip(batch["instance_labels"], valid)]
        sizes = [tuple(s) for s in batch["image_size"].tolist()]
        images = zero_padding(images, sizes)  # padded with 0 after normalisation, as released (and as at test)
        maps = self.backbone.pyramid(self.block_maps(images))
        return self.head.loss(images, sizes, maps, boxes, labels, self.options.bg_weight)

    def block_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The chosen blocks' maps ``(B, W, h, w)``, the last one v-only; a frozen tower runs without autograd
        (as released)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.options.backbone.frozen):
            return self.backbone.block_maps(images)

    def ensure_class_embeddings(self, model: FinegrainCLIP) -> None:
        """Fill the class and background embeddings from the frozen text tower, once (they are kept in the
        checkpoint)."""
        if bool(self.head.embeddings_ready):
            return
        embeddings = self.text_embeddings(model, [*self.classes(), "background"])
        self.head.set_class_embeddings(embeddings[:-1], embeddings[-1])

    def text_embeddings(self, model: FinegrainCLIP, names: list[str]) -> torch.Tensor:
        """``(C, D)`` embeddings of ``names`` by the frozen text tower with the recipe's prompt templates, in
        float32."""
        device = self.head.class_embeddings.device
        with torch.autocast(device.type, enabled=False):
            return class_text_embeddings(model, get_tokenizer(model.name), names, self.options.templates,
                                         device=device, progress=False)

    # ----- evaluation ---------------------------------------------------------------------------------
    def check_held_out(self, task: str, context: EvalContext) -> None:
        """A COCO / LVIS json as ``data.val.path`` must have every base and novel class and boxes it can score (an
        LVIS json for ``ov-lvis``), and one held-out image at least must be readable (in the size it is said to
        have)."""
        if task != "ovd":
            return
        lvis = self.options.protocol == "ov-lvis"
        if lvis and not str(context.path).endswith(".json"):
            raise ValueError(f"method.protocol=ov-lvis scores against an LVIS json as data.val.path, got "
                             f"{context.path!r}")
        data = check_ground_truth_file(context.path, [*self.base, *self.novel], lvis=lvis)
        if data is not None:
            files = [(context.root / coco_image_file(image), (image["width"], image["height"]))
                     for image in data["images"]]
        else:
            files = [(context.root / record.image, (record.width, record.height)) for record in context.records]
        check_usable(task, files, lambda file: self.load_pixels([file[0]], [file[1]]),
                     f"data.val.path={context.path} (images under {context.root})")

    def evaluate(self, task: str, model: FinegrainCLIP, context: EvalContext) -> dict[str, float]:
        if task != "ovd":
            return super().evaluate(task, model, context)
        self.ensure_class_embeddings(model)
        names = [*self.base, *self.novel]
        ground_truth, files = self.ground_truth(context, names)
        by_name = {c["name"]: c["id"] for c in ground_truth["categories"]}
        missing = [n for n in names if n not in by_name]
        if missing:
            raise DataError(f"{context.path}: classes {missing[:5]} of method.base_classes / novel_classes are not "
                            f"categories of the ground truth")
        category_ids = [by_name[n] for n in names]
        detections, scored_ids, skipped = [], [], []
        batches = range(0, len(files), context.batch_size)
        for start in tqdm(batches, desc="ovd", unit="batch", disable=not context.progress):
            for image_id, (boxes, scores, classes) in self._detect_readable(model, files[start:start + context.batch_size],
                                                                           skipped):
                scored_ids.append(image_id)
                scored = classes < len(names)  # extra classes took their places among the detections, unscored
                for box, score, cls in zip(boxes[scored].tolist(), scores[scored].tolist(), classes[scored].tolist()):
                    detections.append({"image_id": image_id, "category_id": category_ids[cls], "score": score,
                                       "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]]})
        report_skipped("ovd", skipped, len(files))
        # skipped images are not scored; without a json, the held-out records the reader left out count with them
        left_out = 0 if str(context.path).endswith(".json") else context.skipped
        counts = {"num_images": len(scored_ids), "skipped_images": len(skipped) + left_out}
        if self.options.protocol == "ov-lvis":
            return {**lvis_metrics(str(context.path), detections, image_ids=scored_ids), **counts}
        metrics = detection_metrics(load_coco(ground_truth), detections, image_ids=scored_ids,
                                    groups={"novel": self.novel, "base": self.base, "all": names})
        return {**{f"ap50_{group}": metrics[f"AP50_{group}"] for group in ("novel", "base", "all")}, **counts}

    def _detect_readable(self, model: FinegrainCLIP, chunk: list[tuple[int, Path, tuple]], skipped: list[str]):
        """``(image id, detections)`` of the chunk's images that can be read in the size the ground truth gives
        them; the others' errors go to ``skipped``."""
        try:
            return list(zip([i for i, _, _ in chunk], self.detect(model, [path for _, path, _ in chunk],
                                                                  expected=[size for _, _, size in chunk])))
        except (ImageError, RecordError):
            found = []
            for image_id, path, size in chunk:  # one at a time, to find the unusable ones
                try:
                    found.append((image_id, self.detect(model, [path], expected=[size])[0]))
                except (ImageError, RecordError) as e:
                    skipped.append(str(e))
            return found

    @staticmethod
    def load_pixels(images: Sequence[Image.Image | Path], sizes: list[tuple] | None = None) -> list[torch.Tensor]:
        """Each image's (RGB, or a file's) pixels ``(3, H, W)`` uint8; :class:`ImageError` for a file that cannot be
        read and :class:`RecordError` for one whose ``(width, height)`` is not the one in ``sizes`` (None: not
        known): the ground truth's boxes would be misplaced."""
        out = []
        for i, path in enumerate(images):
            pixels = TF.pil_to_tensor(load_image(path) if isinstance(path, (str, Path)) else path.convert("RGB"))
            width, height = sizes[i] if sizes is not None else (None, None)
            if width is not None and height is not None and (width, height) != (pixels.shape[-1], pixels.shape[-2]):
                raise RecordError(f"{path}: the ground truth says {width}x{height} but the image is "
                                  f"{pixels.shape[-1]}x{pixels.shape[-2]}; its boxes would be misplaced")
            out.append(pixels)
        return out

    def ground_truth(self, context: EvalContext, names: list[str]) -> tuple[dict, list[tuple[int, Path, tuple]]]:
        """The ground-truth json (``data.val.path``, COCO or LVIS) or one built from the records' regions whose
        label is a class; and the ``(image id, file, (width, height))`` of each image to detect on (the size its
        boxes are in; None where unknown)."""
        if str(context.path).endswith(".json"):
            data = load_coco(str(context.path)).dataset
            files = []
            for image in data["images"]:
                name = coco_image_file(image)
                if not name:
                    raise DataError(f"{context.path}: image {image.get('id')!r}: field 'file_name' (or 'coco_url') "
                                    "is missing")
                files.append((image["id"], context.root / name, (image.get("width"), image.get("height"))))
            return data, files
        ids = {name: i + 1 for i, name in enumerate(names)}
        images, annotations = [], []
        for k, record in enumerate(context.records):
            images.append({"id": k, "file_name": record.image, "width": record.width, "height": record.height})
            for region in record.regions:
                if region.label in ids:
                    x0, y0, x1, y1 = region.box
                    annotations.append({"id": len(annotations) + 1, "image_id": k, "category_id": ids[region.label],
                                        "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0),
                                        "iscrowd": 0})
        data = {"images": images, "annotations": annotations,
                "categories": [{"id": i, "name": n} for n, i in ids.items()]}
        return data, [(image["id"], context.root / image["file_name"], (image["width"], image["height"]))
                      for image in images]

    def classes(self) -> list[str]:
        """The class names whose embeddings the checkpoint holds: base, novel, extra (the evaluation's vocabulary)."""
        return [*self.base, *self.novel, *self.extra]

    def vocabulary(self, model: FinegrainCLIP, names: Sequence[str]) -> Vocabulary:
        """Any class names as a :class:`Vocabulary`: the embeddings the checkpoint holds for its own classes
        (:meth:`classes`), the frozen text tower's (``templates``) for the others; base classes are marked."""
        self.ensure_class_embeddings(model)
        held = {name: i for i, name in enumerate(self.classes())}
        device = self.head.class_embeddings.device
        new = [name for name in dict.fromkeys(names) if name not in held]
        embedded = {}
        if new:
            rows = torch.nn.functional.normalize(self.text_embeddings(model, new).float(), dim=-1)
            embedded = dict(zip(new, rows))
        rows = [self.head.class_embeddings[held[n]] if n in held else embedded[n] for n in names]
        base = set(self.base)
        return Vocabulary(list(names), torch.stack(rows), torch.tensor([n in base for n in names], device=device))

    @torch.no_grad()
    def detect(self, model: FinegrainCLIP, images: Sequence[Image.Image | Path], vocabulary: Vocabulary | None = None,
               expected: list[tuple] | None = None) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Detections of each image (RGB, or a file): boxes ``(K, 4)`` xyxy in its pixels, scores, class indices
        into ``vocabulary`` (default the checkpoint's :meth:`classes`). Test pipeline of the release: keep-ratio
        resize into ``image_size`` squared, normalise, pad with zeros to the square. ``expected``: the
        ``(width, height)`` each image must have (see :meth:`load_pixels`)."""
        o, device = self.options, self.head.temperature.device
        self.ensure_class_embeddings(model)
        if vocabulary is None:
            embeddings, base = self.head.embeddings(novel=True), self.base_mask
        else:
            embeddings = self.head.vocabulary(vocabulary.embeddings.to(device))
            base = torch.cat([vocabulary.base.to(device), torch.ones(1, dtype=torch.bool, device=device)])
        pp = open_clip.get_model_preprocess_cfg(model.clip)
        mean, std = (torch.tensor(pp[k], device=device).view(3, 1, 1) for k in ("mean", "std"))
        batch = torch.zeros(len(images), 3, o.image_size, o.image_size, device=device)
        sizes, scales = [], []
        for i, pixels in enumerate(self.load_pixels(images, expected)):
            h, w = pixels.shape[-2:]
            new_w, new_h = keep_ratio_size(w, h, (o.image_size, o.image_size))
            pixels = resize(DenseSample(pixels, None, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), None),
                            new_w, new_h).image.to(device)
            batch[i, :, :new_h, :new_w] = (pixels.float() / 255.0 - mean) / std
            sizes.append((new_h, new_w))
            scales.append(torch.tensor([new_w / w, new_h / h, new_w / w, new_h / h], device=device))
        maps, dense = self.detection_features(model, batch)

        def clip_scores(proposals: list[torch.Tensor]) -> torch.Tensor:
            regions = pool_boxes(dense, proposals, model.patch_size)
            return (o.vlm_temperature * regions @ embeddings.T).softmax(dim=-1)

        detections = self.head.detect(batch, sizes, maps, clip_scores, embeddings, base, o.alpha, o.beta,
                                      o.score_thr, o.nms, o.max_per_image)
        return [(boxes / scale, scores, classes) for (boxes, scores, classes), scale in zip(detections, scales)]

    def detection_features(self, model: FinegrainCLIP, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """One tower pass over ``(B, 3, H, W)`` -> the pyramid's maps and the CLIP region features ``(B, D, h, w)``
        (the v-only last block projected and normalised, as ``model.encode_dense``)."""
        blocks = self.block_maps(images)
        last = blocks[-1]
        dense = self.backbone.tower.project_dense(last.flatten(2).transpose(1, 2), tuple(last.shape[-2:]))
        return self.backbone.pyramid(blocks), dense
