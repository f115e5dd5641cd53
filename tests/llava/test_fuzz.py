"""Fuzzing `load_image` and config loading with hypothesis: whatever the bytes or the JSON values, the only
exceptions that may escape are the project's own (`llava.errors.LavidaError` and its subclasses), which the
CLI turns into one `error:` line; anything else would be a traceback.

The number of examples comes from a hypothesis profile chosen by LAVIDA_FUZZ: "quick" (default, `make test`,
a few seconds, the same examples every run) or "long" (`make fuzz`, random examples, minutes).
"""
import io
import json
import os
import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from llava.errors import LavidaError
from llava.mm_utils import MIN_IMAGE_SIDE, load_image
from llava.model.builder import read_config
from llava.model.language_model.llava_llada import LlavaLLaDAConfig

settings.register_profile("quick", max_examples=25, deadline=None, derandomize=True, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=5000, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
PROFILE = settings.get_profile(os.environ.get("LAVIDA_FUZZ", "quick"))


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """One folder for every example of a test (hypothesis runs many examples per test call)."""
    return tmp_path_factory.mktemp("fuzz")


def check_loads_or_refuses(path):
    """load_image gives an RGB image of a usable size, or raises one of the project's errors."""
    try:
        image = load_image(path)
    except LavidaError:
        return
    assert image.mode == "RGB" and min(image.size) >= MIN_IMAGE_SIDE


# ---- images -------------------------------------------------------------------------------------------------
def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _seed_images() -> dict:
    """Small valid files of the formats and modes load_image converts differently, to mutate."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8))
    images = {
        "png-rgb": (rgb, "PNG"), "png-l": (rgb.convert("L"), "PNG"), "png-p": (rgb.convert("P"), "PNG"),
        "png-rgba": (rgb.convert("RGBA"), "PNG"),
        "png-16": (Image.fromarray((rng.integers(0, 65536, (20, 24))).astype(np.uint16)), "PNG"),
        "tiff-float": (Image.fromarray(rng.random((20, 24), dtype=np.float32), mode="F"), "TIFF"),
        "jpeg": (rgb, "JPEG"), "bmp": (rgb, "BMP"), "gif": (rgb.convert("P"), "GIF"),
    }
    out = {}
    for name, (image, fmt) in images.items():
        buf = io.BytesIO()
        image.save(buf, format=fmt)
        out[name] = buf.getvalue()
    return out


SEEDS = _seed_images()


@PROFILE
@given(data=st.binary(max_size=2048))
def test_random_bytes(scratch, data):
    path = scratch / "random.bin"
    path.write_bytes(data)
    check_loads_or_refuses(path)


@PROFILE
@given(seed=st.sampled_from(sorted(SEEDS)),
       edits=st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)), max_size=8),
       keep=st.one_of(st.none(), st.floats(0, 1)))
def test_mutated_files(scratch, seed, edits, keep):
    """A valid small file with a few bytes overwritten and maybe cut short."""
    data = bytearray(SEEDS[seed])
    for at, value in edits:
        data[at % len(data)] = value
    if keep is not None:
        data = data[: int(len(data) * keep)]
    path = scratch / f"mutated-{seed}"
    path.write_bytes(bytes(data))
    check_loads_or_refuses(path)


@PROFILE
@given(width=st.integers(0, 2**32 - 1), height=st.integers(0, 2**32 - 1),
       depth=st.sampled_from([0, 1, 2, 4, 8, 16, 3, 255]), colour=st.sampled_from([0, 2, 3, 4, 6, 1, 7]),
       interlace=st.integers(0, 2), idat=st.binary(max_size=256), compress=st.booleans())
def test_png_headers(scratch, width, height, depth, colour, interlace, idat, compress):
    """PNGs whose IHDR (correct CRC, so PIL trusts it) claims any size, depth and colour type over random data.
    Claimed sizes are kept to at most 4 MP so a header that passes the checks cannot make the test slow."""
    assume(width * height <= 4_000_000 or width * height > 100_000_000)
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, interlace)
    body = zlib.compress(idat) if compress else idat
    data = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", body) + _png_chunk(b"IEND", b"")
    path = scratch / "header.png"
    path.write_bytes(data)
    check_loads_or_refuses(path)


# ---- config.json --------------------------------------------------------------------------------------------
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@pytest.fixture(scope="module")
def base_config(small_checkpoint):
    return json.loads((small_checkpoint / "config.json").read_text())


def check_config_loads_or_refuses(folder, raw):
    """What load_pretrained_model does with config.json before touching the weights."""
    (folder / "config.json").write_text(json.dumps(raw))
    try:
        LlavaLLaDAConfig.from_dict(read_config(folder))
    except LavidaError:
        return


def _paths(config, prefix=()):
    """Every key path of the config, nested ones (vision_config.*, pinpoint entries) included."""
    for key, value in config.items():
        yield prefix + (key,)
        if isinstance(value, dict):
            yield from _paths(value, prefix + (key,))
        elif isinstance(value, list):
            for i, item in enumerate(value):
                yield prefix + (key, i)
                if isinstance(item, list):
                    yield from (prefix + (key, i, j) for j in range(len(item)))


@PROFILE
@given(data=st.data())
def test_config_values(scratch, base_config, data):
    """The small model's config with a few values replaced by random JSON values, or removed."""
    raw = json.loads(json.dumps(base_config))
    paths = sorted(_paths(raw), key=str)
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(paths))
        parent = raw
        try:
            for part in path[:-1]:
                parent = parent[part]
            if data.draw(st.booleans()) and isinstance(parent, dict):
                parent.pop(path[-1], None)
            else:
                parent[path[-1]] = data.draw(JSON_VALUES)
        except (KeyError, IndexError, TypeError):  # an earlier edit replaced a parent
            continue
    check_config_loads_or_refuses(scratch, raw)


@PROFILE
@given(value=JSON_VALUES)
def test_config_file_of_any_json(scratch, value):
    check_config_loads_or_refuses(scratch, value)


@PROFILE
@given(data=st.binary(max_size=512))
def test_config_file_of_any_bytes(scratch, data):
    (scratch / "config.json").write_bytes(data)
    try:
        read_config(scratch)
    except LavidaError:
        pass

