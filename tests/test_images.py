"""load_image on a real photograph saved in every odd encoding: mode conversion, EXIF orientation, draft."""

from __future__ import annotations

import io

import numpy as np
import pytest
from matplotlib import cbook
from PIL import Image

from finegrain.data.images import ImageError, load_image, load_image_bytes, original_size, to_rgb

PHOTO = cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)  # 512 x 600 RGB JPEG


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    with Image.open(PHOTO) as image:
        return image.convert("RGB")


@pytest.fixture(scope="module")
def grey(photo) -> np.ndarray:
    """``(600, 512)`` int: the photo's 8-bit grey values."""
    return np.asarray(photo.convert("L")).astype(int)


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def _load(image: Image.Image, fmt: str, tmp_path, **options) -> np.ndarray:
    """Save ``image`` as ``fmt`` in ``tmp_path``, load it with ``load_image``; ``(H, W, 3)`` int pixels."""
    path = tmp_path / f"image.{fmt.lower()}"
    path.write_bytes(_encode(image, fmt, **options))
    loaded = load_image(path)
    assert loaded.mode == "RGB"
    return np.asarray(loaded).astype(int)


def _grey_channels(pixels: np.ndarray) -> np.ndarray:
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()
    return pixels[..., 0]


def test_rgb_jpeg_decodes_to_its_pixels(photo, tmp_path):
    assert np.array_equal(_load(photo, "PNG", tmp_path), np.asarray(photo))


def test_16bit_grey_png_is_divided_by_257_not_clipped_to_white(grey, tmp_path):
    sixteen = Image.fromarray((grey * 257).astype(np.uint16))
    assert sixteen.mode == "I;16"
    path = tmp_path / "grey16.png"
    path.write_bytes(_encode(sixteen, "PNG"))
    with Image.open(path) as raw:
        assert raw.mode == "I;16"
    pixels = _grey_channels(np.asarray(load_image(path)).astype(int))
    assert np.array_equal(pixels, grey)  # v * 257 / 257 == v exactly
    assert pixels.mean() < 120  # a dark-suited portrait, not near-white


def test_16bit_big_endian_grey_is_divided_by_257(grey, tmp_path):
    big_endian = Image.frombytes("I;16B", (512, 600), (grey * 256).astype(">u2").tobytes())
    pixels = _grey_channels(_load(big_endian, "TIFF", tmp_path))
    assert np.array_equal(pixels, np.rint(grey * 256 / 257).astype(int))  # e.g. 255 -> 254.0 -> 254


def test_32bit_int_grey_is_divided_by_257_only_when_above_255(grey, tmp_path):
    wide = Image.fromarray((grey * 257).astype(np.int32), "I")
    assert np.array_equal(_grey_channels(_load(wide, "TIFF", tmp_path)), grey)
    narrow = Image.fromarray(grey.astype(np.int32), "I")  # values already 8-bit: kept as they are
    assert np.array_equal(_grey_channels(_load(narrow, "TIFF", tmp_path)), grey)


def test_32bit_int_grey_beyond_16_bits_is_scaled_by_its_range_not_clipped(grey, tmp_path):
    wide = Image.fromarray((grey * 400).astype(np.int32), "I")  # up to 102000: was 54% clipped to 255
    path = tmp_path / "grey32.tif"
    path.write_bytes(_encode(wide, "TIFF"))
    with Image.open(path) as raw:
        assert raw.mode == "I"
    assert np.array_equal(_grey_channels(np.asarray(load_image(path)).astype(int)), grey)
    signed = Image.fromarray((grey - 128).astype(np.int32), "I")  # negative values: scaled from the lowest
    assert np.array_equal(_grey_channels(_load(signed, "TIFF", tmp_path)), grey - grey.min())


def test_float_grey_with_infinities_is_scaled_by_its_finite_range():
    image = Image.fromarray(np.array([[-np.inf, 0.0], [2.0, np.inf]], dtype=np.float32), "F")
    assert np.array_equal(_grey_channels(np.asarray(to_rgb(image, "f.tif"))), [[0, 0], [255, 255]])


def test_float_grey_in_unit_range_is_scaled_by_255(grey, tmp_path):
    unit = Image.fromarray((grey / 255).astype(np.float32), "F")
    assert np.array_equal(_grey_channels(_load(unit, "TIFF", tmp_path)), grey)


