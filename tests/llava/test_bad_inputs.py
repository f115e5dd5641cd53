"""Bad input, one table: every case runs the CLI in-process (`llava.eval.run.main`, through the `run_cli` fixture) and
must end with exit code 2, nothing on stdout, exactly one stderr line `error: ...` naming the culprit (the file,
the flag or the config key), no Python warning (in a terminal it would be another stderr line), and no file
written or removed.

Kinds of case, by name prefix: image/ (what --image points at), flag/ (command-line values; those in EARLY must
also be refused before the image is read or the model loads), checkpoint/ and config/ (damaged copies of a
folder written by `save_pretrained`, the damages of tests/llava/model/damage.py, given as --model-path).
"""
import io
import re
import shutil
import struct
import sys
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from llava.errors import ConfigError
from tests.llava.model.damage import BAD_FOLDERS, edit_config, tree

FAST = ("--model-path", "builtin:lavida-small", "--gen-length", "8", "--steps", "4")
lit = re.escape


class Scene:
    """What a case builds its argv from, all inside the test's tmp folder."""

    def __init__(self, tmp, checkpoint):
        self.tmp, self._checkpoint = tmp, checkpoint

    def image(self, w=64, h=64, name="ok.png"):
        rng = np.random.default_rng(0)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(self.tmp / name)
        return self.tmp / name

    def file(self, name, data: bytes):
        (self.tmp / name).write_bytes(data)
        return self.tmp / name

    def encoded(self, name, fmt, keep=None, image=None, **save):
        """`image` (default: 64x64 noise) saved as `fmt`, cut to its first `keep` bytes (a fraction or a count)."""
        buf = io.BytesIO()
        (image if image is not None else Image.open(self.image(name="src.png"))).save(buf, format=fmt, **save)
        (self.tmp / "src.png").unlink(missing_ok=True)
        data = buf.getvalue()
        cut = len(data) if keep is None else int(len(data) * keep) if isinstance(keep, float) else keep
        return self.file(name, data[:cut])

    def checkpoint(self, damage=None):
        folder = shutil.copytree(self._checkpoint, self.tmp / "ck")
        if damage is not None:
            damage(folder)
        return folder


