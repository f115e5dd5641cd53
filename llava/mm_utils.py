"""Image loading and validation, LaViDa's any-res views, token-count arithmetic and `tokenizer_image_token`.

Everything here is pure PIL/numpy/torch so the token counts of the model can be asserted without running it.
Sizes are (width, height) like PIL unless a name says rows/cols.
"""

import math
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageMode, UnidentifiedImageError

from llava.constants import (
    DEFAULT_GRID_PINPOINTS,
    DEFAULT_IMAGE_TOKEN,
    IMAGE_TOKEN_INDEX,
    SIGLIP_IMAGE_SIZE,
    SIGLIP_MEAN,
    SIGLIP_PATCH_SIZE,
    SIGLIP_STD,
)
from llava.errors import ImageError
from llava.utils import logger

# Our own decompression-bomb limits, checked from the header before any pixel is decoded: pixels, and bytes of
# the decoded image as PIL stores it (`_decoded_bytes`), so a high-bit-depth or multi-band mode is bounded too.
MAX_IMAGE_PIXELS = 100_000_000
MAX_IMAGE_BYTES = 400_000_000  # 100 MP at PIL's widest storage (4 bytes a pixel: RGB(A), CMYK, I, F)
# 16-bit / 32-bit / float images are converted this many pixels at a time, so the conversion's float64
# intermediates stay a few MB whatever the image size (peak ≈ decoded image + the 8-bit gray + the RGB result).
_CONVERT_CHUNK_PIXELS = 1 << 20
# A side shorter than one SigLIP patch would leave a view with no image content at all.
MIN_IMAGE_SIDE = SIGLIP_PATCH_SIZE

# Exceptions PIL decoders raise on damaged pixel data (zlib.error comes straight from PNG inflate).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, zlib.error)


# ----------------------------------------------------------------------------------------------------------------
# Loading


def load_image(source: str | Path | Image.Image) -> Image.Image:
    """Open, validate and fully decode an image; return it as 8-bit RGB.

    Validation happens on the header (size limits) before decoding, then the whole file is decoded so that
    truncation surfaces here as an ImageError rather than later inside the model. PIL's global state
    (`LOAD_TRUNCATED_IMAGES`, `MAX_IMAGE_PIXELS`) is left untouched.

    Upstream parity notes: EXIF orientation is NOT applied (upstream feeds the stored pixel grid), RGBA/LA are
    converted by dropping alpha (plain `.convert("RGB")`, no compositing on white), and multi-frame files
    (GIF, APNG, TIFF) use their first frame.
    """
    if isinstance(source, Image.Image):
        _check_size(source.size, "image", source.mode)
        try:
            source.load()
        except _DECODE_ERRORS as e:
            raise ImageError(f"cannot decode image: {_decode_reason(e)}") from None
        return _to_rgb(source)

    path = Path(source)
    if not path.exists():
        raise ImageError(f"image file not found: {path}")
    if not path.is_file():
        raise ImageError(f"not a file: {path}")
    # PIL's warnings while parsing (e.g. "Corrupt EXIF data", "Truncated File Read" from a damaged TIFF) are held
    # back: after an error they would be extra stderr lines saying the same thing; on success they are re-issued.
    with warnings.catch_warnings(record=True) as caught:
        # PIL warns above its own limit (~89 MP); ours (checked below) is the one that decides.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as image:
                _check_size(image.size, str(path), image.mode)
                image.load()
                try:
                    rgb = _to_rgb(image)
                except ImageError as e:
                    raise ImageError(f"{path}: {e}") from None
        except Image.DecompressionBombError:
            raise ImageError(f"{path}: image exceeds {MAX_IMAGE_PIXELS // 1_000_000} megapixels") from None
        except UnidentifiedImageError:
            raise ImageError(f"not an image or unsupported format: {path}") from None
        except _DECODE_ERRORS as e:
            raise ImageError(f"cannot decode {path}: {_decode_reason(e)}") from None
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return rgb


