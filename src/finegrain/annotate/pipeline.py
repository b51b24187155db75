"""The annotation pipeline: images -> proposals -> filtered boxes -> region crops -> captions -> records.

:class:`Annotator` annotates a stream of images batch by batch (images decoded by threads ahead of the
models); :func:`run_annotation` drives it over the work units of a source that belong to this process and
writes each unit as one output shard, skipping finished ones, then sums the counts when all are done.

A region's crop is its box enlarged ``crop_scale`` times about its centre and clipped to the image
(:func:`finegrain.data.sample.crop_box`, as training cuts crops); the captioner sees the crop at its own
resolution (its processor resizes). Images whose proposals all fail the filter are left out unless
``keep_empty`` (FineCLIP drops them when it builds CC2.5M), and counted.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from finegrain.data.images import ImageError
from finegrain.data.records import Record, RecordError, Region, check_record_size
from finegrain.data.sample import crop_box
from finegrain.errors import DataError
from finegrain.eval.encode import batched, loaded_ahead

from .base import Captioner, Proposal, ProposalFilter, Proposer
from .output import AnnotationOutput
from .sources import ImageSource, SourceImage


@dataclass
class AnnotationCounts:
    """What happened to the images and boxes of a run (or of one shard)."""

    images: int = 0  # records written
    regions: int = 0  # regions written
    captioned_images: int = 0  # image captions written by the captioner (the source had none)
    unreadable_images: int = 0
    malformed_records: int = 0  # malformed in the source, or sized unlike their image (check_record_size)
    malformed_regions: int = 0  # source regions dropped by the reader (e.g. a reversed box); the image is used
    images_without_regions: int = 0  # no box passed the filter (left out unless keep_empty)
    zero_area_boxes: int = 0  # empty after clipping to the image
    filtered_boxes: int = 0  # below the score / outside the area range / suppressed / beyond the maximum
    empty_captions: int = 0  # regions dropped because the captioner wrote nothing
    left_out: list[str] = field(default_factory=list)  # why each image, record or region was left out

    def add(self, other: AnnotationCounts) -> None:
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)

    def summary(self) -> str:
        """The counts, and the first few images or records left out (with the reason)."""
        text = ", ".join(f"{value} {name.replace('_', ' ')}" for name, value in asdict(self).items()
                         if name != "left_out")
        return text + (f"; left out: {'; '.join(self.left_out[:3])}" if self.left_out else "")


@dataclass
class Annotator:
    """Proposes, filters and captions the regions of batches of images.

    Args:
        proposer, captioner: see :mod:`finegrain.annotate.base`.
        proposal_filter: thresholds applied to every image's raw proposals.
        crop_scale: a region's crop is its box enlarged this many times about its centre (clipped).
        caption_images: write an image caption with the captioner, on the whole image, where the source
            has none (the global contrastive loss needs one).
        keep_empty: write images without regions too.
        batch_size: images per proposer call (the captioner batches crops itself).
    """

    proposer: Proposer
    captioner: Captioner
    proposal_filter: ProposalFilter = field(default_factory=ProposalFilter)
    crop_scale: float = 1.0
    caption_images: bool = False
    keep_empty: bool = False
    batch_size: int = 16

    def __post_init__(self):
        if self.crop_scale <= 0:
            raise DataError(f"crop_scale must be positive, got {self.crop_scale}")
        if self.batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {self.batch_size}")

    def settings(self) -> dict[str, object]:
        """What determines the records (the output folder's manifest)."""
        return {"proposer": self.proposer.describe(), "filter": self.proposal_filter.describe(),
                "captioner": self.captioner.describe(), "crop_scale": self.crop_scale,
                "caption_images": self.caption_images, "keep_empty": self.keep_empty}

    def source_field(self) -> dict[str, str]:
        """The ``source`` object of every record written."""
        return {"proposer": f"{self.proposer.describe()} {self.proposal_filter.describe()}",
                "captioner": self.captioner.describe()}

    def annotate(self, items: Iterable[SourceImage], root: Path | None, counts: AnnotationCounts,
                 on_batch: Callable[[int, int], None] | None = None) -> Iterator[tuple[SourceImage, Record]]:
        """``(item, annotated record)`` for each of ``items`` that is written; unreadable images, and records
        whose ``width``/``height`` disagree with their image's (:func:`check_record_size`, as training), are
        counted, named in ``counts.left_out`` and left out (as are the regions the source's reader dropped). ``on_batch(images, regions)`` is called after each
        batch (progress)."""

        def load(item: SourceImage) -> tuple[SourceImage, Image.Image | ImageError | RecordError]:
            try:
                image = item.load(root)
                check_record_size(item.record, image.size)
                return item, image
            except (ImageError, RecordError) as e:
                return item, e

        source = self.source_field()  # one dict shared by the records (describe() once, not per image)
        for batch in batched(loaded_ahead(load, items), self.batch_size):
            readable = [(item, image) for item, image in batch if isinstance(image, Image.Image)]
            for item, error in batch:
                if not isinstance(error, Image.Image):
                    counts.left_out.append(str(error))
                    if isinstance(error, ImageError):
                        counts.unreadable_images += 1
                    else:
                        counts.malformed_records += 1
                counts.malformed_regions += len(item.record.bad_regions)
                counts.left_out += item.record.bad_regions
            records = self._annotate_batch(readable, counts, source) if readable else []
            for (item, _), record in zip(readable, records):
                if record is not None:
                    yield item, record
            if on_batch is not None:
                on_batch(len(batch), sum(len(r.regions) for r in records if r is not None))

    def _annotate_batch(self, batch: list[tuple[SourceImage, Image.Image]], counts: AnnotationCounts,
                        source: dict[str, str]) -> list[Record | None]:
        raw = self.proposer.propose([image for _, image in batch], [item.record for item, _ in batch])
        kept: list[list[Proposal]] = []
        for (_, image), proposals in zip(batch, raw, strict=True):
            chosen, zero_area = self.proposal_filter(proposals, image.width, image.height)
            counts.zero_area_boxes += zero_area
            counts.filtered_boxes += len(proposals) - zero_area - len(chosen)
            kept.append(chosen)
        crops = [crop_box(image, p.box, self.crop_scale) for (_, image), chosen in zip(batch, kept) for p in chosen]
        region_captions = iter(self.captioner.caption(crops) if crops else [])
        regions_of: list[list[Region]] = []
        for chosen in kept:
            regions_of.append([])
            for proposal in chosen:
                caption = next(region_captions).strip()
                if caption:
                    regions_of[-1].append(Region(proposal.box, caption, proposal.label, proposal.score))
                else:
                    counts.empty_captions += 1
        written = [i for i, regions in enumerate(regions_of) if regions or self.keep_empty]
        counts.images_without_regions += sum(1 for regions in regions_of if not regions)
        uncaptioned = [i for i in written if self.caption_images and not batch[i][0].record.captions]
        image_captions = dict(zip(uncaptioned, self.captioner.caption([batch[i][1] for i in uncaptioned])
                                  if uncaptioned else []))
        records: list[Record | None] = [None] * len(batch)
        for i in written:
            item, image = batch[i]
            captions = item.record.captions
            if image_captions.get(i, "").strip():
                captions = (image_captions[i].strip(),)
                counts.captioned_images += 1
            counts.images += 1
            counts.regions += len(regions_of[i])
            records[i] = Record(item.record.image, captions, tuple(regions_of[i]), image.width, image.height,
                                item.record.label, source=source)
        return records


def run_annotation(source: ImageSource, annotator: Annotator, output: AnnotationOutput, units: Iterable[int],
                   progress: bool = True) -> tuple[AnnotationCounts, dict[str, int] | None]:
    """Annotate the work ``units`` of ``source`` not yet finished in ``output``, one shard each.

    Returns this process's counts and, when every shard of the run is finished (by any process), the run's
    summed counts (None otherwise).
    """
    units = list(units)
    finished = set(output.finished())
    todo = [k for k in units if k not in finished]
    sizes = [source.unit_size(k) for k in todo]
    total = None if any(s is None for s in sizes) else sum(sizes)
    counts = AnnotationCounts()
    start, regions = time.perf_counter(), 0
    with tqdm(total=total, desc="annotate", unit="img", disable=not progress) as bar:
        def on_batch(images: int, new_regions: int) -> None:
            nonlocal regions
            regions += new_regions
            bar.update(images)
            bar.set_postfix_str(f"{regions / max(time.perf_counter() - start, 1e-9):.1f} regions/s, "
                                f"shard {unit + 1}/{source.units}", refresh=False)

        for unit in todo:
            unit_counts, malformed = AnnotationCounts(), []
            items = source.images(unit, malformed)
            written = list(annotator.annotate(items, source.root, unit_counts, on_batch))
            unit_counts.malformed_records += len(malformed)
            unit_counts.left_out += malformed
            encoded = [item.encoded(source.root) for item, _ in written] if output.fmt == "wds" else None
            output.write(unit, [record for _, record in written], asdict(unit_counts), encoded)
            counts.add(unit_counts)
    summary = output.finish()
    return counts, summary
