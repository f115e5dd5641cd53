"""mm_utils: image loading/validation, any-res views, upstream token counts, tokenizer_image_token."""

import io
import logging
import os
import struct
import subprocess
import sys
import warnings
import zlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

import llava.mm_utils as mm_utils
from llava.constants import DEFAULT_GRID_PINPOINTS, IMAGE_TOKEN_INDEX
from llava.errors import ImageError
from llava.mm_utils import (
    anyres_token_count,
    divide_to_patches,
    get_anyres_image_grid_shape,
    image_to_tensor,
    load_image,
    process_anyres_image,
    resize_and_pad_image,
    select_best_resolution,
    tokenizer_image_token,
    unpad_bounds,
)

# ---------------------------------------------------------------------------------------------- grid and counts

# image (W, H): (grid (cols, rows), pooled kept Hk x Wk, pooled tokens, unpooled tokens),
# from upstream's spatial_unpad arithmetic
TABLE = {
    (500, 500): ((2, 2), (28, 28), 1008, 3699),
    (768, 768): ((2, 2), (28, 28), 1008, 3699),
    (1024, 1024): ((2, 2), (28, 28), 1008, 3699),
    (300, 300): ((1, 2), (14, 14), 406, 1513),
    (384, 384): ((1, 2), (14, 14), 406, 1513),
    (640, 480): ((2, 2), (22, 28), 834, 2929),
    (800, 600): ((2, 2), (22, 28), 834, 2929),
    (480, 640): ((2, 2), (28, 22), 840, 2943),
    (1280, 720): ((2, 2), (16, 28), 660, 2379),
    (1920, 1080): ((2, 2), (16, 28), 660, 2379),
    (1000, 500): ((2, 1), (14, 28), 602, 2214),
    (1200, 400): ((3, 1), (14, 42), 798, 2943),
    (2000, 600): ((3, 1), (12, 42), 712, 2779),
    (600, 2000): ((1, 3), (42, 12), 742, 2835),
}


@pytest.mark.shapes
@pytest.mark.parametrize(
    "size, best",
    [
        ((768, 768), (768, 768)),
        ((300, 300), (384, 768)),
        ((1000, 500), (768, 384)),
        ((1200, 400), (1152, 384)),
        ((600, 2000), (384, 1152)),
    ],
)
def test_select_best_resolution(size, best):
    assert select_best_resolution(size) == best


@pytest.mark.shapes
@pytest.mark.parametrize("size", list(TABLE))
def test_token_table(size):
    grid, (hk, wk), pooled, unpooled = TABLE[size]
    cols, rows = get_anyres_image_grid_shape(size)
    assert (cols, rows) == grid

    r0, r1, c0, c1 = unpad_bounds(size, rows * 14, cols * 14)
    assert (r1 - r0, c1 - c0) == (hk, wk)
    assert 14 * 14 + hk * (wk + 1) == pooled

    r0, r1, c0, c1 = unpad_bounds(size, rows * 27, cols * 27)
    assert 27 * 27 + (r1 - r0) * (c1 - c0 + 1) == unpooled

    assert anyres_token_count(size, pooled=True) == pooled
    assert anyres_token_count(size, pooled=False) == unpooled


@pytest.mark.shapes
def test_unpad_bounds_keeps_centre():
    # 640x480 on a 28x28 map: rescaled height 21, pad 3 each side -> rows [3, 25) (one more than 21)
    assert unpad_bounds((640, 480), 28, 28) == (3, 25, 0, 28)
    assert unpad_bounds((480, 640), 28, 28) == (0, 28, 3, 25)


# ---------------------------------------------------------------------------------------------- views


def test_resize_and_pad_black_centred():
    image = Image.new("RGB", (1000, 500), (255, 255, 255))
    canvas = resize_and_pad_image(image, (768, 768))
    assert canvas.size == (768, 768)
    pixels = np.asarray(canvas)
    # 1000x500 scaled by 0.768 -> 768x384, pasted at y = (768 - 384) // 2 = 192
    assert (pixels[:192] == 0).all() and (pixels[192 + 384 :] == 0).all()
    assert (pixels[192 : 192 + 384] == 255).all()


