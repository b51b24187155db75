"""Drawing helpers shared by the pictures: a figure of image panels laid out in exact pixels (so a pixel of
the saved PNG maps to known image coordinates) and a fixed colour palette for class / cluster indices."""

from __future__ import annotations

from pathlib import Path

import numpy as np

DPI = 100
SOFTWARE = "finegrain viz"  # the PNG metadata that marks a picture as finegrain's (it may replace it)
TITLE_PX = 28  # strip above each panel for its title
MARGIN_PX = 18  # left and right of each panel
BOTTOM_PX = 8  # below each panel
TITLE_POINTS = 10  # title font size, shrunk (to MIN_TITLE_POINTS) so that a title fits its panel and margins
MIN_TITLE_POINTS = 6
CHAR_EM = 0.6  # a title character's mean width, in ems (DejaVu Sans)


def palette(count: int) -> np.ndarray:
    """``(count, 3)`` uint8 colours, well apart: from a 9-level RGB grid, each next colour is the one farthest
    (Euclidean, RGB) from black, white and the colours before it. Fixed: index ``i`` has the same colour in
    every picture and for every ``count``; none is black (ignored pixels) or white (the background)."""
    levels = np.linspace(0, 255, 9).round()
    candidates = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), axis=-1).reshape(-1, 3)
    if not 0 <= count <= len(candidates) - 2:
        raise ValueError(f"the palette has {len(candidates) - 2} colours, {count} were asked for")
    distance = np.minimum((candidates ** 2).sum(1), ((candidates - 255) ** 2).sum(1))
    chosen = []
    for _ in range(count):
        chosen.append(int(distance.argmax()))
        distance = np.minimum(distance, ((candidates - candidates[chosen[-1]]) ** 2).sum(1))
    return candidates[chosen].astype(np.uint8).reshape(count, 3)


class PanelGrid:
    """``rows x cols`` panels of equal size, each under a title strip and between margins, plus ``right``
    pixels on the right (for a legend). An image of ``image_size`` ``(H, W)`` is shown scaled so its longer
    side is ``long_side`` pixels; :meth:`box` says where a panel lies in the saved PNG."""

    def __init__(self, rows: int, cols: int, image_size: tuple[int, int], long_side: int = 264,
                 right: int = 0):
        from matplotlib.figure import Figure

        self.image_size = (int(image_size[0]), int(image_size[1]))
        scale = long_side / max(self.image_size)
        self.panel = (max(1, round(self.image_size[0] * scale)), max(1, round(self.image_size[1] * scale)))
        self.size = (rows * (TITLE_PX + self.panel[0] + BOTTOM_PX),
                     cols * (self.panel[1] + 2 * MARGIN_PX) + right)
        self.figure = Figure(figsize=(self.size[1] / DPI, self.size[0] / DPI), dpi=DPI, facecolor="white")

    def box(self, row: int, col: int) -> tuple[int, int, int, int]:
        """The panel's ``(x0, y0, x1, y1)`` in PNG pixels (x1, y1 exclusive)."""
        x0 = col * (self.panel[1] + 2 * MARGIN_PX) + MARGIN_PX
        y0 = row * (TITLE_PX + self.panel[0] + BOTTOM_PX) + TITLE_PX
        return x0, y0, x0 + self.panel[1], y0 + self.panel[0]

    def axes(self, row: int, col: int, title: str, picture: np.ndarray | None = None, **imshow):
        """The panel's axes, in image coordinates (x right, y down, pixel edges at integers), titled and
        without ticks; ``picture`` (an ``(h, w[, 3|4])`` array) is stretched over the whole image."""
        x0, y0, x1, y1 = self.box(row, col)
        height, width = self.size
        ax = self.figure.add_axes((x0 / width, 1 - y1 / height, (x1 - x0) / width, (y1 - y0) / height))
        ax.set_xlim(0, self.image_size[1])
        ax.set_ylim(self.image_size[0], 0)
        ax.set_axis_off()
        text, points = self.fitted_title(title)
        ax.set_title(text, fontsize=points, pad=5)
        if picture is not None:
            self.show(ax, picture, **imshow)
        return ax

    def fitted_title(self, title: str) -> tuple[str, float]:
        """``title`` and the font size at which it spans at most its panel and margins (neighbouring titles never
        overlap): :data:`TITLE_POINTS` at most, :data:`MIN_TITLE_POINTS` at least, below which it is cut."""
        room = self.panel[1] + 2 * MARGIN_PX - 4  # pixels
        char_px = DPI * CHAR_EM / 72  # per point
        points = max(MIN_TITLE_POINTS, min(TITLE_POINTS, room / (char_px * max(len(title), 1))))
        fits = int(room / (char_px * points))
        return (title if len(title) <= fits else title[:max(fits - 1, 1)] + "…"), points

    def show(self, ax, picture: np.ndarray, **imshow) -> None:
        """Draw ``picture`` stretched over the whole image area of ``ax`` (``imshow`` keywords pass on)."""
        ax.imshow(picture, extent=(0, self.image_size[1], self.image_size[0], 0), aspect="auto", **imshow)

    def save(self, out_path: str | Path) -> Path:
        """Write the PNG (parent folders created, marked as finegrain's: see :func:`check_replaceable`) and
        return its path."""
        out_path = Path(out_path)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        self.figure.savefig(out_path, dpi=DPI, facecolor="white", metadata={"Software": SOFTWARE})
        return out_path


def check_replaceable(out_path: str | Path) -> Path:
    """``out_path``, after checking that nothing is there but a picture finegrain wrote (its PNG metadata
    says so): another file is never overwritten."""
    out_path = Path(out_path)
    if out_path.exists():
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(out_path) as image:
                ours = image.info.get("Software") == SOFTWARE
        except (OSError, UnidentifiedImageError):
            ours = False
        if not ours:
            raise FileExistsError(f"{out_path} exists and is not a picture finegrain wrote: choose another "
                                  "output path, or move that file away")
    return out_path
