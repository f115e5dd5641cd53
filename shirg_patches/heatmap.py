"""Picture of what SHIRG kept: the whole image, the fovea box, dropped fovea tokens shaded dark.

Uses matplotlib's Figure + Agg canvas directly (never pyplot), so it neither needs a display
nor changes the global backend for anyone else in the process.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PolyCollection
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image

from llava.constants import FOVEA_GRID
from llava.errors import InputError
from llava.utils import atomic_file
from shirg_patches.foveal import box_to_token_rects
from shirg_patches.scoring import minmax

DISPLAY_MAX_SIDE = 1024  # drawing a 10k-pixel image at full size buys nothing but time
DROPPED_RGBA = (0.0, 0.0, 0.0, 0.65)
SCORE_ALPHA = 0.35


def _token_colors(kept_mask: torch.Tensor, scores: Optional[torch.Tensor]) -> np.ndarray:
    """RGBA per token: dropped dark, kept clear or tinted by normalised score."""
    colors = np.zeros((kept_mask.numel(), 4))
    if scores is not None:
        colors = colormaps["viridis"](minmax(scores).numpy())
        colors[:, 3] = SCORE_ALPHA
    colors[~kept_mask.numpy()] = DROPPED_RGBA
    return colors


def _draw(image: Image.Image, box, kept_indices: torch.Tensor, scores, title: Optional[str], grid: int) -> Figure:
    w, h = image.size
    n = grid * grid
    # the model's tensors may live on the GPU or carry grad; drawing needs plain CPU values
    kept = torch.as_tensor(kept_indices, dtype=torch.long).detach().cpu().flatten()
    scores = None if scores is None else torch.as_tensor(scores).detach().cpu().flatten()
    if kept.numel() and (kept.min() < 0 or kept.max() >= n):
        raise ValueError(f"kept indices must be in [0, {n})")
    if scores is not None and scores.numel() != n:
        raise ValueError(f"scores has {scores.numel()} entries, the fovea grid has {n}")
    mask = torch.zeros(n, dtype=torch.bool)
    mask[kept] = True

    shown = image.convert("RGB")
    shown.thumbnail((DISPLAY_MAX_SIDE, DISPLAY_MAX_SIDE))
    fig_w = 8.0
    fig = Figure(figsize=(fig_w, min(max(fig_w * h / w, 2.0), 16.0)), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.imshow(np.asarray(shown), extent=(0, w, h, 0), interpolation="bilinear")

    rects = box_to_token_rects(box, grid).numpy()
    verts = np.stack([rects[:, [0, 1]], rects[:, [2, 1]], rects[:, [2, 3]], rects[:, [0, 3]]], axis=1)
    ax.add_collection(PolyCollection(verts, facecolors=_token_colors(mask, scores), edgecolors="none"))
    left, top, right, bottom = box
    ax.add_patch(Rectangle((left, top), right - left, bottom - top, fill=False, edgecolor="red", linewidth=1.5))
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_axis_off()
    counts = f"kept {int(mask.sum())}/{n} fovea tokens"
    ax.set_title(f"{title} — {counts}" if title else counts)
    fig.tight_layout()
    return fig


def check_heatmap_path(path) -> str:
    """Validate a heat-map destination without touching the disk; returns the image format.
    The CLI calls this before loading the model so a bad path fails fast."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"heat-map path {path} is a directory")
    fmt = path.suffix.lstrip(".").lower() or "png"
    if fmt not in FigureCanvasAgg.get_supported_filetypes():
        raise InputError(f"heat-map format {fmt!r} is not supported; use .png")
    return fmt


def save_heatmap(
    path,
    image: Image.Image,
    fovea_box: tuple[int, int, int, int],
    kept_indices: torch.Tensor,
    scores: Optional[torch.Tensor] = None,
    title: Optional[str] = None,
    grid: int = FOVEA_GRID,
) -> Path:
    """Write the picture to `path` (format from the suffix, PNG by default). Written to a temp
    file in the same folder and renamed, so a failure never leaves a half-written image."""
    path = Path(path)
    fmt = check_heatmap_path(path)
    fig = _draw(image, fovea_box, kept_indices, scores, title, grid)
    try:
        with atomic_file(path) as fh:
            fig.savefig(fh, format=fmt)
    except OSError as e:
        raise InputError(f"cannot write heat-map {path}: {e}") from e
    return path
