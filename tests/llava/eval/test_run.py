"""The CLI end to end (`llava.eval.run.main`) on the built-in small model.

The model is the session `small_model`, handed to the CLI through `build_small_model` so no
test pays for a rebuild. `main` configures logging itself; `cli` lets it write to the captured
stderr exactly as it would in a terminal, so "one line on stderr" is really checked.
"""
import json
import shutil
import struct
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

FAST = ("--gen-length", "8", "--steps", "4")
STAGES = {"preprocess", "vision", "projector", "prefill", "steps"}


@pytest.fixture
def cli(run_cli):
    return run_cli


def noise(path, w, h, mode="RGB", seed=0, fmt=None):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode).save(path, format=fmt)
    return path


def png_header_only(w, h):
    """A PNG whose IHDR claims w x h pixels and that has no pixel data at all."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def visual_tokens(out):
    line = next(x for x in out.splitlines() if x.startswith("visual tokens:"))
    return int(line.split()[2])


# ---- token counts and the report ---------------------------------------------------------------
@pytest.mark.parametrize("method, count", [("pool", 1008), ("full", 3699)])
def test_lavida_counts_for_square_hd_image(cli, tmp_path, method, count):
    img = noise(tmp_path / "sq.png", 768, 768)
    code, out, err = cli("--image", img, "--prune_method", method, *FAST)
    assert code == 0 and err == ""
    assert f"visual tokens: {count}  (method {method}" in out
    assert "image 768x768" in out and "4 diffusion steps" in out


@pytest.mark.parametrize("method, count, selection",
                         [("pool", 1008, False), ("shirg", 980, True), ("stride", 980, True)])
def test_json_report(cli, tmp_path, method, count, selection):
    img = noise(tmp_path / "sq.png", 768, 768)
    code, out, _ = cli("--image", img, "--prune_method", method, "--json", *FAST)
    assert code == 0
    r = json.loads(out)
    assert isinstance(r["answer"], str) and len(r["answer"]) <= 8 * 8
    assert r["visual_tokens"] == count and r["prune_method"] == method
    assert r["steps"] == 4 and r["nfe"] == 5  # prefill + 4 steps
    stages = set(r["timings_ms"])
    assert STAGES <= stages and ("selection" in stages) == selection
    assert all(v >= 0 for v in r["timings_ms"].values())


@pytest.mark.parametrize("mode, fmt", [("L", "PNG"), ("RGBA", "PNG"), ("P", "PNG"), ("CMYK", "JPEG"), ("I;16", "PNG")])
def test_image_modes_are_converted(cli, tmp_path, mode, fmt):
    path = tmp_path / f"img.{fmt.lower()}"
    if mode == "I;16":
        ramp = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16)
        Image.fromarray(ramp).save(path)
    else:
        noise(path, 64, 48, mode=mode, fmt=fmt)
    with Image.open(path) as im:
        assert im.mode.startswith(mode.split(";")[0])  # the file really is in that mode
    code, out, err = cli("--image", path, "--prune_method", "pool", *FAST)
    assert code == 0, err
    assert visual_tokens(out) > 0 and ("image 64x48" in out or "image 64x64" in out)


# ---- bad input: exit 2, exactly one `error:` line, nothing written -------------------------------
def _img(tmp):
    return noise(tmp / "ok.png", 64, 64)


def _write(name, data):
    def make(tmp):
        (tmp / name).write_bytes(data(tmp) if callable(data) else data)
        return tmp / name
    return make


def _truncated(tmp):
    noise(tmp / "full.png", 200, 200)
    data = (tmp / "full.png").read_bytes()
    (tmp / "full.png").unlink()
    return data[: len(data) // 2]


BAD = {
    "missing image": (lambda t: ["--image", t / "nope.png"], "not found"),
    "corrupt bytes": (lambda t: ["--image", _write("x.png", b"this is not an image at all")(t)], "not an image"),
    "truncated png": (lambda t: ["--image", _write("t.png", _truncated)(t)], "cannot decode"),
    "10x10 image": (lambda t: ["--image", noise(t / "s.png", 10, 10)], "at least 14"),
    "header-only bomb": (lambda t: ["--image", _write("bomb.png", png_header_only(40000, 40000))(t)], "megapixel"),
    "empty question for pool": (lambda t: ["--image", _img(t), "--question", "  ", "--prune_method", "pool"],
                                "question is empty"),
    "unknown method": (lambda t: ["--image", _img(t), "--prune_method", "magic"], "unknown --prune_method 'magic'"),
    "gen not divisible by block": (lambda t: ["--image", _img(t), "--gen-length", "10", "--block-length", "4"],
                                   "not divisible"),
    "block length 0": (lambda t: ["--image", _img(t), "--gen-length", "8", "--block-length", "0"], "must be positive"),
    "keep ratio 0": (lambda t: ["--image", _img(t), "--prune_method", "shirg", "--keep_ratio", "0",
                                "--save_heatmap", t / "h.png"], "keep ratio"),
    "keep ratio 1.5": (lambda t: ["--image", _img(t), "--prune_method", "shirg", "--keep_ratio", "1.5",
                                  "--save_heatmap", t / "h.png"], "keep ratio"),
    "keep ratio nan": (lambda t: ["--image", _img(t), "--prune_method", "shirg", "--keep_ratio", "nan",
                                  "--save_heatmap", t / "h.png"], "keep ratio"),
    "fovea nowhere": (lambda t: ["--image", _img(t), "--prune_method", "shirg", "--fovea", "nowhere",
                                 "--save_heatmap", t / "h.png"], "unknown --fovea 'nowhere'"),
    "bad score mode": (lambda t: ["--image", _img(t), "--prune_method", "shirg", "--shirg_score", "best"],
                       "--shirg_score"),
    "heatmap bad suffix": (lambda t: ["--image", _img(t), "--prune_method", "shirg", "--save_heatmap", t / "h.xyz"],
                           "not supported"),
    "budget 0": (lambda t: ["--image", _img(t), "--prune_method", "random", "--budget", "0"], "at least 1"),
    "budget 99999": (lambda t: ["--image", _img(t), "--prune_method", "random", "--budget", "99999"], "--budget 99999"),
    "budget with pool": (lambda t: ["--image", _img(t), "--prune_method", "pool", "--budget", "500"],
                         "--budget only applies"),
    "keep ratio with pool": (lambda t: ["--image", _img(t), "--prune_method", "pool", "--keep_ratio", "0.5"],
                             "--keep_ratio only applies"),
    "heatmap with pool": (lambda t: ["--image", _img(t), "--prune_method", "pool", "--save_heatmap", t / "h.png"],
                          "--save_heatmap is not supported"),
    "steps not dividing blocks": (lambda t: ["--image", _img(t), "--gen-length", "8", "--block-length", "4",
                                             "--steps", "3"], "--steps 3"),
    "no-pool with pool": (lambda t: ["--image", _img(t), "--prune_method", "pool", "--no-pool"], "pooling on"),
    "pool with shirg": (lambda t: ["--image", _img(t), "--prune_method", "shirg", "--pool"], "never pools"),
    "model path missing": (lambda t: ["--image", _img(t), "--model-path", "/nonexistent"], "does not exist"),
    "unknown device": (lambda t: ["--image", _img(t), "--device", "toaster"], "unknown --device"),
}
# Argument errors that must be caught before the image is read or the model loads (tested both ways below).
EARLY = {
    "temperature nan": (["--temperature", "nan"], "--temperature must be a finite number >= 0, got nan"),
    "temperature inf": (["--temperature", "inf"], "--temperature must be a finite number >= 0, got inf"),
    "temperature negative": (["--temperature", "-1"], "--temperature must be a finite number >= 0"),
    "shift inf": (["--schedule", "shift", "--shift", "inf"], "--shift must be a positive finite number, got inf"),
    "shift nan": (["--schedule", "shift", "--shift", "nan"], "--shift must be a positive finite number"),
    "unknown remasking": (["--remasking", "loudest"], "unknown remasking 'loudest'"),
    "question not utf-8": (["--question", "what \udcff is"],  # how Python hands over argv byte 0xff
                           "--question is not valid UTF-8 text (byte 0xff at position 5)"),
    "seed above int64": (["--seed", "99999999999999999999999"], "--seed 99999999999999999999999 is out of range"),
    "seed below int64": (["--seed", str(-(2**63) - 1)], "is out of range; use an integer in [-9223372036854775808"),
    "device meta": (["--device", "meta"], "unsupported --device 'meta' (a meta device)"),
}
BAD.update({name: (lambda t, argv=argv: ["--image", _img(t), *argv], message)
            for name, (argv, message) in EARLY.items()})


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_error_line(cli, tmp_path, case):
    make_argv, message = BAD[case]
    argv = make_argv(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    code, out, err = cli(*FAST, *argv)  # later flags win, so a case can override FAST
    assert code == 2
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and message in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no heat-map, no temp file


@pytest.mark.parametrize("case", list(EARLY))
def test_argument_errors_come_before_the_image_and_the_model(cli, monkeypatch, case):
    import llava.eval.run as run

    monkeypatch.setattr(run, "load_pretrained_model", lambda *a, **k: pytest.fail("loaded the model"))
    monkeypatch.setattr(run, "load_image", lambda *a, **k: pytest.fail("read the image"))
    argv, message = EARLY[case]
    code, out, err = cli(*FAST, *argv)
    assert code == 2 and out == "" and err.startswith("error: ") and message in err and len(err.splitlines()) == 1


def _edited_checkpoint(small_checkpoint, tmp_path, key, value):
    folder = shutil.copytree(small_checkpoint, tmp_path / "ck")
    cfg = json.loads((folder / "config.json").read_text())
    cfg[key] = value
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.mark.parametrize("key, value, message", [
    ("tokenizer_model_max_length", 0, "'tokenizer_model_max_length' must be a positive integer, got 0"),
    ("tokenizer_model_max_length", 300, "(1008 of them visual) but the config's tokenizer_model_max_length is 300"),
    ("rope_theta", "abc", "config key 'rope_theta' must be a positive number, got 'abc'"),
    ("image_grid_pinpoints", [[384]], "config key 'image_grid_pinpoints' must be a non-empty list"),
])
def test_bad_checkpoint_config_values_are_one_error_line(cli, small_checkpoint, tmp_path, key, value, message):
    folder = _edited_checkpoint(small_checkpoint, tmp_path, key, value)
    image = noise(tmp_path / "sq.png", 768, 768)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    code, out, err = cli(*FAST, "--image", image, "--model-path", folder, "--json")
    assert code == 2 and out == "" and "Traceback" not in err
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and message in err, err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs POSIX file-size limits (RLIMIT_FSIZE)")
def test_heatmap_write_failure_is_one_error_line(cli, tmp_path):
    """`ulimit -f 20`: the heat-map PNG hits the file-size limit mid-write (EFBIG; Python ignores SIGXFSZ)."""
    import resource

    dest = tmp_path / "heat.png"
    image = noise(tmp_path / "i.png", 640, 480)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20 * 1024, hard))
    try:
        code, out, err = cli(*FAST, "--image", image, "--prune_method", "shirg", "--save_heatmap", dest)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert code == 2 and out == ""
    assert err.startswith(f"error: cannot write heat-map {dest}: ") and "File too large" in err, err
    assert len(err.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["i.png"]  # no partial heat-map, no temp file


def test_empty_question_shirg_proceeds_and_says_so(cli, tmp_path):
    code, out, _ = cli("--image", _img(tmp_path), "--question", "", "--prune_method", "shirg", *FAST)
    assert code == 0
    assert visual_tokens(out) == 980
    assert "shirg_note: no question" in out


# ---- SHIRG through the CLI -------------------------------------------------------------------------
@pytest.mark.parametrize("size", [(14, 14), (4000, 14), (600, 2000), (768, 768)])
def test_shirg_always_980(cli, tmp_path, size):
    code, out, _ = cli("--image", noise(tmp_path / "i.png", *size), "--prune_method", "shirg", *FAST)
    assert code == 0 and visual_tokens(out) == 980


@pytest.mark.parametrize("ratio, total", [("0.40", 666), ("0.766", 1040), ("0.80", 1075)])
def test_shirg_keep_ratio(cli, tmp_path, ratio, total):
    code, out, _ = cli("--image", _img(tmp_path), "--prune_method", "shirg", "--keep_ratio", ratio, "--json", *FAST)
    r = json.loads(out)
    assert code == 0 and r["visual_tokens"] == total and r["notes"]["global_tokens"] == 256


def test_shirg_saliency_fovea(cli, tmp_path):
    code, out, _ = cli("--image", noise(tmp_path / "w.png", 1280, 720), "--prune_method", "shirg",
                       "--fovea", "saliency", *FAST)
    assert code == 0 and visual_tokens(out) == 980 and "fovea: saliency" in out


@pytest.mark.parametrize("score", ["attn", "sim", "v1", "v2", "random"])
def test_shirg_score_modes(cli, tmp_path, score):
    code, out, _ = cli("--image", _img(tmp_path), "--prune_method", "shirg", "--shirg_score", score, *FAST)
    assert code == 0 and visual_tokens(out) == 980


def test_shirg_save_heatmap(cli, tmp_path):
    dest = tmp_path / "out" / "heat.png"
    code, out, _ = cli("--image", noise(tmp_path / "i.png", 640, 480), "--prune_method", "shirg",
                       "--save_heatmap", dest, "--json", *FAST)
    assert code == 0 and "heatmap" in json.loads(out)["timings_ms"]
    with Image.open(dest) as im:
        assert im.format == "PNG" and im.width > 100 and im.height > 100
    assert [p.name for p in dest.parent.iterdir()] == ["heat.png"]  # no temp file left behind


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_one_error_line(cli, tmp_path):
    code, out, err = cli(*FAST, "--image", _img(tmp_path), "--device", "cuda")
    assert code == 2 and out == "" and err.startswith("error: ") and len(err.splitlines()) == 1
