import pytest
import torch
from PIL import Image

from llava.errors import InputError
from shirg_patches.foveal import box_to_token_rects, fovea_box, fovea_view, to_pixel_values


def test_center_box():
    assert fovea_box((1000, 800)) == (276, 176, 724, 624)
    assert fovea_box((448, 448)) == (0, 0, 448, 448)


@pytest.mark.parametrize("size", [(300, 300), (14, 4000), (4000, 14), (447, 2000)])
@pytest.mark.parametrize("mode", ["center", "saliency"])
def test_small_images_use_whole_image(size, mode):
    assert fovea_box(size, mode=mode) == (0, 0, *size)


def _hot(r, c, g=27):
    sal = torch.zeros(g, g)
    sal[r, c] = 1.0
    return sal


def test_saliency_centres_on_off_centre_hot_spot():
    w, h = 2000, 1600
    r, c = 5, 20
    left, top, right, bottom = fovea_box((w, h), "saliency", _hot(r, c))
    assert (right - left, bottom - top) == (448, 448)
    hx, hy = (c + 0.5) * w / 27, (r + 0.5) * h / 27  # hot cell centre in pixels
    assert left <= hx < right and top <= hy < bottom
    assert abs((left + right) / 2 - hx) <= w / 27 and abs((top + bottom) / 2 - hy) <= h / 27
    assert (left, top, right, bottom) != fovea_box((w, h), "center")


@pytest.mark.parametrize("cell,expect",
                         [((0, 0), (0, 0)), ((26, 26), (2000 - 448, 1600 - 448)), ((26, 0), (0, 1600 - 448))])
def test_saliency_clamps_at_borders(cell, expect):
    left, top, right, bottom = fovea_box((2000, 1600), "saliency", _hot(*cell))
    assert (left, top) == expect and (right, bottom) == (expect[0] + 448, expect[1] + 448)


def test_saliency_flat_map_is_centre_and_flat_input_accepted():
    box = fovea_box((2000, 1600), "saliency", torch.ones(27, 27))
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    assert abs(cx - 1000) <= 2000 / 27 and abs(cy - 800) <= 1600 / 27
    flat = fovea_box((2000, 1600), "saliency", _hot(5, 20).flatten())
    assert flat == fovea_box((2000, 1600), "saliency", _hot(5, 20))


def test_fovea_box_errors():
    with pytest.raises(InputError, match="center, saliency"):
        fovea_box((1000, 1000), mode="corner")
    with pytest.raises(InputError, match="saliency"):
        fovea_box((1000, 1000), mode="saliency")


@pytest.mark.shapes
@pytest.mark.parametrize("size", [(1000, 800), (300, 200), (14, 4000), (4000, 14)])
def test_views_have_fixed_size(size):
    img = Image.new("RGB", size, (10, 20, 30))
    assert fovea_view(img, fovea_box(size)).size == (448, 448)
    assert to_pixel_values(img, 384).shape == (1, 3, 384, 384)  # the global view


def test_native_fovea_is_an_unscaled_crop():
    g = torch.Generator().manual_seed(0)
    arr = (torch.rand(800, 1000, 3, generator=g) * 255).to(torch.uint8).numpy()
    img = Image.fromarray(arr)
    box = fovea_box(img.size)
    assert fovea_view(img, box).tobytes() == img.crop(box).tobytes()


@pytest.mark.shapes
def test_to_pixel_values():
    white = to_pixel_values(Image.new("RGB", (50, 70), (255, 255, 255)), 384)
    assert white.shape == (1, 3, 384, 384) and white.dtype == torch.float32
    assert torch.allclose(white, torch.ones_like(white))
    black = to_pixel_values(Image.new("L", (448, 448), 0), 448)
    assert black.shape == (1, 3, 448, 448) and torch.allclose(black, -torch.ones_like(black))


def test_box_to_token_rects():
    rects = box_to_token_rects((100, 50, 548, 498), grid=32)
    assert rects.shape == (1024, 4)
    assert rects[0].tolist() == [100, 50, 114, 64]
    assert rects[33].tolist() == [114, 64, 128, 78]  # row 1, col 1
    assert rects[-1].tolist() == [534, 484, 548, 498]