def test_divide_to_patches_row_major():
    image = Image.new("RGB", (768, 384))
    image.paste((255, 0, 0), (384, 0, 768, 384))
    patches = divide_to_patches(image, 384)
    assert [p.size for p in patches] == [(384, 384)] * 2
    assert np.asarray(patches[0]).max() == 0 and np.asarray(patches[1])[0, 0].tolist() == [255, 0, 0]


@pytest.mark.shapes
@pytest.mark.parametrize("size, views", [((768, 768), 5), ((300, 300), 3), ((1200, 400), 4)])
def test_process_anyres_image_shapes(size, views):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    pixels = process_anyres_image(image)
    assert pixels.shape == (views, 3, 384, 384) and pixels.dtype == torch.float32
    assert pixels.min() >= -1.0 and pixels.max() <= 1.0
    assert pixels.min() < -0.9 and pixels.max() > 0.9


def test_process_anyres_views_order():
    # white image: global view all white; tiles of the 1000x500 -> 768x384 canvas are fully covered (no black)
    image = Image.new("RGB", (1000, 500), (255, 255, 255))
    pixels = process_anyres_image(image)
    assert pixels.shape[0] == 3 and torch.allclose(pixels, torch.ones_like(pixels))
    # 300x300 on a 384x768 canvas: top and bottom tiles each hold half the black padding
    pixels = process_anyres_image(Image.new("RGB", (300, 300), (255, 255, 255)))
    assert pixels[1, :, 0].eq(-1).all() and pixels[2, :, -1].eq(-1).all()
    assert pixels[1, :, -1].eq(1).all() and pixels[2, :, 0].eq(1).all()


def test_image_to_tensor_normalisation():
    tensor = image_to_tensor(Image.new("RGB", (50, 20), (0, 255, 51)), size=384)
    assert tensor.shape == (3, 384, 384)
    assert torch.allclose(tensor[:, 0, 0], torch.tensor([-1.0, 1.0, 51 / 255 * 2 - 1]))


# ---------------------------------------------------------------------------------------------- load_image errors


def _noise(size=(64, 48), mode="RGB"):
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)