def _decoded_bytes(size: tuple[int, int], mode: str) -> int:
    """Bytes PIL allocates for the decoded image: one sample per pixel for single-band modes (1/L/P: 1, I;16: 2,
    I/F: 4), 4 bytes a pixel for every multi-band 8-bit mode (PIL pads RGB, LA, YCbCr, ... to 32 bits)."""
    try:
        info = ImageMode.getmode(mode)
        itemsize, bands = np.dtype(info.typestr).itemsize, len(info.bands)
    except (KeyError, TypeError):
        itemsize, bands = 4, 1  # unknown mode: assume the widest storage
    return size[0] * size[1] * (itemsize if bands == 1 else max(4, itemsize * bands))


def _check_size(size: tuple[int, int], name: str, mode: str = "RGB") -> None:
    """Reject bombs (by pixels and by decoded bytes) and images too small for one SigLIP patch; header only."""
    width, height = size
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageError(
            f"{name}: image is {width}x{height} px, over the {MAX_IMAGE_PIXELS // 1_000_000} megapixel limit"
        )
    decoded = _decoded_bytes(size, mode)
    if decoded > MAX_IMAGE_BYTES:
        raise ImageError(
            f"{name}: {width}x{height} px of mode {mode} decodes to {decoded / 1e6:.0f} MB, over the "
            f"{MAX_IMAGE_BYTES / 1e6:.0f} MB limit"
        )
    if min(width, height) < MIN_IMAGE_SIDE:
        raise ImageError(f"{name}: image is {width}x{height} px; SigLIP needs at least {MIN_IMAGE_SIDE} px per side")


def _decode_reason(error: Exception) -> str:
    # PIL spells it several ways: "image file is truncated", "Truncated File Read", "truncated PNG chunk"
    return "file is truncated" if "truncated" in str(error).lower() else f"corrupt image data ({error})"


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB, rescaling high-bit-depth samples instead of clipping them.

    PIL's own convert clips 16-bit and float samples to 255, which turns most 16-bit scans into white.
    Rules: `I;16*` samples are 16-bit (divide by 65535); `I` (32-bit int) is treated as a 16-bit container when
    its values fit in [0, 65535], else min-max stretched; `F` in [0, 1] is multiplied by 255, else min-max
    stretched. Non-finite `F` samples are ignored when finding the range, then drawn as its ends: NaN and -inf
    black, +inf white (with a warning); a float image with no finite sample is an ImageError. Every other mode
    (1, L, LA, P incl. transparency, PA, RGBA, CMYK, YCbCr, …) goes through `.convert("RGB")`, which drops
    alpha like upstream.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I") or mode == "F":
        return Image.fromarray(_high_depth_to_gray(image), mode="L").convert("RGB")
    if mode == "P" and "transparency" in image.info:
        # Same pixels as P→RGB, minus PIL's "convert to RGBA first" warning for byte transparency.
        return image.convert("RGBA").convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError:
        raise ImageError(f"unsupported image mode {mode!r}") from None