def test_float_grey_outside_unit_range_is_min_max_scaled():
    image = Image.fromarray(np.array([[-1.0, 0.0], [1.0, 3.0]], dtype=np.float32), "F")
    # (v + 1) / 4 * 255 -> 0, 63.75, 127.5, 255 -> rounded to even: 0, 64, 128, 255
    assert np.array_equal(_grey_channels(np.asarray(to_rgb(image, "f.tif"))), [[0, 64], [128, 255]])


def test_bilevel_and_grey_modes_become_grey_rgb(photo, grey, tmp_path):
    assert np.array_equal(_grey_channels(_load(photo.convert("L"), "PNG", tmp_path)), grey)
    bilevel = _grey_channels(_load(photo.convert("1"), "PNG", tmp_path))
    assert set(np.unique(bilevel)) == {0, 255}
    assert abs(bilevel.mean() - grey.mean()) < 10  # dithering keeps the mean brightness


def test_palette_png_decodes_to_its_palette_colours(photo, tmp_path):
    palette = photo.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    pixels = _load(palette, "PNG", tmp_path)
    assert np.array_equal(pixels, np.asarray(palette.convert("RGB")))
    assert np.abs(pixels - np.asarray(photo)).mean() < 8


def test_palette_png_with_transparency_is_composited_on_white(photo, tmp_path):
    palette = photo.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    transparent = np.asarray(palette) == 0
    assert transparent.sum() > 1000
    pixels = _load(palette, "PNG", tmp_path, transparency=0)
    assert (pixels[transparent] == 255).all()
    assert np.array_equal(pixels[~transparent], np.asarray(palette.convert("RGB"))[~transparent])


def _alpha() -> np.ndarray:
    """``(600, 512)`` uint8 alpha: opaque, half (128) and fully transparent vertical bands."""
    alpha = np.zeros((600, 512), np.uint8)
    alpha[:, :200], alpha[:, 200:400] = 255, 128
    return alpha


def test_rgba_png_is_composited_on_white(photo, tmp_path):
    rgba = photo.convert("RGBA")
    rgba.putalpha(Image.fromarray(_alpha()))
    pixels, rgb = _load(rgba, "PNG", tmp_path), np.asarray(photo).astype(int)
    assert np.array_equal(pixels[:, :200], rgb[:, :200])
    assert (pixels[:, 400:] == 255).all()
    over_white = rgb[:, 200:400] * 128 / 255 + 255 * (1 - 128 / 255)
    assert np.abs(pixels[:, 200:400] - over_white).max() <= 1


@pytest.mark.parametrize("mode", ["LA", "PA"])
def test_grey_and_palette_alpha_are_composited_on_white(photo, mode, tmp_path):
    base = photo.convert("L" if mode == "LA" else "P")
    image = base.convert(mode)
    image.putalpha(Image.fromarray(_alpha()))
    if mode == "LA":
        pixels = _load(image, "PNG", tmp_path)
    else:  # no file format stores PA
        pixels = np.asarray(to_rgb(image, "pa")).astype(int)
    assert np.array_equal(pixels[:, :200], np.asarray(base.convert("RGB"))[:, :200].astype(int))
    assert (pixels[:, 400:] == 255).all()


def test_cmyk_jpeg_decodes_close_to_the_rgb_photo(photo, tmp_path):
    path = tmp_path / "cmyk.jpg"
    path.write_bytes(_encode(photo.convert("CMYK"), "JPEG", quality=95))
    with Image.open(path) as raw:
        assert raw.mode == "CMYK"
    assert np.abs(np.asarray(load_image(path)).astype(int) - np.asarray(photo)).mean() < 2


@pytest.mark.parametrize("mode", ["YCbCr", "LAB"])
def test_ycbcr_and_lab_tiff_decode_close_to_the_rgb_photo(photo, mode, tmp_path):
    path = tmp_path / f"{mode}.tif"
    path.write_bytes(_encode(photo.convert(mode), "TIFF"))
    with Image.open(path) as raw:
        assert raw.mode == mode
    assert np.abs(np.asarray(load_image(path)).astype(int) - np.asarray(photo)).mean() < 3


def test_hsv_converts_close_to_the_rgb_photo(photo):
    assert np.abs(np.asarray(to_rgb(photo.convert("HSV"), "x.hsv")).astype(int) - np.asarray(photo)).mean() < 2


