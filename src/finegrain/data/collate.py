"""Collate samples (see :class:`finegrain.sample_spec.SampleSpec`) into a batch."""

from __future__ import annotations

import torch

CONCAT_KEYS = ("crops", "instance_masks")  # variable length per sample: concatenated along dim 0
SUM_KEYS = ("boxes_clipped", "boxes_dropped", "instances_unlisted", "instances_cut", "records_tried")  # per-sample counts: summed into an int
LIST_KEYS = ("bad_records", "bad_regions")  # per-sample lists: concatenated


def collate(samples: list[dict]) -> dict:
    """Stack tensors (``(B, ...)``), concatenate ``crops`` and ``instance_masks`` (``(R, ...)``), sum counts,
    join lists."""
    batch = {}
    for key in samples[0]:
        if key in LIST_KEYS:
            batch[key] = [item for s in samples for item in s.get(key, ())]
        elif key in SUM_KEYS:
            batch[key] = sum(int(s[key]) for s in samples)
        elif key in CONCAT_KEYS:
            batch[key] = torch.cat([s[key] for s in samples])
        else:
            batch[key] = torch.stack([s[key] for s in samples])
    for key in LIST_KEYS:
        batch.setdefault(key, [])
    return batch
