"""The pictures: each function writes a PNG of the expected size whose pixels show the expected colours at the
expected places (panels are laid out in exact pixels by ``PanelGrid``)."""

import itertools

import numpy as np
import pytest
import torch
from matplotlib import colormaps
from photos import CATEGORIES, category_map, photo
from PIL import Image

from finegrain.models import create_model
from finegrain.objectives.token_removal import mean_cls_attention
from finegrain.viz.attention import cls_attention_maps, plot_attention
from finegrain.viz.boxes import RIGHT, WRONG, plot_box_predictions
from finegrain.viz.clusters import dense_clusters, kmeans_plus_plus, plot_dense_clusters
from finegrain.viz.panels import PanelGrid, palette
from finegrain.viz.segmentation import plot_segmentation


def read_png(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def at(png: np.ndarray, panels: PanelGrid, row: int, col: int, y: float, x: float) -> np.ndarray:
    """The PNG's RGB where panel (row, col) shows image point (y, x) (image pixels, edges at integers)."""
    x0, y0, x1, y1 = panels.box(row, col)
    height, width = panels.image_size
    return png[int(y0 + y * (y1 - y0) / height), int(x0 + x * (x1 - x0) / width)]


def hex_rgb(colour: str) -> np.ndarray:
    return np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)])


def blend(rgb, alpha: float, under) -> np.ndarray:
    return alpha * np.asarray(rgb, dtype=float) + (1 - alpha) * np.asarray(under, dtype=float)


def assert_colour(actual, expected, tol: float = 3):
    assert np.abs(np.asarray(actual) - np.asarray(expected)).max() <= tol, (actual, expected)


def test_palette_is_fixed_distinct_and_neither_black_nor_white():
    colours = palette(300)
    assert colours[:3].tolist() == [[0, 128, 255], [128, 255, 0], [255, 0, 128]]  # farthest from black, white
    assert np.array_equal(palette(20), colours[:20])
    assert len(np.unique(colours, axis=0)) == 300
    assert not (colours == 0).all(axis=1).any() and not (colours == 255).all(axis=1).any()
    with pytest.raises(ValueError, match="727 colours"):
        palette(728)


# ----- attention ----------------------------------------------------------------------------------------
def test_cls_attention_maps_select_a_layer_or_average_all_of_them():
    torch.manual_seed(0)
    model = create_model("finegrain-test").train()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        full = model.eval().cls_attention(images)  # (B, L, heads, 4, 4)
    model.train()
    layers = full.shape[1]
    assert torch.allclose(cls_attention_maps(model, images), full[:, -1].mean(1))
    assert torch.allclose(cls_attention_maps(model, images, layer=0, per_head=True), full[:, 0])
    # None: the map DetailCLIP's token removal ranks
    assert torch.allclose(cls_attention_maps(model, images, layer=None),
                          mean_cls_attention(full.flatten(-2), (4, 4)))
    assert model.training  # the train/eval flag is restored
    with pytest.raises(ValueError, match="layer"):
        cls_attention_maps(model, images, layer=layers)


def one_hot_attention(batch: int, hot: list[tuple[int, int]]) -> torch.Tensor:
    attention = torch.zeros(batch, 4, 4)
    for i, (r, c) in enumerate(hot):
        attention[i, r, c] = 1.0
    return attention


def test_attention_picture_shows_the_heat_map_and_the_removed_patches(tmp_path):
    images = torch.full((2, 3, 32, 32), 255, dtype=torch.uint8)  # white
    attention = one_hot_attention(2, [(0, 0), (3, 2)])
    removed = torch.ones(2, 4, 4, dtype=torch.bool)
    removed[:, :2, :2] = False  # the top-left 2x2 block is kept
    path = plot_attention(images, attention, removed, tmp_path / "attention.png", titles=["a", "b"])
    png = read_png(path)
    panels = PanelGrid(2, 3, (32, 32))
    assert png.shape[:2] == panels.size == (600, 900)
    hot, cold = (blend(np.array(colormaps["inferno"](v)[:3]) * 255, 0.6, [255] * 3) for v in (1.0, 0.0))
    for i, (r, c) in enumerate([(0, 0), (3, 2)]):
        assert_colour(at(png, panels, i, 1, 8 * r + 4, 8 * c + 4), hot)  # patch centres (8-pixel patches)
        assert_colour(at(png, panels, i, 1, 8 * (3 - r) + 4, 8 * (3 - c) + 4), cold)
        assert_colour(at(png, panels, i, 0, 8 * r + 4, 8 * c + 4), [255] * 3)  # the image itself
    assert_colour(at(png, panels, 0, 2, 12, 12), [255] * 3)  # kept: the image as it is
    assert_colour(at(png, panels, 0, 2, 28, 4), [64] * 3)  # removed: darkened to a quarter
    assert_colour(at(png, panels, 1, 2, 4, 28), [64] * 3)