def _row_chunks(image: Image.Image):
    """(top, bottom, samples as float64) over bands of rows of about `_CONVERT_CHUNK_PIXELS` pixels each."""
    width, height = image.size
    step = max(1, _CONVERT_CHUNK_PIXELS // width)
    for top in range(0, height, step):
        bottom = min(height, top + step)
        yield top, bottom, np.asarray(image.crop((0, top, width, bottom))).astype(np.float64)


def _high_depth_to_gray(image: Image.Image) -> np.ndarray:
    """8-bit gray [H, W] of an `I*` / `F` image by `_to_rgb`'s rules, a band of rows at a time (same arithmetic
    as one whole-image pass; only the range needs a first pass)."""
    mode = image.mode
    low = high = None  # None: samples are already in [0, 1] after dividing by `divisor`
    divisor = 65535.0
    if not mode.startswith("I;16"):
        low, high, non_finite = math.inf, -math.inf, 0
        for _, _, values in _row_chunks(image):
            finite = np.isfinite(values)
            if not finite.all():
                non_finite += values.size - int(finite.sum())
                values = values[finite]
            if values.size:
                low, high = min(low, float(values.min())), max(high, float(values.max()))
        if low > high:
            raise ImageError("float image has no finite pixel value (all NaN or infinite)")
        if non_finite:
            logger.warning("image has %d non-finite pixel value(s): NaN and -inf drawn black, +inf white", non_finite)
        if mode == "I" and low >= 0 and high <= 65535:
            low = high = None
        elif mode == "F" and low >= 0.0 and high <= 1.0:
            low = high = None
            divisor = 1.0
    width, height = image.size
    gray = np.empty((height, width), dtype=np.uint8)
    for top, bottom, values in _row_chunks(image):
        if low is None:
            scaled = values / divisor if divisor != 1.0 else values
            if mode == "F":
                scaled = np.nan_to_num(scaled, nan=0.0, posinf=1.0, neginf=0.0)
        elif high > low:
            values = np.nan_to_num(values, nan=low, posinf=high, neginf=low)
            scaled = (values - low) / (high - low)
        else:
            scaled = np.zeros_like(values)
        gray[top:bottom] = np.clip(np.rint(scaled * 255.0), 0, 255).astype(np.uint8)
    return gray


# ----------------------------------------------------------------------------------------------------------------
# Any-res views (LaViDa `anyres`: one distorted global view + tiles of the best-fitting grid)


def image_to_tensor(image: Image.Image, size: int = SIGLIP_IMAGE_SIZE) -> torch.Tensor:
    """SigLIP preprocessing: bicubic resize to exactly size×size (aspect not kept), /255, normalise → [3,size,size]."""
    resized = _to_rgb(image).resize((size, size), Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(SIGLIP_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(SIGLIP_STD, dtype=torch.float32).view(3, 1, 1)
    return (pixels - mean) / std


def select_best_resolution(
    original_size: tuple[int, int], pinpoints=DEFAULT_GRID_PINPOINTS
) -> tuple[int, int]:
    """Pick the canvas (w, h) that keeps the most original pixels, then wastes the least canvas.

    Effective pixels are capped at the original count, so upscaling earns nothing; exact ties keep the first.
    """
    width, height = original_size
    best, best_effective, best_waste = None, -1, math.inf
    for canvas_w, canvas_h in pinpoints:
        scale = min(canvas_w / width, canvas_h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        waste = canvas_w * canvas_h - effective
        if effective > best_effective or (effective == best_effective and waste < best_waste):
            best, best_effective, best_waste = (canvas_w, canvas_h), effective, waste
    return best


def resize_and_pad_image(image: Image.Image, target_resolution: tuple[int, int]) -> Image.Image:
    """Fit the image inside the target keeping aspect, centred on a black canvas (LaViDa pads with 0, not mean)."""
    target_w, target_h = target_resolution
    width, height = image.size
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        new_w, new_h = target_w, min(math.ceil(height * scale_w), target_h)
    else:
        new_w, new_h = min(math.ceil(width * scale_h), target_w), target_h
    resized = _to_rgb(image).resize((new_w, new_h), Image.Resampling.BICUBIC)
    canvas = Image.new("RGB", (target_w, target_h), (0, 0, 0))
    canvas.paste(resized, ((target_w - new_w) // 2, (target_h - new_h) // 2))
    return canvas


def divide_to_patches(image: Image.Image, patch_size: int = SIGLIP_IMAGE_SIZE) -> list[Image.Image]:
    """Cut into patch_size squares, row-major (top row left→right first)."""
    width, height = image.size
    return [
        image.crop((left, top, left + patch_size, top + patch_size))
        for top in range(0, height, patch_size)
        for left in range(0, width, patch_size)
    ]


def get_anyres_image_grid_shape(
    image_size: tuple[int, int], pinpoints=DEFAULT_GRID_PINPOINTS, patch_size: int = SIGLIP_IMAGE_SIZE
) -> tuple[int, int]:
    """(cols, rows) of tiles chosen for an image of size (W, H)."""
    canvas_w, canvas_h = select_best_resolution(image_size, pinpoints)
    return canvas_w // patch_size, canvas_h // patch_size


def process_anyres_image(
    image: Image.Image, pinpoints=DEFAULT_GRID_PINPOINTS, patch_size: int = SIGLIP_IMAGE_SIZE
) -> torch.Tensor:
    """All views of one image as [V, 3, patch_size, patch_size]: global view first, then tiles row-major.

    The global view is a plain distorting resize of the whole image: the published checkpoints were trained that
    way (upstream's pad-to-square switch was never active in training).
    """
    canvas = resize_and_pad_image(image, select_best_resolution(image.size, pinpoints))
    views = [image, *divide_to_patches(canvas, patch_size)]
    return torch.stack([image_to_tensor(view, patch_size) for view in views])


# ----------------------------------------------------------------------------------------------------------------
# Token-count arithmetic of the `spatial_unpad` merge


def unpad_bounds(image_size: tuple[int, int], grid_rows: int, grid_cols: int) -> tuple[int, int, int, int]:
    """Rows/cols of the Hf×Wf tile-token map that cover the original image: (row_start, row_end, col_start, col_end).

    Reproduces upstream exactly, float rounding included: the padded side keeps [pad, size − pad), which can be
    one token more than the rescaled size when the padding is odd.
    """
    width, height = image_size
    if width / height > grid_cols / grid_rows:
        new_h = int(height * (grid_cols / width))
        pad = (grid_rows - new_h) // 2
        return pad, grid_rows - pad, 0, grid_cols
    new_w = int(width * (grid_rows / height))
    pad = (grid_cols - new_w) // 2
    return 0, grid_rows, pad, grid_cols - pad


def anyres_token_count(
    image_size: tuple[int, int], pooled: bool, pinpoints=DEFAULT_GRID_PINPOINTS, patch_size: int = SIGLIP_IMAGE_SIZE
) -> int:
    """Image tokens LaViDa produces for one any-res image: base view n² + kept grid rows × (cols + newline).

    n = 27 tokens per view side unpooled, ceil(27/2) = 14 after the bilinear 2× pool.
    """
    side = patch_size // SIGLIP_PATCH_SIZE
    if pooled:
        side = math.ceil(side / 2)
    cols, rows = get_anyres_image_grid_shape(image_size, pinpoints, patch_size)
    row_start, row_end, col_start, col_end = unpad_bounds(image_size, rows * side, cols * side)
    return side * side + (row_end - row_start) * (col_end - col_start + 1)


# ----------------------------------------------------------------------------------------------------------------
# Prompt tokenisation


def tokenizer_image_token(prompt: str, tokenizer, image_token_index: int = IMAGE_TOKEN_INDEX, return_tensors=None):
    """Tokenise a prompt with `<image>` placeholders replaced by `image_token_index`.

    Chunks between placeholders are tokenised separately with the tokenizer's default special-token handling,
    exactly as upstream calls it (LLaDA's tokenizer is expected to add none; BOS then comes from the chat template
    text). If a tokenizer's post-processor does prepend BOS, this reproduces upstream's doubled BOS and kept newline.
    Upstream quirk, reproduced on purpose because the published numbers depend on it: when the first
    chunk starts with BOS, the first token of EVERY chunk after an `<image>` is dropped — with the standard prompt
    that is the newline following `<image>`.
    """
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split(DEFAULT_IMAGE_TOKEN)]
    bos = getattr(tokenizer, "bos_token_id", None)
    starts_with_bos = bos is not None and len(chunks[0]) > 0 and chunks[0][0] == bos
    input_ids = list(chunks[0])
    for chunk in chunks[1:]:
        input_ids.append(image_token_index)
        input_ids.extend(chunk[1:] if starts_with_bos else chunk)
    if return_tensors is None:
        return input_ids
    if return_tensors == "pt":
        return torch.tensor(input_ids, dtype=torch.long)
    raise ValueError(f"unsupported return_tensors {return_tensors!r}; use None or 'pt'")


def inference_ids(tokenizer, question: str, prompt_text: str | None = None, with_image: bool = True):
    """(prompt ids, question ids) for one answer: the `llada` inference prompt around `prompt_text` (default the
    question itself; callers add their answer-format suffix there) tokenised with `tokenizer_image_token`, and the
    bare question's ids, which text-relevance methods (SHIRG) score against; None when there is no question."""
    from llava.conversation import build_prompt

    prompt = build_prompt(question if prompt_text is None else prompt_text, with_image=with_image)
    qids = tokenizer(question, add_special_tokens=False).input_ids if question else None
    return tokenizer_image_token(prompt, tokenizer), qids