def _png_header_only(width, height):
    """A tiny PNG whose IHDR claims width x height (the pixel data is not there)."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def test_missing_file(tmp_path):
    with pytest.raises(ImageError, match="not found"):
        load_image(tmp_path / "nope.png")


def test_not_an_image(tmp_path):
    path = tmp_path / "junk.png"
    path.write_bytes(b"this is not an image at all" * 10)
    with pytest.raises(ImageError, match="not an image"):
        load_image(path)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated(tmp_path, fmt):
    buffer = io.BytesIO()
    _noise((128, 128)).save(buffer, fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ImageError, match="truncated"):
        load_image(path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.parametrize("size", [(13, 300), (300, 13)])
def test_too_small(tmp_path, size):
    path = tmp_path / "small.png"
    Image.new("RGB", size).save(path)
    with pytest.raises(ImageError, match=rf"image is {size[0]}x{size[1]} px; SigLIP needs at least 14 px per side"):
        load_image(path)
    with pytest.raises(ImageError, match="at least 14 px"):
        load_image(Image.new("RGB", size))


@pytest.mark.parametrize("side", [30000, 10001])  # above PIL's hard limit / between PIL's warning and ours
def test_decompression_bomb(tmp_path, side):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(side, side))
    with pytest.raises(ImageError, match="megapixel"):
        load_image(path)


def test_bomb_checked_before_decode(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(10001, 10001))
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("decoded a bomb"))
    with pytest.raises(ImageError, match="megapixel"):
        load_image(path)


# ---------------------------------------------------------------------------------------------- conversions


def _roundtrip(tmp_path, image, name="x.png", **save_kwargs):
    path = tmp_path / name
    image.save(path, **save_kwargs)
    loaded = load_image(path)
    assert loaded.mode == "RGB" and loaded.size == image.size
    return np.asarray(loaded)


@pytest.mark.parametrize("mode", ["L", "LA", "1", "RGBA", "P"])
def test_plain_modes_png(tmp_path, mode):
    image = _noise(mode=mode)
    assert image.mode == mode
    pixels = _roundtrip(tmp_path, image)
    assert np.array_equal(pixels, np.asarray(image.convert("RGB")))


def test_rgba_drops_alpha_like_upstream():
    image = Image.new("RGBA", (20, 20), (10, 20, 30, 0))
    assert np.asarray(load_image(image))[0, 0].tolist() == [10, 20, 30]


def test_palette_with_transparency(tmp_path):
    image = Image.new("P", (20, 20))
    image.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    image.info["transparency"] = bytes([0, 255])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "convert to RGBA first" warning leaks out
        assert np.asarray(load_image(image))[0, 0].tolist() == [255, 0, 0]
    image.info.pop("transparency")
    pixels = _roundtrip(tmp_path, image, "p.gif", transparency=0)  # GIF stores a transparent index
    assert pixels[0, 0].tolist() == [255, 0, 0]


def test_cmyk_and_ycbcr(tmp_path):
    rgb = _noise()
    assert _roundtrip(tmp_path, rgb.convert("CMYK"), "c.jpg").shape == (48, 64, 3)
    assert load_image(rgb.convert("YCbCr")).mode == "RGB"
    assert np.asarray(load_image(Image.new("CMYK", (20, 20), (0, 0, 0, 0))))[0, 0].tolist() == [255, 255, 255]


def test_sixteen_bit_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257 * 128, 65535] * 7] * 20, dtype=np.uint16)
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    pixels = _roundtrip(tmp_path, image, "g16.png")
    assert pixels[0, :3, 0].tolist() == [0, 128, 255]
    big_endian = Image.frombytes("I;16B", (21, 20), values.astype(">u2").tobytes())
    assert np.asarray(load_image(big_endian))[0, :3, 0].tolist() == [0, 128, 255]
    as_int32 = Image.fromarray(values.astype(np.int32))
    assert as_int32.mode == "I"
    assert np.asarray(load_image(as_int32))[0, :3, 0].tolist() == [0, 128, 255]


def test_float_image():
    image = Image.fromarray(np.array([[0.0, 0.5, 1.0] * 7] * 20, dtype=np.float32))
    assert image.mode == "F"
    assert np.asarray(load_image(image))[0, :3, 0].tolist() == [0, 128, 255]
    stretched = Image.fromarray(np.array([[-2.0, 0.0, 2.0] * 7] * 20, dtype=np.float32))
    assert np.asarray(load_image(stretched))[0, :3, 0].tolist() == [0, 128, 255]


def test_float_image_non_finite_pixels_are_left_out_of_the_range(caplog):
    """Decision: NaN/inf pixels are ignored when finding the range (one NaN no longer blackens the image), then
    drawn at its ends: NaN and -inf black, +inf white; a warning counts them."""
    rng = np.random.default_rng(0)
    clean = rng.random((40, 40)).astype(np.float32)  # in [0, 1): scaled by 255
    dirty = clean.copy()
    dirty[0, 0], dirty[0, 1], dirty[0, 2] = np.nan, np.inf, -np.inf
    with caplog.at_level(logging.WARNING, logger="llava"):
        got = np.asarray(load_image(Image.fromarray(dirty)))
    want = np.asarray(load_image(Image.fromarray(clean)))
    assert np.array_equal(got[1:], want[1:]) and np.array_equal(got[0, 3:], want[0, 3:])
    assert got[0, :3, 0].tolist() == [0, 255, 0]
    assert any("3 non-finite" in r.getMessage() for r in caplog.records)
    # min-max stretched range: also taken from the finite pixels only
    stretched = np.array([[-2.0, 0.0, 2.0, np.nan, np.inf] * 4] * 20, dtype=np.float32)
    assert np.asarray(load_image(Image.fromarray(stretched)))[0, :5, 0].tolist() == [0, 128, 255, 0, 255]


@pytest.mark.parametrize("fill", [np.nan, np.inf])
def test_float_image_without_a_finite_pixel_is_refused(fill):
    with pytest.raises(ImageError, match="no finite pixel"):
        load_image(Image.fromarray(np.full((20, 20), fill, dtype=np.float32)))


def _old_whole_image_conversion(image):
    """The conversion as one float64 pass over the whole image (before it went by bands of rows)."""
    values = np.asarray(image).astype(np.float64)
    if image.mode.startswith("I;16") or (image.mode == "I" and values.min() >= 0 and values.max() <= 65535):
        scaled = values / 65535.0
    elif image.mode == "F" and values.min() >= 0.0 and values.max() <= 1.0:
        scaled = values
    else:
        low, high = values.min(), values.max()
        scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
    return np.clip(np.rint(scaled * 255.0), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("make", [
    lambda a: Image.fromarray(a.astype(np.uint16)),  # I;16, every 16-bit value
    lambda a: Image.fromarray(a.astype(np.int32)),  # I within [0, 65535]
    lambda a: Image.fromarray(a.astype(np.int32) * 3 - 70000),  # I stretched
    lambda a: Image.fromarray((a / 65535.0).astype(np.float32)),  # F in [0, 1]
    lambda a: Image.fromarray((a * 0.37 - 9).astype(np.float32)),  # F stretched
    lambda a: Image.fromarray(np.full(a.shape, 7.5, dtype=np.float32)),  # F constant
], ids=["I;16", "I", "I-stretched", "F", "F-stretched", "F-constant"])
def test_banded_conversion_is_bit_identical_to_one_pass(monkeypatch, make):
    image = make(np.arange(65536).reshape(256, 256))
    monkeypatch.setattr(mm_utils, "_CONVERT_CHUNK_PIXELS", 1000)  # many bands, the last one partial
    rgb = np.asarray(load_image(image))
    old = _old_whole_image_conversion(image)
    assert rgb.shape == (256, 256, 3) and all(np.array_equal(rgb[..., c], old) for c in range(3))


def test_decoded_byte_limit_counts_bit_depth(tmp_path, monkeypatch):
    monkeypatch.setattr(mm_utils, "MAX_IMAGE_BYTES", 1_000_000)
    gray8, gray16 = tmp_path / "g8.png", tmp_path / "g16.png"
    Image.new("L", (800, 800)).save(gray8)  # 0.64 MB decoded
    Image.fromarray(np.zeros((800, 800), dtype=np.uint16)).save(gray16)  # 1.28 MB decoded
    assert load_image(gray8).size == (800, 800)
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("decoded past the byte limit"))
    with pytest.raises(ImageError, match=r"mode I;16 decodes to 1 MB, over the 1 MB limit"):
        load_image(gray16)


def _png16_gray(path, width, height):
    """A 16-bit grayscale PNG written row by row (sparse bright dots), without holding the image in memory."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\0" + (b"\x9c\x40" + b"\0" * 14) * (width // 8)
    packer = zlib.compressobj(1)
    pixels = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", pixels) + chunk(b"IEND", b""))
    return path


_PEAK_RSS_SCRIPT = """
import resource, sys
from llava.mm_utils import load_image
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
image = load_image(sys.argv[1])
print(image.mode, image.size[0], image.size[1], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss is in KiB on Linux")
def test_100_megapixel_16_bit_png_peak_memory(tmp_path):
    """The 100 MP limit image in 16 bits (a 1.6 MB file) loads within 2x PIL's decoded RGB image (4 bytes a
    pixel). The whole-image float64 conversion used to peak at ~3.2 GB over the baseline; banded: ~0.7 GB."""
    width = height = 10_000
    path = _png16_gray(tmp_path / "big16.png", width, height)
    out = subprocess.run([sys.executable, "-c", _PEAK_RSS_SCRIPT, str(path)], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert out.returncode == 0, out.stderr
    mode, w, h, peak_kib = out.stdout.split()
    assert (mode, int(w), int(h)) == ("RGB", width, height)
    rgb_bytes = 4 * width * height
    assert int(peak_kib) * 1024 < 2 * rgb_bytes, f"peak {int(peak_kib) / 1024:.0f} MiB over the baseline"


def test_multiframe_uses_first_frame(tmp_path):
    frames = [Image.new("RGB", (20, 20), colour) for colour in [(255, 0, 0), (0, 0, 255)]]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    assert np.asarray(load_image(path))[0, 0].tolist() == [255, 0, 0]


def test_accepts_pil_and_str(tmp_path):
    image = _noise()
    path = tmp_path / "n.png"
    image.save(path)
    assert np.array_equal(np.asarray(load_image(str(path))), np.asarray(image))
    assert load_image(image) is image  # already RGB: no copy


# ---------------------------------------------------------------------------------------------- tokenizer


class FakeTokenizer:
    """Whitespace tokenizer: word -> fixed id; '<s>' is BOS and '\\n' is its own token. Adds no specials."""

    bos_token_id = 1

    def __init__(self):
        self.vocab = {"<s>": 1, "\n": 2}

    def __call__(self, text, add_special_tokens=True):
        ids = []
        for piece in text.replace("\n", " \n ").split(" "):
            if piece:
                ids.append(self.vocab.setdefault(piece, len(self.vocab) + 1))
        return SimpleNamespace(input_ids=ids)


def test_tokenizer_image_token_with_bos_drops_first_token_after_image():
    tok = FakeTokenizer()
    ids = tokenizer_image_token("<s> user <image>\nwhat is it? <image>\nand this", tok)
    words = tok("<s> user").input_ids
    question = tok("what is it?").input_ids
    tail = tok("and this").input_ids
    # the "\n" after each <image> is the dropped first token of its chunk
    assert ids == words + [IMAGE_TOKEN_INDEX] + question + [IMAGE_TOKEN_INDEX] + tail
    assert ids[0] == tok.bos_token_id and ids.count(IMAGE_TOKEN_INDEX) == 2


def test_tokenizer_image_token_without_bos_keeps_everything():
    tok = FakeTokenizer()
    ids = tokenizer_image_token("user <image>\nhi", tok, return_tensors="pt")
    expected = tok("user").input_ids + [IMAGE_TOKEN_INDEX] + tok("\nhi").input_ids
    assert ids.dtype == torch.long and ids.tolist() == expected
    assert tokenizer_image_token("no image here", tok) == tok("no image here").input_ids


def test_tokenizer_image_token_custom_index_and_leading_image():
    tok = FakeTokenizer()
    assert tokenizer_image_token("<image>\nhi", tok, image_token_index=-7) == [-7, *tok("\nhi").input_ids]


class BosAddingTokenizer(FakeTokenizer):
    """Like FakeTokenizer, but its post-processor prepends BOS unless add_special_tokens=False."""

    def __call__(self, text, add_special_tokens=True):
        ids = super().__call__(text).input_ids
        return SimpleNamespace(input_ids=([self.bos_token_id] + ids) if add_special_tokens else ids)


def test_tokenizer_image_token_uses_default_special_tokens_like_upstream():
    """Upstream tokenises each chunk with the tokenizer's defaults. If the tokenizer adds BOS itself,
    the prompt starts with a doubled BOS and the dropped first token of the later chunk is that BOS, so the
    newline after <image> is kept."""
    tok = BosAddingTokenizer()
    ids = tokenizer_image_token("<s> user <image>\nhi", tok)
    bos, user, newline, hi = 1, tok.vocab["user"], tok.vocab["\n"], tok.vocab["hi"]
    assert ids == [bos, bos, user, IMAGE_TOKEN_INDEX, newline, hi]


# ---- parity with transformers (the library LaViDa's upstream preprocessing goes through) ----------------------
def test_resize_normalise_matches_transformers_siglip_processor():
    """The hand-written SigLIP preprocessing is bit-identical to transformers' SigLIP image processor
    (bicubic resize to 384², rescale 1/255, mean/std 0.5) on odd sizes, aspects and modes."""
    from llava.model.builder import siglip_image_processor

    processor = siglip_image_processor(384)
    rng = np.random.default_rng(7)
    for w, h, mode in [(700, 500, "RGB"), (384, 384, "RGB"), (33, 1000, "RGB"), (1500, 90, "L"), (640, 480, "RGBA")]:
        channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
        arr = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
        image = Image.fromarray(arr[..., 0] if channels == 1 else arr, mode).convert("RGB")
        ours = image_to_tensor(image, 384)
        theirs = processor(image, return_tensors="pt")["pixel_values"][0]
        assert torch.equal(ours, theirs), (w, h, mode)


def test_best_resolution_matches_transformers():
    """Same grid as transformers' `select_best_resolution` (which takes (height, width) pairs)."""
    from transformers.image_processing_utils import select_best_resolution as hf_select

    pinpoints_hw = [(h, w) for w, h in DEFAULT_GRID_PINPOINTS]
    sizes = [(w, h) for w in (14, 100, 383, 384, 385, 640, 767, 768, 1000, 1152, 2000, 4000)
             for h in (14, 90, 384, 480, 768, 1151, 1152, 3000)]
    for w, h in sizes:
        hh, ww = hf_select((h, w), pinpoints_hw)
        assert select_best_resolution((w, h), DEFAULT_GRID_PINPOINTS) == (ww, hh), (w, h)