def test_per_head_attention_picture_has_the_mean_then_one_column_per_head(tmp_path):
    images = torch.full((1, 3, 32, 32), 255, dtype=torch.uint8)
    attention = torch.stack([one_hot_attention(1, [(0, 0)]), one_hot_attention(1, [(2, 3)])], dim=1)
    png = read_png(plot_attention(images, attention, None, tmp_path / "heads.png"))
    panels = PanelGrid(1, 4, (32, 32))  # image, mean of heads, head 0, head 1
    assert png.shape[:2] == panels.size == (300, 1200)
    hot, cold = (blend(np.array(colormaps["inferno"](v)[:3]) * 255, 0.6, [255] * 3) for v in (1.0, 0.0))
    assert_colour(at(png, panels, 0, 2, 4, 4), hot)
    assert_colour(at(png, panels, 0, 2, 20, 28), cold)
    assert_colour(at(png, panels, 0, 3, 20, 28), hot)
    assert_colour(at(png, panels, 0, 1, 4, 4), hot)  # the mean: 0.5 at both, the maximum of its map
    assert_colour(at(png, panels, 0, 1, 20, 28), hot)
    assert_colour(at(png, panels, 0, 1, 28, 4), cold)


def test_attention_picture_rejects_mismatched_inputs(tmp_path):
    images = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    with pytest.raises(ValueError, match="uint8"):
        plot_attention(images.float(), torch.zeros(2, 4, 4), None, tmp_path / "x.png")
    with pytest.raises(ValueError, match="removed"):
        plot_attention(images, torch.zeros(2, 4, 4), torch.zeros(2, 15, dtype=torch.bool), tmp_path / "x.png")
    with pytest.raises(ValueError, match="titles"):
        plot_attention(images, torch.zeros(2, 4, 4), None, tmp_path / "x.png", titles=["one"])


# ----- dense k-means ------------------------------------------------------------------------------------
def features_from(truth: torch.Tensor, directions: torch.Tensor, noise: float = 0.05) -> torch.Tensor:
    """``(N, h, w)`` cluster ids -> ``(N, D, h, w)`` features: the cluster's direction, noised, each patch
    scaled by its own positive factor (cosine k-means must not care)."""
    torch.manual_seed(1)
    features = directions[truth] + noise * torch.randn(*truth.shape, directions.shape[1])
    features = features * torch.empty(*truth.shape, 1).uniform_(0.1, 10)
    return features.permute(0, 3, 1, 2)


def test_kmeans_recovers_two_known_clusters_exactly():
    torch.manual_seed(0)
    truth = (torch.rand(3, 6, 7) > 0.5).long()
    truth[:, 0, 0], truth[:, -1, -1] = 0, 1  # both clusters present
    directions = torch.eye(16)[:2]
    labels = dense_clusters(features_from(truth, directions), k=2, seed=0)
    assert labels.shape == (3, 6, 7) and labels.dtype == torch.long
    assert torch.equal(labels, truth)  # labels numbered by first appearance: the top-left patch is 0


def test_kmeans_recovers_three_clusters_up_to_label_permutation():
    torch.manual_seed(0)
    truth = torch.randint(0, 3, (2, 8, 8))
    directions = torch.nn.functional.normalize(torch.randn(3, 32), dim=1)
    for seed in range(3):
        labels = dense_clusters(features_from(truth, directions), k=3, seed=seed)
        for i in range(2):
            pairs = set(zip(truth[i].flatten().tolist(), labels[i].flatten().tolist()))
            assert len(pairs) == 3 and len({t for t, _ in pairs}) == 3 and len({p for _, p in pairs}) == 3


