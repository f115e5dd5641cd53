"""The CLI end to end (`llava.eval.run.main`) on the built-in small model.

The model is the session `small_model`, handed to the CLI through `build_small_model` so no
test pays for a rebuild. `main` configures logging itself; `cli` lets it write to the captured
stderr exactly as it would in a terminal, so "one line on stderr" is really checked.
"""
import json

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


# ---- bad input: tests/llava/test_bad_inputs.py ----------------------------------------------------
def _img(tmp):
    return noise(tmp / "ok.png", 64, 64)


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


# ---- defaults that depend on the input, flag spellings -----------------------------------------------
@pytest.mark.parametrize("method", ["random", "stride"])
def test_default_budget_is_clamped_to_a_small_images_candidates(cli, tmp_path, method):
    """10000x200 px has 810 candidates, fewer than the default budget 980: all are kept and the report says so
    (an explicit --budget 980 is an error, see tests/llava/test_bad_inputs.py)."""
    img = tmp_path / "wide.png"
    Image.new("RGB", (10000, 200), (90, 30, 200)).save(img)
    code, out, err = cli("--image", img, "--prune_method", method, "--json", *FAST)
    r = json.loads(out)
    assert code == 0 and err == "" and r["candidates"] == 810 and r["visual_tokens"] == 810
    assert r["notes"]["budget_note"] == ("the default budget 980 is more than this image's 810 candidate tokens, "
                                         "so all 810 are kept (give --budget to keep fewer)")


def test_default_budget_on_an_hd_image_needs_no_note(cli, tmp_path):
    code, out, _ = cli("--image", noise(tmp_path / "sq.png", 768, 768), "--prune_method", "random", "--json", *FAST)
    r = json.loads(out)
    assert code == 0 and r["visual_tokens"] == 980 and "budget_note" not in r["notes"]


@pytest.mark.parametrize("spelling", ["none", "None", "NONE"])
def test_schedule_none_spellings_are_the_even_split(cli, tmp_path, spelling):
    code, out, err = cli("--image", _img(tmp_path), "--schedule", spelling, "--json", *FAST)
    assert code == 0 and err == "" and json.loads(out)["steps"] == 4


def test_help_lists_the_schedules_the_cli_accepts(cli):
    code, out, err = cli("--help")
    assert code == 0 and err == ""
    assert "none (the even split, default), linear, shift, cosine, logit_normal" in " ".join(out.split())


def test_default_model_is_the_committed_trained_one():
    from llava.eval.run import TRAINED_MODEL, build_parser

    assert (TRAINED_MODEL / "config.json").is_file()
    assert build_parser().parse_args([]).model_path == str(TRAINED_MODEL)


def test_trained_model_report_has_no_random_weights_note_and_checks_the_answer(trained_model, monkeypatch, capsys):
    import json

    import llava.eval.run as run_module
    from llava.eval.run import TRAINED_MODEL, main

    tok, model = trained_model
    monkeypatch.setattr(run_module, "load_pretrained_model", lambda *a, **k: (tok, model, None, None))
    code = main(["--model-path", str(TRAINED_MODEL), "--question", "How many red shapes are there?",
                 "--short-answer", "--expected", "nonsense-answer", "--gen-length", "4", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and "model" not in report["notes"]
    assert report["expected"] == "nonsense-answer" and report["correct"] is False