def png_header_only(w, h):
    """A PNG whose IHDR claims w x h pixels and that has no pixel data at all."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


def _garbled_idat(s):
    """A PNG whose compressed pixel data is overwritten (CRCs not checked by PIL's decoder): a corrupt stream."""
    path = s.encoded("g.png", "PNG")
    data = bytearray(path.read_bytes())
    at = data.index(b"IDAT") + 8
    data[at:at + 64] = bytes(range(64))
    return s.file("g.png", bytes(data))


def _nan_float_tiff(s):
    return s.encoded("nan.tif", "TIFF", image=Image.fromarray(np.full((32, 32), np.nan, dtype=np.float32), mode="F"))


IMAGE = {
    "image/missing": (lambda s: ["--image", s.tmp / "nope.png"], r"image file not found: .*nope\.png$"),
    "image/a folder": (lambda s: ["--image", s.tmp], r"not a file: "),
    "image/not an image": (lambda s: ["--image", s.file("x.png", b"this is not an image at all")],
                           r"not an image or unsupported format: .*x\.png$"),
    "image/empty file": (lambda s: ["--image", s.file("e.png", b"")], r"not an image or unsupported format: .*e\.png"),
    "image/truncated png": (lambda s: ["--image", s.encoded("t.png", "PNG", keep=0.5)],
                            r"cannot decode .*t\.png: file is truncated$"),
    # PIL says "Truncated File Read" here (was reported as "corrupt image data")
    "image/jpeg cut after 10 bytes": (lambda s: ["--image", s.encoded("c.jpg", "JPEG", keep=10)],
                                      r"cannot decode .*c\.jpg: file is truncated$"),
    # PIL also warns "Truncated File Read" / "Corrupt EXIF data" while parsing it: held back, one line only
    "image/tiff cut in its header": (lambda s: ["--image", s.encoded("t.tif", "TIFF", keep=100)],
                                     r"not an image or unsupported format: .*t\.tif$"),
    "image/garbled png data": (lambda s: ["--image", _garbled_idat(s)], r"cannot decode .*g\.png: corrupt image data"),
    "image/10x10": (lambda s: ["--image", s.image(10, 10, "s.png")],
                    r"s\.png: image is 10x10 px; SigLIP needs at least 14 px per side"),
    "image/header-only bomb": (lambda s: ["--image", s.file("bomb.png", png_header_only(40000, 40000))],
                               r"bomb\.png: image exceeds 100 megapixels"),
    "image/float with no finite pixel": (lambda s: ["--image", _nan_float_tiff(s)], r"nan\.tif.*no finite"),
}


def _with_image(*argv):
    return lambda s: ["--image", s.image(), *argv]


FLAGS = {
    "flag/empty question for pool": (_with_image("--question", "  ", "--prune_method", "pool"),
                                     lit("--question is empty")),
    "flag/unknown method": (_with_image("--prune_method", "magic"), lit("unknown --prune_method 'magic'")),
    "flag/gen not divisible by block": (_with_image("--gen-length", "10", "--block-length", "4"),
                                        lit("--gen-length 10 is not divisible by --block-length 4")),
    "flag/block length 0": (_with_image("--block-length", "0"), "must be positive"),
    "flag/keep ratio 0": (lambda s: ["--image", s.image(), "--prune_method", "shirg", "--keep_ratio", "0",
                                     "--save_heatmap", s.tmp / "h.png"], "keep ratio"),
    "flag/keep ratio 1.5": (_with_image("--prune_method", "shirg", "--keep_ratio", "1.5"), "keep ratio"),
    "flag/keep ratio nan": (_with_image("--prune_method", "shirg", "--keep_ratio", "nan"), "keep ratio"),
    "flag/fovea nowhere": (lambda s: ["--image", s.image(), "--prune_method", "shirg", "--fovea", "nowhere",
                                      "--save_heatmap", s.tmp / "h.png"], lit("unknown --fovea 'nowhere'")),
    "flag/bad score mode": (_with_image("--prune_method", "shirg", "--shirg_score", "best"), "--shirg_score"),
    "flag/heatmap bad suffix": (lambda s: ["--image", s.image(), "--prune_method", "shirg",
                                           "--save_heatmap", s.tmp / "h.xyz"], "not supported"),
    "flag/heatmap with pool": (lambda s: ["--image", s.image(), "--prune_method", "pool",
                                          "--save_heatmap", s.tmp / "h.png"], "--save_heatmap is not supported"),
    "flag/budget 0": (_with_image("--prune_method", "random", "--budget", "0"), "--budget must be at least 1"),
    "flag/budget 99999": (_with_image("--prune_method", "random", "--budget", "99999"),
                          lit("--budget 99999 must be between 1 and the")),
    # the default budget is clamped to a small image's candidates; an explicit one is not
    "flag/budget 980 on a 10000x200 image": (
        lambda s: ["--image", s.image(10000, 200, "wide.png"), "--prune_method", "random", "--budget", "980"],
        lit("--budget 980 must be between 1 and the 810 candidate tokens of this image")),
    "flag/budget with pool": (_with_image("--prune_method", "pool", "--budget", "500"), "--budget only applies"),
    "flag/keep ratio with pool": (_with_image("--prune_method", "pool", "--keep_ratio", "0.5"),
                                  "--keep_ratio only applies"),
    "flag/steps not dividing blocks": (_with_image("--gen-length", "8", "--block-length", "4", "--steps", "3"),
                                       lit("--steps 3")),
    "flag/no-pool with pool": (_with_image("--prune_method", "pool", "--no-pool"), "pooling on"),
    "flag/pool with shirg": (_with_image("--prune_method", "shirg", "--pool"), "never pools"),
    "flag/model path missing": (_with_image("--model-path", "/nonexistent"), "'/nonexistent' does not exist"),
    "flag/unknown device": (_with_image("--device", "toaster"), "unknown --device 'toaster'"),
}
# Argument errors that must be caught before the image is read or the model loads (also tested that way below).
EARLY = {
    "flag/temperature nan": (["--temperature", "nan"], "--temperature must be a finite number >= 0, got nan"),
    "flag/temperature inf": (["--temperature", "inf"], "--temperature must be a finite number >= 0, got inf"),
    "flag/temperature negative": (["--temperature", "-1"], "--temperature must be a finite number >= 0"),
    "flag/shift inf": (["--schedule", "shift", "--shift", "inf"], "--shift must be a positive finite number, got inf"),
    "flag/shift nan": (["--schedule", "shift", "--shift", "nan"], "--shift must be a positive finite number"),
    "flag/shift without a schedule": (["--shift", "2"], "--shift only applies to --schedule shift (the schedule "
                                                        "is none); add --schedule shift or drop --shift"),
    "flag/shift with cosine": (["--schedule", "cosine", "--shift", "2"], "(the schedule is cosine)"),
    "flag/schedule empty": (["--schedule", ""], "unknown --schedule ''; choose one of: none (the even split"),
    "flag/schedule unknown": (["--schedule", "exponential"], "unknown --schedule 'exponential'"),
    "flag/unknown remasking": (["--remasking", "loudest"], "unknown remasking 'loudest'"),
    "flag/gen length not a multiple of the default block": (
        ["--gen-length", "200"], "--gen-length 200 is not a multiple of the default block length 128 (no "
                                 "--block-length was given); give a --block-length that divides it (e.g. "
                                 "--block-length 100)"),
    "flag/question not utf-8": (["--question", "what \udcff is"],  # how Python hands over argv byte 0xff
                                "--question is not valid UTF-8 text (byte 0xff at position 5)"),
    "flag/seed above int64": (["--seed", "99999999999999999999999"], "--seed 99999999999999999999999 is out of range"),
    "flag/seed below int64": (["--seed", str(-(2**63) - 1)], "out of range; use an integer in [-9223372036854775808"),
    "flag/device meta": (["--device", "meta"], "unsupported --device 'meta' (a meta device)"),
    # argparse's own errors: one line instead of the usage block
    "flag/gen length abc": (["--gen-length", "abc"], "argument --gen-length: invalid int value: 'abc'"),
    "flag/unknown flag": (["--colour", "red"], "unrecognized arguments: --colour red"),
    "flag/pool and no-pool": (["--pool", "--no-pool"], "argument --no-pool: not allowed with argument --pool"),
}
FLAGS.update({name: (_with_image(*argv), lit(message)) for name, (argv, message) in EARLY.items()})


def _max_length_300(folder):
    edit_config(folder, lambda c: c.update(tokenizer_model_max_length=300))


CHECKPOINTS = {
    f"{'config' if error is ConfigError else 'checkpoint'}/{name}":
        (lambda s, damage=damage: ["--image", s.image(), "--model-path", s.checkpoint(damage)], pattern)
    for name, (damage, error, pattern) in BAD_FOLDERS.items()
}
CHECKPOINTS["config/max length cutting into the image"] = (
    lambda s: ["--image", s.image(768, 768), "--model-path", s.checkpoint(_max_length_300), "--json"],
    lit("(1008 of them visual) but the config's tokenizer_model_max_length is 300"))

CASES = {**IMAGE, **FLAGS, **CHECKPOINTS}


def assert_one_error_line(code, out, err, pattern):
    assert code == 2 and out == "", (code, out, err)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert re.search(pattern, lines[0]), lines[0]


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_error_line(run_cli, small_checkpoint, tmp_path, case):
    make, pattern = CASES[case]
    argv = make(Scene(tmp_path, small_checkpoint))
    before = tree(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # what a terminal would show: not the deprecation kinds
        for quiet in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.simplefilter("ignore", quiet)
        code, out, err = run_cli(*FAST, *argv)  # later flags win, so a case can override FAST
    assert_one_error_line(code, out, err, pattern)
    assert [f"{w.category.__name__}: {w.message}" for w in caught] == []
    assert tree(tmp_path) == before  # no heat-map, no temp file, nothing removed


@pytest.mark.parametrize("case", list(EARLY))
def test_argument_errors_come_before_the_image_and_the_model(run_cli, monkeypatch, case):
    import llava.eval.run as run

    monkeypatch.setattr(run, "load_pretrained_model", lambda *a, **k: pytest.fail("loaded the model"))
    monkeypatch.setattr(run, "load_image", lambda *a, **k: pytest.fail("read the image"))
    argv, message = EARLY[case]
    assert_one_error_line(*run_cli(*FAST, *argv), lit(message))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs POSIX file-size limits (RLIMIT_FSIZE)")
def test_heatmap_write_failure_is_one_error_line(run_cli, tmp_path):
    """`ulimit -f 20`: the heat-map PNG hits the file-size limit mid-write (EFBIG; Python ignores SIGXFSZ)."""
    import resource

    dest = tmp_path / "heat.png"
    image = Scene(tmp_path, None).image(640, 480, "i.png")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20 * 1024, hard))
    try:
        code, out, err = run_cli(*FAST, "--image", image, "--prune_method", "shirg", "--save_heatmap", dest)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert_one_error_line(code, out, err, lit(f"error: cannot write heat-map {dest}: ") + ".*File too large")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["i.png"]  # no partial heat-map, no temp file


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_one_error_line(run_cli, tmp_path):
    code, out, err = run_cli(*FAST, "--image", Scene(tmp_path, None).image(), "--device", "cuda")
    assert_one_error_line(code, out, err, lit("--device cuda was asked for but CUDA is not available"))