def test_kmeans_is_deterministic_for_a_seed_and_labels_by_first_appearance():
    torch.manual_seed(0)
    features = torch.randn(3, 16, 8, 8)
    runs = [dense_clusters(features, k=5, seed=s) for s in (7, 7, 8, 9, 10)]
    assert torch.equal(runs[0], runs[1])
    assert any(not torch.equal(runs[0], other) for other in runs[2:])  # the seed picks the initialisation
    for labels in runs[0]:
        firsts = [int((labels.flatten() == c).nonzero()[0]) for c in range(5)]
        assert firsts == sorted(firsts) and firsts[0] == 0


def test_kmeans_plus_plus_seeds_distinct_points_while_any_are_left():
    points = torch.eye(3).repeat_interleave(4, dim=0)  # three distinct points, four copies each
    generator = torch.Generator().manual_seed(0)
    assert len(torch.unique(kmeans_plus_plus(points, 3, generator), dim=0)) == 3
    assert kmeans_plus_plus(torch.eye(3)[:1].repeat(5, 1), 2, generator).shape == (2, 3)  # all alike


def test_kmeans_rejects_a_k_the_patches_cannot_fill():
    with pytest.raises(ValueError, match="k: expected 1 to 4"):
        dense_clusters(torch.randn(1, 8, 2, 2), k=5, seed=0)
    with pytest.raises(ValueError, match="k: expected"):
        dense_clusters(torch.randn(1, 8, 2, 2), k=0, seed=0)


def test_cluster_picture_overlays_each_models_labels(tmp_path):
    images = torch.zeros(1, 3, 16, 16, dtype=torch.uint8)  # black, so a panel pixel is alpha * colour
    left_right = torch.tensor([[0, 0, 1, 1]]).repeat(4, 1)[None]
    top_bottom = left_right.transpose(1, 2)
    path = plot_dense_clusters(images, {"model A": left_right, "model B": top_bottom}, tmp_path / "k.png")
    png = read_png(path)
    panels = PanelGrid(1, 3, (16, 16))
    assert png.shape[:2] == panels.size == (300, 900)
    colours = palette(2)
    assert_colour(at(png, panels, 0, 1, 12, 2), blend(colours[0], 0.6, [0] * 3))
    assert_colour(at(png, panels, 0, 1, 2, 12), blend(colours[1], 0.6, [0] * 3))
    assert_colour(at(png, panels, 0, 2, 2, 12), blend(colours[0], 0.6, [0] * 3))
    assert_colour(at(png, panels, 0, 2, 12, 2), blend(colours[1], 0.6, [0] * 3))
    assert_colour(at(png, panels, 0, 0, 8, 8), [0] * 3)
    with pytest.raises(ValueError, match="model B"):
        plot_dense_clusters(images, {"model A": left_right, "model B": top_bottom[0]}, tmp_path / "x.png")


def test_dense_clusters_of_model_features_draw_side_by_side(tmp_path):
    model = create_model("finegrain-test")
    image = np.asarray(photo("chelsea").resize((64, 48)))
    images = torch.from_numpy(image.copy()).permute(2, 0, 1)[None]
    with torch.no_grad():
        dense = model.encode_dense(images.float() / 255 - 0.5)  # (1, D, 6, 8)
    clusters = {"v_only": dense_clusters(dense, k=3, seed=0)}
    assert clusters["v_only"].shape == (1, 6, 8) and set(clusters["v_only"].unique().tolist()) == {0, 1, 2}
    png = read_png(plot_dense_clusters(images, clusters, tmp_path / "model.png", titles=["chelsea"]))
    assert png.shape[:2] == PanelGrid(1, 2, (48, 64)).size == (28 + 198 + 8, 2 * (264 + 36))


# ----- boxes --------------------------------------------------------------------------------------------
def test_box_picture_draws_right_boxes_green_and_wrong_boxes_red(tmp_path):
    image = Image.new("RGB", (320, 240), (128, 128, 128))
    boxes = torch.tensor([[20.0, 40, 120, 200], [180, 60, 300, 220]])
    path = plot_box_predictions(image, boxes, ["cat", "dog"], ["cat", "cup"], [0.9, 0.4], tmp_path / "b.png",
                                title="grey.png")
    png = read_png(path)
    panels = PanelGrid(1, 1, (240, 320), long_side=800)
    assert png.shape[:2] == panels.size == (28 + 600 + 8, 800 + 36)
    for (x0, y0, x1, y1), colour in zip(boxes.tolist(), (RIGHT, WRONG)):
        middle = (y0 + y1) / 2
        for x in (x0, x1):
            assert_colour(at(png, panels, 0, 0, middle, x), hex_rgb(colour), tol=6)  # on the border
        assert_colour(at(png, panels, 0, 0, middle, (x0 + x1) / 2), [128] * 3)  # inside: the image
    # the labels sit on filled boxes of the box colour just above each box
    for (x0, y0, _, _), colour in zip(boxes.tolist(), (RIGHT, WRONG)):
        label_row = [at(png, panels, 0, 0, y0 - 3, x0 + dx) for dx in range(2, 20)]
        assert sum(np.abs(p - hex_rgb(colour)).max() <= 30 for p in label_row) > 9


