"""Region embeddings: RoIAlign of a dense feature map over boxes given in input-image pixels."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

Boxes = list[torch.Tensor] | torch.Tensor


def boxes_to_rois(boxes: Boxes, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Flatten boxes into RoIAlign's ``(R, 5)`` ``[batch_index, x0, y0, x1, y1]`` form.

    ``boxes`` is a list of ``(K_i, 4)`` tensors (any K_i, zero included) or a padded ``(B, M, 4)`` tensor
    whose ``valid`` ``(B, M)`` bool mask says which rows are boxes (all rows if None). Returns the rois and,
    for padded input, the flat indices of the valid rows in ``B*M``.
    """
    if isinstance(boxes, torch.Tensor):
        if boxes.ndim != 3 or boxes.shape[-1] != 4:
            raise ValueError(f"padded boxes must be (B, M, 4), got {tuple(boxes.shape)}")
        batch, m = boxes.shape[:2]
        if valid is None:
            valid = torch.ones(batch, m, dtype=torch.bool, device=boxes.device)
        if valid.shape != (batch, m):
            raise ValueError(f"valid mask must be {(batch, m)}, got {tuple(valid.shape)}")
        flat = valid.reshape(-1).nonzero().squeeze(1)
        index = torch.arange(batch, device=boxes.device).repeat_interleave(m)[flat]
        return torch.cat([index[:, None].to(boxes.dtype), boxes.reshape(-1, 4)[flat]], dim=1), flat
    if valid is not None:
        raise ValueError("a validity mask goes with padded (B, M, 4) boxes, not with a list")
    rois = [torch.cat([torch.full((len(b), 1), i, dtype=b.dtype, device=b.device), b.reshape(-1, 4)], dim=1)
            for i, b in enumerate(boxes)]
    return torch.cat(rois, dim=0), None


def pool_boxes(dense: torch.Tensor, boxes: Boxes, patch_size: tuple[int, int],
               valid: torch.Tensor | None = None, normalize: bool = True) -> torch.Tensor:
    """One embedding per box by 1x1 RoIAlign (``aligned=True``, adaptive sampling) on a dense map.

    Args:
        dense: ``(B, D, h, w)`` patch features; cell ``(i, j)`` covers pixels ``[j*pw, (j+1)*pw)`` in x.
        boxes: ``xyxy`` boxes in input-tensor pixels: a list of ``(K_i, 4)`` or a padded ``(B, M, 4)``.
        patch_size: ``(ph, pw)`` pixels per feature cell.
        valid: ``(B, M)`` bool mask for padded boxes.
    Returns:
        ``(sum K_i, D)`` for a list (image by image), or ``(B, M, D)`` for padded boxes (zero rows where
        invalid); L2-normalised if ``normalize``.
    """
    rois, flat = boxes_to_rois(boxes, valid)
    ph, pw = patch_size
    scale = rois.new_tensor([1.0, 1.0 / pw, 1.0 / ph, 1.0 / pw, 1.0 / ph])
    rois = (rois * scale).float()
    if len(rois):
        pooled = roi_align(dense.float(), rois, output_size=(1, 1), spatial_scale=1.0, sampling_ratio=-1,
                           aligned=True)[:, :, 0, 0]
    else:  # no box: an empty result that keeps the graph (a loss on it must back-propagate on every rank)
        pooled = dense[:0, :, 0, 0].float()
    if normalize:
        pooled = F.normalize(pooled, dim=-1)
    if flat is None:
        return pooled
    batch, m = boxes.shape[:2]
    return pooled.new_zeros(batch * m, pooled.shape[1]).index_copy(0, flat, pooled).view(batch, m, -1)


def crop_boxes(images: torch.Tensor, boxes: Boxes, size: tuple[int, int], valid: torch.Tensor | None = None,
               fill: torch.Tensor | None = None) -> torch.Tensor:
    """Crops of boxes resized to ``size`` keeping their aspect ratio, padded right/bottom with ``fill``
    (the ``longest_pad`` geometry), by RoIAlign with adaptive sampling (an area average when shrinking).

    Args:
        images: ``(B, C, H, W)`` float images.
        boxes: ``xyxy`` pixel boxes, a list of ``(K_i, 4)`` or a padded ``(B, M, 4)`` with ``valid``.
        size: ``(h, w)`` of the crops.
        fill: ``(C,)`` padding value (e.g. black after normalisation); None pads with 0.
    Returns:
        ``(R, C, h, w)``, one crop per (valid) box, image by image.
    """
    rois, _ = boxes_to_rois(boxes, valid)
    rois = rois.float()
    out_h, out_w = size
    if not len(rois):
        return images.new_zeros(0, images.shape[1], out_h, out_w)
    box_w, box_h = rois[:, 3] - rois[:, 1], rois[:, 4] - rois[:, 2]
    scale = torch.minimum(out_h / box_h, out_w / box_w)  # crop pixels per image pixel
    window = rois.clone()  # the image area that maps onto the whole crop, box in its top-left corner
    window[:, 3] = rois[:, 1] + out_w / scale
    window[:, 4] = rois[:, 2] + out_h / scale
    crops = roi_align(images.float(), window, output_size=(out_h, out_w), spatial_scale=1.0,
                      sampling_ratio=-1, aligned=True)
    rows = torch.arange(out_h, device=images.device) + 0.5
    cols = torch.arange(out_w, device=images.device) + 0.5
    inside = ((rows[None, :, None] < (box_h * scale)[:, None, None])
              & (cols[None, None, :] < (box_w * scale)[:, None, None])).unsqueeze(1)
    pad = torch.zeros(images.shape[1], device=images.device) if fill is None else fill.float()
    return torch.where(inside, crops, pad.view(1, -1, 1, 1)).to(images.dtype)
