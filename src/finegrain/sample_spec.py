"""What a training method asks of each sample: the contract between ``objectives/`` and ``data/``.

A leaf module (imports nothing from finegrain), so that methods declare what they need and the data
pipeline builds it without either importing the other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import DataError

AUGMENT_NONE = "none"
RESIZE_MODES = ("squash", "longest_pad", "shortest_crop")
CAPTION_MODES = ("required", "optional", "none")
# uint8 image tensors of a batch: they cross the data loader as uint8 and are normalised on the device.
IMAGE_KEYS = ("image", "views", "crops")


DENSE_KINDS = ("segmentation", "instances")
MIN_IMAGE_SIDE = 32  # DenseTargets.drop_empty: mmdet's CocoDataset._filter_imgs(min_size=32)


@dataclass(frozen=True)
class DenseTargets:
    """Dense targets of a fine-tuning sample and the joint image/target augmentation (mmseg's and mmdet's
    training pipelines), in order:

    1. keep-ratio resize to ``scale`` ``(long, short)`` (the image fits in it) times a factor drawn uniformly
       from ``ratio_range``; or, with ``short_sides``, to a short side drawn among them (long side at most
       ``scale[0]``: mmdet's multi-scale training);
    2. a random crop of ``crop`` ``(h, w)`` (clipped to the image); for segmentation redrawn while one class
       covers ``cat_max_ratio`` or more of its labelled pixels (10 checks, then one unchecked draw: mmseg);
    3. a horizontal flip with probability ``flip``; 4. ``photometric`` distortion (brightness, contrast,
       saturation, hue; mmseg's ``PhotoMetricDistortion``); 5. padding right/bottom to ``pad`` ``(h, w)``
       (image 0, labels ``ignore_index``; the tasks set padded pixels to 0 after normalisation, as mmseg /
       mmdet pad normalised images).

    Sample keys (besides ``image`` uint8 ``(3, *pad)`` and ``image_size`` int64 ``(2,)``, the height and width
    of the image inside the padding): segmentation: ``label`` int64 ``(*pad)``, class indices or
    ``ignore_index``. Instances: ``instance_boxes`` float ``(M, 4)`` xyxy, ``instance_labels`` int64 ``(M,)`` (indices into
    ``class_names``), ``instance_valid`` bool ``(M,)`` (the first n rows), with ``masks`` also
    ``instance_masks`` uint8 ``(n, *pad)``, the valid rows only (the collate concatenates them in the order of
    ``instance_valid.nonzero()``, as ``crops``); M = ``max_instances``. A region whose label is not in
    ``class_names`` is left out and counted (``instances_unlisted``: e.g. the novel classes of an open-vocabulary split); instances beyond
    ``max_instances`` (after augmentation, in annotation order) are left out and counted (``instances_cut``).
    With ``drop_empty``, records without a region of a listed class, or whose image has a side under
    :data:`MIN_IMAGE_SIDE` pixels, are left out of training before it starts (mmdet's ``filter_empty_gt`` and
    ``min_size=32``; the epoch is then mmdet's).
    """

    kind: str  # segmentation | instances
    num_classes: int
    class_names: tuple[str, ...] = ()  # instances: region labels, in class-index order
    ignore_index: int = 255
    reduce_zero_label: bool = False  # segmentation: label 0 is ignored and 1..C become 0..C-1
    masks: bool = False  # instances: decode each region's mask
    max_instances: int = 100
    scale: tuple[int, int] = (2048, 512)
    ratio_range: tuple[float, float] = (1.0, 1.0)
    short_sides: tuple[int, ...] = ()
    crop: tuple[int, int] | None = None
    cat_max_ratio: float = 1.0
    flip: float = 0.5
    photometric: bool = False
    pad: tuple[int, int] = (512, 512)
    drop_empty: bool = False

    def __post_init__(self):
        problems = []
        if self.kind not in DENSE_KINDS:
            problems.append(f"kind must be one of {DENSE_KINDS}, got {self.kind!r}")
        if self.kind == "instances" and len(self.class_names) != self.num_classes:
            problems.append(f"instances need class_names for all {self.num_classes} classes, got "
                            f"{len(self.class_names)}")
        if not 0 < self.ratio_range[0] <= self.ratio_range[1]:
            problems.append(f"ratio_range must be (low, high) with 0 < low <= high, got {self.ratio_range}")
        if self.crop is not None and (self.crop[0] > self.pad[0] or self.crop[1] > self.pad[1]):
            problems.append(f"crop {self.crop} does not fit in pad {self.pad}")
        if self.crop is None and max(self.scale) * self.ratio_range[1] > max(self.pad):
            problems.append(f"without a crop, images resized to {self.scale} x {self.ratio_range[1]} exceed pad "
                            f"{self.pad}")
        if problems:
            raise DataError("DenseTargets: " + "; ".join(problems))


@dataclass(frozen=True)
class SampleSpec:
    """What a training sample carries. Keys of one sample (the collate adds the batch dim, except where said):

    - ``image``: uint8 ``(3, H, W)`` when ``views == 1``, else ``(V, 3, H, W)`` (one key whatever the
      number of views); normalised on the device by the trainer (mean/std of the model).
    - with ``augmented_views`` V > 0: ``views`` uint8 ``(V, 3, H, W)``, V views by the recipe ``view_augment``
      beside the ``image`` (e.g. FineCLIP's exact, unaugmented image with its regions and DetailCLIP's two
      augmented views in one sample).
    - ``text`` ``(L,)`` token ids of one caption chosen at random among the record's captions; with
      ``caption="optional"`` also ``text_valid`` (bool: the record had a caption; else ``text`` is all
      zeros and must not enter a loss); with ``caption="none"`` neither key.
    - with ``regions``: ``boxes`` ``(M, 4)`` float xyxy in ``image`` pixels, ``box_valid`` ``(M,)`` bool,
      ``region_text`` ``(M, L)`` and ``region_text_valid`` ``(M,)`` bool (the region has a caption, or a
      label with ``label_as_region_text``; a box without one must never train against its all-zero token
      row). M = ``max_regions`` (static shape; padding rows are invalid). With ``views > 1``, per-view
      boxes: ``boxes`` ``(V, M, 4)`` in the pixels of each view and ``box_valid`` ``(V, M)``; row ``m`` is
      the same region (and ``region_text`` row) in every view.
    - with ``region_crops`` (``views == 1``): ``crops`` uint8 ``(K, 3, h, w)``, one per *valid* region in
      box order; the collate concatenates them into ``(R, 3, h, w)``, ``R = box_valid.sum()``, in the order
      of ``box_valid.nonzero()``.
    - ``boxes_clipped`` / ``boxes_dropped``: how many boxes were clipped to / dropped outside the image,
      plus, in ``boxes_dropped``, each (view, region) whose box a view's crop left without area (the collate
      sums them; the trainer counts them). A box a view's crop cuts is clipped to the view, not counted.
    - with ``text_cache`` (a folder written by ``finegrain embed-text``): ``text_embed`` float16 ``(D,)``
      instead of ``text``, and ``region_text_embed`` float16 ``(M, D)`` instead of ``region_text``: the
      L2-normalised embeddings of the same texts by the frozen text tower, looked up in the cache; zero
      rows where there is no text (``text_valid`` / ``region_text_valid`` False). The trainer checks at
      start that the cache was made by the model being trained.

    With ``dense`` (fine-tuning): the sample is the image and its :class:`DenseTargets`, nothing else.

    Geometry: ``augment`` names a recipe of ``finegrain.data.augment`` (``"open_clip"``: open_clip's
    training augmentation; ``"detailclip"``: DetailCLIP's views; ``"none"``: ``resize_mode`` only, e.g.
    ``squash`` as FineCLIP or ``longest_pad``, aspect-preserving with zero padding right/bottom, as
    CLIPSelf). Each view's crop, resize and flip move its boxes too (the recipe says where it put the
    pixels). Crops are boxes enlarged ``crop_scale`` times about their centre, clipped to the image (not
    augmented), resized to ``crop_size`` with ``resize_mode``.
    """

    views: int = 1
    augment: str = "open_clip"
    augmented_views: int = 0  # more views of the same image, by the recipe view_augment, as key ``views``
    view_augment: str = "open_clip"
    image_size: tuple[int, int] | None = None  # training image size (H, W); None: the model's input size
    resize_mode: str = "squash"  # squash | longest_pad | shortest_crop (augment="none", and crops)
    caption: str = "required"  # required | optional | none
    regions: bool = False
    max_regions: int = 20
    min_box_size: float = 0.0  # keep boxes whose area (original pixels) is >= min_box_size**2 ...
    max_box_size: float = math.inf  # ... and <= max_box_size**2 (FineCLIP's area filter)
    label_as_region_text: bool = False  # a region without a caption takes its label as text (e.g. COCO names)
    region_crops: bool = False
    crop_size: tuple[int, int] | None = None  # (h, w) of crops; None: the training image size
    crop_scale: float = 1.5  # crops are boxes enlarged by this factor about their centre
    text_cache: str | None = None  # precomputed text embeddings (finegrain embed-text) instead of token ids
    dense: DenseTargets | None = None  # fine-tuning targets: label maps or instances (replaces augment)

    def __post_init__(self):
        problems = []
        if self.views < 1 or self.augmented_views < 0:
            problems.append(f"views must be >= 1 and augmented_views >= 0, got {self.views}, {self.augmented_views}")
        if self.resize_mode not in RESIZE_MODES:
            problems.append(f"resize_mode must be one of {RESIZE_MODES}, got {self.resize_mode!r}")
        if self.caption not in CAPTION_MODES:
            problems.append(f"caption must be one of {CAPTION_MODES}, got {self.caption!r}")
        if self.region_crops and not self.regions:
            problems.append("region_crops needs regions=True")
        if self.region_crops and self.views != 1:
            problems.append(f"region_crops needs views=1 (crops pair with one view's boxes), got {self.views}")
        if self.max_regions < 1 or self.crop_scale <= 0 or not 0 <= self.min_box_size <= self.max_box_size:
            problems.append(f"bad region settings: max_regions={self.max_regions}, crop_scale={self.crop_scale}, "
                            f"min/max_box_size={self.min_box_size}/{self.max_box_size}")
        if self.dense is not None and (self.views != 1 or self.regions or self.caption != "none"):
            problems.append("dense targets need views=1, regions=False and caption='none'")
        if problems:
            raise DataError("SampleSpec: " + "; ".join(problems))
