"""SHIRG views: a 384² global view of the whole image and one 448² foveal view.

Boxes are (left, top, right, bottom) in original image pixels, right/bottom exclusive. The
global view stretches the whole image to a square, so global-grid cell (r, c) covers image
pixels [c·W/g, (c+1)·W/g) × [r·H/g, (r+1)·H/g).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from PIL import Image

from llava.constants import FOVEA_GRID, FOVEA_SIZE
from llava.errors import InputError
from llava.mm_utils import image_to_tensor

FOVEA_MODES = ("center", "saliency")


def check_fovea_mode(mode: str) -> None:
    if mode not in FOVEA_MODES:
        raise InputError(f"unknown --fovea {mode!r}; valid: {', '.join(FOVEA_MODES)}")


def _round(x: float) -> int:
    """Half-up rounding: Python's round() is half-to-even, which makes boxes jump oddly."""
    return int(math.floor(x + 0.5))


def _best_window(pooled: torch.Tensor) -> tuple[int, int]:
    """Argmax of a 2-D map, ties broken deterministically: among equally good positions take
    the one nearest their mean (a single hot cell ends up centred, a flat map picks the middle),
    then the lowest raster index."""
    rows, cols = torch.nonzero(pooled == pooled.max(), as_tuple=True)
    dist = (rows - rows.double().mean()) ** 2 + (cols - cols.double().mean()) ** 2
    i = torch.sort(dist, stable=True).indices[0]
    return int(rows[i]), int(cols[i])


def _offset(pos: int, positions: int, slack: int) -> int:
    """Window position 0..positions-1 → pixel offset 0..slack, linearly. Mapping the ends onto the
    ends means whole-cell rounding of the footprint never leaves an edge window short of the border."""
    return _round(pos / (positions - 1) * slack) if positions > 1 else slack // 2


def _saliency_box(image_size: tuple[int, int], saliency: torch.Tensor, fovea_size: int) -> tuple[int, int, int, int]:
    """Place the native fovea window where the global-view scores, averaged over its footprint, peak."""
    w, h = image_size
    sal = saliency.double()
    if sal.dim() == 1:
        g = math.isqrt(sal.numel())
        sal = sal.reshape(g, g) if g * g == sal.numel() else sal
    if sal.dim() != 2 or sal.shape[0] != sal.shape[1]:
        raise ValueError(f"saliency must be a square score map, got shape {tuple(saliency.shape)}")
    if not torch.isfinite(sal).all():
        raise ValueError("saliency map has non-finite values")
    g = sal.shape[0]
    # footprint of the fovea window in global-grid cells; only windows fully inside are candidates
    kw = min(g, max(1, _round(fovea_size / w * g)))
    kh = min(g, max(1, _round(fovea_size / h * g)))
    pooled = F.avg_pool2d(sal[None, None], (kh, kw), stride=1)[0, 0]
    r, c = _best_window(pooled)
    left = _offset(c, pooled.shape[1], w - fovea_size)
    top = _offset(r, pooled.shape[0], h - fovea_size)
    return left, top, left + fovea_size, top + fovea_size


def fovea_box(
    image_size: tuple[int, int],
    mode: str = "center",
    saliency: Optional[torch.Tensor] = None,
    fovea_size: int = FOVEA_SIZE,
) -> tuple[int, int, int, int]:
    """Where the fovea looks, in original pixels. A native-resolution window needs both sides
    ≥ fovea_size; smaller images have no extra detail to gain, so the fovea is the whole image."""
    check_fovea_mode(mode)
    w, h = image_size
    if min(w, h) < fovea_size:
        return 0, 0, w, h
    if mode == "center":
        left, top = (w - fovea_size) // 2, (h - fovea_size) // 2
        return left, top, left + fovea_size, top + fovea_size
    if saliency is None:
        raise InputError("fovea mode 'saliency' needs the global view's score map")
    return _saliency_box(image_size, saliency, fovea_size)


def fovea_view(image: Image.Image, box: tuple[int, int, int, int], fovea_size: int = FOVEA_SIZE) -> Image.Image:
    """Crop the box and bring it to fovea_size² (a no-op resize for a native window)."""
    left, top, right, bottom = box
    if not (0 <= left < right <= image.width and 0 <= top < bottom <= image.height):
        raise ValueError(f"fovea box {box} is empty or outside the {image.width}x{image.height} image")
    crop = image.crop(box)
    if crop.size != (fovea_size, fovea_size):
        crop = crop.resize((fovea_size, fovea_size), Image.BICUBIC)
    return crop


def to_pixel_values(image: Image.Image, size: int) -> torch.Tensor:
    """PIL → [1, 3, size, size] SigLIP input (the same preprocessing as LaViDa's views). The whole
    image squashed to 384² this way is SHIRG's global view, exactly LaViDa's."""
    return image_to_tensor(image, size).unsqueeze(0)


def box_to_token_rects(box: tuple[int, int, int, int], grid: int = FOVEA_GRID) -> torch.Tensor:
    """[grid², 4] (left, top, right, bottom) image-pixel rectangle of each fovea token, raster
    order. The fovea view maps the box linearly onto the token grid, so this is exact."""
    left, top, right, bottom = box
    xs = torch.linspace(left, right, grid + 1, dtype=torch.float64)
    ys = torch.linspace(top, bottom, grid + 1, dtype=torch.float64)
    rr, cc = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    rr, cc = rr.flatten(), cc.flatten()
    return torch.stack([xs[cc], ys[rr], xs[cc + 1], ys[rr + 1]], dim=-1)