def test_a_mode_pillow_cannot_convert_names_file_and_mode():
    with pytest.raises(ImageError, match=r"odd.tif: cannot convert image mode 'La' to RGB"):
        to_rgb(Image.new("La", (4, 4)), "odd.tif")


ORIENTATIONS = {  # EXIF orientation -> the transpose that displays the stored pixels upright
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _exif_jpeg(photo: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _encode(photo, "JPEG", quality=95, exif=exif.tobytes())


@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_exif_orientation_is_applied(photo, orientation):
    data = _exif_jpeg(photo, orientation)
    with Image.open(io.BytesIO(data)) as raw:
        stored = np.asarray(raw.convert("RGB")).astype(int)
    image = load_image_bytes(data, "rotated.jpg")
    assert image.size == ((600, 512) if orientation >= 5 else (512, 600))
    expected = np.asarray(Image.fromarray(stored.astype(np.uint8)).transpose(ORIENTATIONS[orientation]))
    assert np.array_equal(np.asarray(image), expected)
    assert original_size(image) == image.size and "original_size" not in image.info


def test_exif_orientation_6_shows_the_top_of_the_photo_on_the_right(photo):
    image = np.asarray(load_image_bytes(_exif_jpeg(photo, 6), "rotated.jpg")).astype(int)
    # ROTATE_270 turns the stored row 0 (top of the photo) into the last displayed column
    assert np.abs(image[:, -1] - np.asarray(photo)[0]).mean() < 6
    assert np.abs(image[:, 0] - np.asarray(photo)[0]).mean() > 20


def test_draft_size_downscales_jpeg_by_a_power_of_two_not_below_the_request(photo, tmp_path):
    path = tmp_path / "photo.jpg"
    path.write_bytes(_encode(photo, "JPEG", quality=95))
    full = load_image(path)
    assert full.size == (512, 600) and "original_size" not in full.info
    # (H, W) = (100, 120): 512 // 120 = 4, 600 // 100 = 6 -> 1/4 -> 128 x 150
    small = load_image(path, draft_size=(100, 120))
    assert small.size == (128, 150) and original_size(small) == (512, 600)
    reference = np.asarray(full.resize((128, 150), Image.BOX)).astype(int)
    assert np.abs(np.asarray(small).astype(int) - reference).mean() < 3
    # (300, 100): 600 // 300 = 2 -> 1/2 -> 256 x 300; a request as large as the image keeps it whole
    assert load_image(path, draft_size=(300, 100)).size == (256, 300)
    assert load_image(path, draft_size=(600, 512)).size == (512, 600)


def test_draft_size_is_taken_in_the_displayed_orientation(photo):
    data = _exif_jpeg(photo, 6)  # stored 512 x 600, displayed 600 x 512
    # displayed height 512 must stay >= 300: stored width 512 // 300 = 1 -> no downscaling
    whole = load_image_bytes(data, "r.jpg", draft_size=(300, 100))
    assert whole.size == (600, 512) and "original_size" not in whole.info
    # (100, 120): stored 512 // 100 = 5, 600 // 120 = 5 -> 1/4: stored 128 x 150, displayed 150 x 128
    small = load_image_bytes(data, "r.jpg", draft_size=(100, 120))
    assert small.size == (150, 128) and original_size(small) == (600, 512)


def test_draft_size_leaves_png_at_full_size(photo, tmp_path):
    path = tmp_path / "photo.png"
    path.write_bytes(_encode(photo, "PNG"))
    image = load_image(path, draft_size=(64, 64))
    assert image.size == (512, 600) and original_size(image) == (512, 600)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # pytest restores Pillow's own
def test_an_image_over_pillows_pixel_limit_is_named_in_the_warning(photo, tmp_path, monkeypatch, caplog):
    path = tmp_path / "huge.png"
    path.write_bytes(_encode(photo, "PNG"))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 512 * 600 - 1)  # just under the photo's size
    with caplog.at_level("WARNING", logger="finegrain.data.images"):
        assert load_image(path).size == (512, 600)
    assert f"{path}: 512x600 pixels, more than PIL.Image.MAX_IMAGE_PIXELS=307199 (a decompression bomb?)" in caplog.text
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 512 * 600 // 2 - 1)  # over twice the limit: refused, named
    with pytest.raises(ImageError, match=rf"{path}: cannot decode image \(DecompressionBombError"):
        load_image(path)

