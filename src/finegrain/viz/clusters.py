"""Dense-feature k-means per image, and the clusterings of several models side by side over the images (the
FineCLIP paper's qualitative figure: image | model A clusters | model B clusters)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import DataError
from .panels import PanelGrid, palette


def kmeans_plus_plus(points: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding on unit vectors ``(n, D)`` -> ``(k, D)`` centroids: each next one drawn with
    probability proportional to the squared Euclidean distance to the nearest chosen one (``2 - 2 cos``);
    uniformly when every point coincides with a chosen one."""
    chosen = [int(torch.randint(len(points), (1,), generator=generator))]
    distance = (1 - points @ points[chosen[0]]).clamp_min(0)
    for _ in range(1, k):
        if distance.sum() > 0:
            index = int(torch.multinomial(distance, 1, generator=generator))
        else:
            index = int(torch.randint(len(points), (1,), generator=generator))
        chosen.append(index)
        distance = torch.minimum(distance, (1 - points @ points[index]).clamp_min(0))
    return points[chosen]


def first_appearance_labels(labels: torch.Tensor, k: int) -> torch.Tensor:
    """Renumber cluster labels ``(n,)`` so clusters are numbered in the raster order of their first patch."""
    positions = torch.arange(len(labels))
    first = torch.full((k,), len(labels)).scatter_reduce(0, labels, positions, "amin")
    rank = torch.empty(k, dtype=torch.long)
    rank[torch.argsort(first, stable=True)] = torch.arange(k)
    return rank[labels]


def kmeans(points: torch.Tensor, k: int, generator: torch.Generator, iterations: int) -> torch.Tensor:
    """Spherical k-means of unit vectors ``(n, D)`` -> ``(n,)`` labels: k-means++ seeding, then Lloyd
    iterations (assign to the most cosine-similar centroid, centroid = normalised mean of its points; an
    emptied cluster keeps its centroid) until the assignment stops changing."""
    centroids = kmeans_plus_plus(points, k, generator)
    labels = None
    for _ in range(iterations):
        new = (points @ centroids.T).argmax(dim=1)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        sums = torch.zeros_like(centroids).index_add_(0, labels, points)
        counts = torch.bincount(labels, minlength=k).unsqueeze(1)
        centroids = torch.where(counts > 0, F.normalize(sums, dim=1), centroids)
    return first_appearance_labels(labels, k)


def dense_clusters(features: torch.Tensor, k: int, seed: int = 0, iterations: int = 100) -> torch.Tensor:
    """Cluster each image's patch features ``(N, D, h, w)`` into ``k`` groups -> ``(N, h, w)`` int64 labels.

    Cosine k-means (:func:`kmeans`) on the L2-normalised features, per image, on the CPU in float32;
    deterministic for a ``seed``. Labels are numbered by first appearance in raster order (the top-left
    patch is in cluster 0), so equal clusterings get equal labels.
    """
    if features.ndim != 4:
        raise ValueError(f"features must be (N, D, h, w), got {tuple(features.shape)}")
    n, _, h, w = features.shape
    if not 1 <= k <= h * w:
        raise DataError(f"k: expected 1 to {h * w} clusters (the patches of one image), got {k}")
    if iterations < 1:
        raise DataError(f"iterations: expected >= 1, got {iterations}")
    points = F.normalize(features.detach().float().cpu().flatten(2).transpose(1, 2), dim=-1)  # (N, hw, D)
    generator = torch.Generator().manual_seed(seed)
    return torch.stack([kmeans(p, k, generator, iterations) for p in points]).view(n, h, w)


def plot_dense_clusters(images: torch.Tensor, clusters: Mapping[str, torch.Tensor], out_path: str | Path,
                        titles: Sequence[str] | None = None, alpha: float = 0.6) -> Path:
    """Save a PNG with one row per image: the image, then one column per model with its cluster map
    (nearest-upsampled, one fixed colour per label, ``alpha`` opaque) over the image.

    Args:
        images: ``(N, 3, H, W)`` uint8.
        clusters: model name -> ``(N, h, w)`` integer labels (e.g. from :func:`dense_clusters`).
        titles: one per image (e.g. file names), shown over the image; default "image".
    """
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be uint8 (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
    count = images.shape[0]
    if not clusters:
        raise ValueError("clusters: expected at least one model's cluster maps")
    for name, maps in clusters.items():
        if maps.ndim != 3 or maps.shape[0] != count or maps.is_floating_point() or int(maps.min()) < 0:
            raise ValueError(f"clusters[{name!r}] must be (N, h, w) labels >= 0 for {count} images, got "
                             f"{maps.dtype} {tuple(maps.shape)}")
    if titles is not None and len(titles) != count:
        raise ValueError(f"titles: expected one per image ({count}), got {len(titles)}")
    colours = palette(1 + max(int(maps.max()) for maps in clusters.values()))

    panels = PanelGrid(count, 1 + len(clusters), tuple(images.shape[-2:]))
    for i in range(count):
        picture = images[i].permute(1, 2, 0).cpu().numpy()
        panels.axes(i, 0, titles[i] if titles is not None else "image", picture)
        for col, (name, maps) in enumerate(clusters.items(), start=1):
            labels = maps[i].cpu()
            ax = panels.axes(i, col, f"{name} ({len(labels.unique())} clusters)", picture)
            panels.show(ax, colours[labels.numpy()], alpha=alpha, interpolation="nearest")
    return panels.save(out_path)