def test_box_picture_needs_one_label_and_score_per_box(tmp_path):
    image = Image.new("RGB", (32, 32))
    with pytest.raises(ValueError, match="2 boxes need as many"):
        plot_box_predictions(image, torch.zeros(2, 4), ["a", "b"], ["a"], [0.5, 0.5], tmp_path / "x.png")


# ----- segmentation -------------------------------------------------------------------------------------
def test_segmentation_picture_colours_each_class_and_blacks_out_ignored_pixels(tmp_path):
    gt = category_map("chelsea")  # (300, 451): wall, the cat's ellipse, unlabelled (255) right of it
    cat, wall, table = (CATEGORIES.index(c) for c in ("cat", "wall", "table"))
    pred = gt.copy()
    pred[gt == cat] = table
    path = plot_segmentation(photo("chelsea"), torch.from_numpy(pred), gt, CATEGORIES, tmp_path / "s.png",
                             title="chelsea.png")
    png = read_png(path)
    panels = PanelGrid(1, 3, (300, 451), long_side=400)
    assert png.shape[0] == panels.size[0] == 28 + 266 + 8 and png.shape[1] > panels.size[1]  # + legend
    colours = palette(len(CATEGORIES))
    for (y, x), truth in {(150, 255): cat, (150, 20): wall}.items():
        assert_colour(at(png, panels, 0, 2, y, x), colours[truth], tol=0)
        assert_colour(at(png, panels, 0, 1, y, x), colours[pred[y, x]], tol=0)
    assert pred[150, 255] == table and gt[5, 445] == 255
    assert_colour(at(png, panels, 0, 1, 5, 445), [0] * 3, tol=0)  # ignored: black
    assert_colour(at(png, panels, 0, 2, 5, 445), [0] * 3, tol=0)
    assert_colour(at(png, panels, 0, 0, 150, 255), np.asarray(photo("chelsea"))[150, 255], tol=40)
    legend = png[:, panels.size[1]:].reshape(-1, 3)
    shown = {tuple(c) for c in legend.tolist()}
    assert {tuple(colours[c]) for c in (cat, wall, table)} | {(0, 0, 0)} <= shown
    assert tuple(colours[CATEGORIES.index("sky")]) not in shown  # only the classes that appear


def test_segmentation_picture_rejects_labels_outside_the_class_list(tmp_path):
    gt = np.zeros((8, 8), dtype=np.int64)
    with pytest.raises(ValueError, match="pred: labels must be class indices 0..1"):
        plot_segmentation(Image.new("RGB", (8, 8)), np.full((8, 8), 2), gt, ["a", "b"], tmp_path / "x.png")
    with pytest.raises(ValueError, match="one size"):
        plot_segmentation(Image.new("RGB", (8, 8)), gt[:4], gt, ["a", "b"], tmp_path / "x.png")


def test_panel_titles_fit_their_panels_and_never_overlap():
    """Long titles over narrow (portrait) panels shrink, then are cut, so that neighbours never overlap."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from finegrain.viz.panels import PanelGrid

    for size in [(160, 48), (400, 20), (64, 64)]:
        grid = PanelGrid(1, 3, size, long_side=200)
        titles = [grid.axes(0, c, "prediction (pixel accuracy 83.4%)").title for c in range(3)]
        renderer = FigureCanvasAgg(grid.figure).get_renderer()
        boxes = [t.get_window_extent(renderer) for t in titles]
        assert all(a.x1 <= b.x0 for a, b in itertools.pairwise(boxes)), size
        assert all(box.x0 >= 0 and box.x1 <= grid.size[1] for box in boxes)
