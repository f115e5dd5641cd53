"""The evaluation harness end to end on fixture data: outputs, breakdowns, bad input, batching, resuming after a
kill, and 2-process data parallelism (gloo) against the single-process run."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llava.errors import InputError
from llava.eval.evaluate import dist_bucket, main, parse_system, parse_systems
from llava.eval.report import read_results, render_markdown

REPO = Path(__file__).resolve().parents[3]
SYSTEMS = "pool,full,shirg"
DATASETS = "chartqa,vqav2,entitygrid"
LIMIT = 2
N_UNITS = 3 * 3 * LIMIT


def common_args(model, data, out, *extra):
    return ["--model-path", model, "--data-root", data, "--out", out, "--systems", SYSTEMS, "--datasets", DATASETS,
            "--limit", LIMIT, "--gen-length", 4, "--steps", 4, "--latency-runs", 0, "--no-progress", *extra]


def predictions(out: Path) -> dict:
    recs = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    keys = [(r["system"], r["dataset"], r["id"]) for r in recs]
    assert len(keys) == len(set(keys)), "a unit was recorded twice"
    return {k: r for k, r in zip(keys, recs)}


def answers(preds: dict) -> dict:
    return {k: (r.get("answer_ids"), r.get("prediction"), r.get("skipped")) for k, r in preds.items()}


def subprocess_env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def single_run(sharp_checkpoint, data_root, tmp_path_factory):
    """The reference: one process, batch 1."""
    out = tmp_path_factory.mktemp("single") / "out"
    assert main([str(a) for a in common_args(sharp_checkpoint, data_root, out)]) == 0
    return out


# ---- systems --------------------------------------------------------------------------------------------------


def test_system_syntax():
    s = parse_system("shirg:fovea=saliency:keep_ratio=0.8")
    assert (s.label, s.method, s.options, s.adapter) == ("shirg:fovea=saliency:keep_ratio=0.8", "shirg",
                                                         {"fovea": "saliency", "keep_ratio": 0.8}, None)
    s = parse_system("shirg+lora=shirg:keep_ratio=0.8@/ckpt/a:b=c/lora-shirg")
    assert (s.label, s.options, s.adapter) == ("shirg+lora", {"keep_ratio": 0.8}, "/ckpt/a:b=c/lora-shirg")
    assert parse_system("shirg@/ckpt/lora-shirg").label == "shirg@lora-shirg"
    assert parse_system("random:budget=300").options == {"budget": 300}
    for bad, says in [("nope", "unknown method 'nope'"), ("pool:keep_ratio=0.5", "does not apply"),
                      ("shirg:fovea", "expected OPTION=VALUE"), ("shirg:keep_ratio=2", "keep ratio"),
                      ("shirg:fovea=bogus", "fovea"), ("shirg@", "adapter folder"), ("=shirg", "label"),
                      ("shirg:keep_ratio=0.5:keep_ratio=0.6", "given twice")]:
        with pytest.raises(InputError, match=says):
            parse_system(bad)
    with pytest.raises(InputError, match="two systems labelled 'x'"):
        parse_systems("x=pool,x=shirg")
    assert [s.label for s in parse_systems("pool, shirg ,lr=shirg:keep_ratio=0.4")] == ["pool", "shirg", "lr"]


def test_a_comma_in_an_existing_adapter_folder_stays_in_the_path(tmp_path):
    folder = tmp_path / "run,lr=1e-3"
    folder.mkdir()
    systems = parse_systems(f"pool,shirg@{folder},full")
    assert [(s.method, s.adapter) for s in systems] == [("pool", None), ("shirg", str(folder)), ("full", None)]
    # a path that does not exist is split as before (and then fails where adapters are loaded)
    assert [s.method for s in parse_systems(f"shirg@{tmp_path / 'a'},pool")] == ["shirg", "pool"]


def test_distance_buckets():
    assert [dist_bucket(d) for d in (0.0, 0.329, 0.33, 0.659, 0.66, 1.0)] == [
        "<0.33", "<0.33", "0.33-0.66", "0.33-0.66", ">=0.66", ">=0.66"]


# ---- bad input ----------------------------------------------------------------------------------------------------


def test_bad_input_is_one_error_line(run_eval, data_root, tmp_path):
    broken = shutil.copytree(data_root, tmp_path / "broken")
    (broken / "docvqa" / "val_v1.0.json").unlink()
    malformed = shutil.copytree(data_root, tmp_path / "malformed")
    recs = json.loads((malformed / "chartqa" / "test_human.json").read_text())
    del recs[1]["query"]
    (malformed / "chartqa" / "test_human.json").write_text(json.dumps(recs))
    base = ["--data-root", data_root, "--out", tmp_path / "out", "--latency-runs", 0, "--no-progress"]
    cases = [
        (["--systems", "pool,nope"], "unknown method 'nope'"),
        (["--systems", "pool:budget=300"], "'budget' does not apply to --prune_method pool"),
        (["--datasets", "chartqa,coco"], "unknown data set 'coco'"),
        (["--systems", "shirg@" + str(tmp_path / "no-adapter")], "adapter folder"),
        (["--datasets", "docvqa", "--data-root", broken], "val_v1.0.json"),
        (["--datasets", "chartqa", "--data-root", malformed], "record 1"),
        (["--gen-length", 10, "--block-length", 4], "gen length 10"),
    ]
    for extra, says in cases:
        code, out, err = run_eval(*base, *extra)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], (extra, err)
    assert not (tmp_path / "out").exists(), "bad input must be rejected before anything is written"


# ---- outputs --------------------------------------------------------------------------------------------------


def test_fixture_run_writes_predictions_csv_charts_and_report(run_eval, sharp_checkpoint, data_root, tmp_path):
    root = shutil.copytree(data_root, tmp_path / "data")
    (root / "vqav2" / "val2014" / "COCO_val2014_000000000073.jpg").unlink()  # 2 of the 4 questions lose their image
    out = tmp_path / "out"
    code, stdout, err = run_eval("--model-path", sharp_checkpoint, "--data-root", root, "--out", out,
                                 "--systems", "pool,shirg:keep_ratio=0.5", "--limit", 4, "--gen-length", 4,
                                 "--steps", 4, "--latency-runs", 1, "--latency-warmup", 0, "--latency-steps", 2,
                                 "--latency-gen-length", 2, "--no-progress")
    assert code == 0, err
    assert "vqav2: 2 item(s) skipped, image missing" in err
    preds = predictions(out)
    # 4 chartqa + 4 docvqa + 4 vqav2 (2 without image) + 4 entitygrid, per system
    assert len(preds) == 2 * 16
    skipped = [r for r in preds.values() if r.get("skipped")]
    assert len(skipped) == 2 * 2 and {r["skipped"] for r in skipped} == {"missing_image"}
    shirg = preds[("shirg:keep_ratio=0.5", "chartqa", "human-0")]
    assert shirg["lm_visual_tokens"] == 256 + round(0.5 * 1024) and len(shirg["answer_ids"]) == 4
    assert shirg["options"] == {"keep_ratio": 0.5} and {"vision", "prefill", "steps"} <= shirg["stage_ms"].keys()

    rows = read_results(out)
    by = {(r["system"], r["dataset"], r["metric"], r["breakdown"], r["bucket"]): r for r in rows}
    eg = {(k[3], k[4]): r for k, r in by.items() if k[0] == "pool" and k[1] == "entitygrid"}
    assert {("size_bucket", "native"), ("size_bucket", "mid"), ("size_bucket", "global")} <= eg.keys()
    assert {("center_dist", "<0.33"), ("center_dist", "0.33-0.66"), ("center_dist", ">=0.66")} <= eg.keys()
    assert {("qtype", q) for q in ("label", "colour", "count", "position")} <= eg.keys()
    assert eg[("center_dist", "<0.33")]["n"] == "1" and eg[("size_bucket", "mid")]["n"] == "2"  # count: no distance
    assert by[("pool", "entitygrid", "exact_match", "", "")]["n"] == "4"
    assert by[("pool", "entitygrid", "token_f1", "", "")]["n"] == "4"
    assert {r["metric"] for r in rows if r["breakdown"] and r["dataset"] == "entitygrid"} == {"exact_match"}
    for r in rows:
        if r["value"] and r["ci_lo"]:
            assert float(r["ci_lo"]) <= float(r["value"]) <= float(r["ci_hi"])
    vqa = by[("pool", "vqav2", "vqa_accuracy", "", "")]
    assert (vqa["n"], vqa["missing_images"]) == ("2", "2")
    assert by[("shirg:keep_ratio=0.5", "docvqa", "anls", "", "")]["lm_visual_tokens_mean"] == "768.0"
    assert float(by[("pool", "docvqa", "anls", "", "")]["latency_ms_median"]) > 0
    assert by[("pool", "docvqa", "anls", "", "")]["mem_kind"].startswith("cpu_peak_rss")
    for name in ("quality.png", "latency.png", "memory.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    assert md == render_markdown(rows)
    assert "| shirg:keep_ratio=0.5 | vqav2 | 768.0 |" in md and "x pool" in md
    assert "size_bucket=native" in md and "center_dist=>=0.66" in md and "pool vqav2: 2 missing" in md

    # --report-only rebuilds the same CSV from the records
    before = (out / "results.csv").read_text()
    (out / "results.csv").unlink()
    code, _, err = run_eval("--report-only", "--out", out)
    assert code == 0 and (out / "results.csv").read_text() == before


# ---- batching, resuming, sharding -------------------------------------------------------------------------------


def test_batched_answers_equal_batch_1(run_eval, single_run, sharp_checkpoint, data_root, tmp_path):
    out = tmp_path / "b3"
    code, _, err = run_eval(*common_args(sharp_checkpoint, data_root, out, "--batch-size", 3))
    assert code == 0, err
    ref, got = predictions(single_run), predictions(out)
    assert answers(got) == answers(ref) and len(ref) == N_UNITS
    assert len({tuple(r["answer_ids"]) for r in ref.values()}) > N_UNITS // 2, "the sharp model must vary"
    assert {r["batch_size"] for r in got.values()} == {2}  # LIMIT items per (system, data set)
    assert {r["lm_visual_tokens"] for k, r in got.items() if k[0] == "pool"} != {980}  # ragged batches were padded


def test_killed_run_resumes_without_loss(run_eval, single_run, sharp_checkpoint, data_root, tmp_path):
    out = tmp_path / "killed"
    argv = [sys.executable, "-m", "llava.eval.evaluate", *map(str, common_args(sharp_checkpoint, data_root, out))]
    proc = subprocess.Popen(argv, cwd=REPO, env=subprocess_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    path = out / "predictions.jsonl"
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if path.exists() and path.read_bytes().count(b"\n") >= 3:
                break
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done_before = path.read_bytes().count(b"\n")
    assert 3 <= done_before < N_UNITS, "the run must be killed part-way"
    with open(path, "ab") as f:  # a kill in the middle of a write leaves a partial last line
        f.write(b'{"system": "pool", "dataset": "chartqa", "id": "augm')
    code, _, err = run_eval(*common_args(sharp_checkpoint, data_root, out))
    assert code == 0, err
    assert "partial last line" in err
    assert answers(predictions(out)) == answers(predictions(single_run))
    assert (out / "results.csv").read_text() == (single_run / "results.csv").read_text()
    # a resumed run with settings that change answers is refused
    code, _, err = run_eval(*common_args(sharp_checkpoint, data_root, out, "--seed", 1))
    assert code == 2 and "seed=0" in err


def test_two_process_gloo_run_equals_single_process(single_run, sharp_checkpoint, data_root, tmp_path):
    out = tmp_path / "ddp"
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "llava.eval.evaluate", *map(str, common_args(sharp_checkpoint, data_root, out))]
    res = subprocess.run(argv, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert not list(out.glob("*.rank*.jsonl")), "rank files are merged and removed"
    assert answers(predictions(out)) == answers(predictions(single_run))
    assert (out / "results.csv").read_text() == (single_run / "results.csv").read_text()


def test_report_cli(single_run, tmp_path, capsys):
    from llava.eval.report import main as report_main

    assert report_main([str(single_run)]) == 0
    md = capsys.readouterr().out
    assert md.startswith("**Quality**") and "| pool |" in md and "qtype=label" in md
    assert report_main([str(single_run / "results.csv"), "--out", str(tmp_path / "r.md")]) == 0
    assert (tmp_path / "r.md").read_text() == md
    assert report_main([str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_retrained_weights_in_the_same_folder_refuse_a_resume(sharp_checkpoint, tmp_path):
    """The model path alone would match after retraining into the same folder; the weights fingerprint does not."""
    from llava.eval.evaluate import check_and_write_run_file, weights_fingerprint

    folder, out = tmp_path / "model", tmp_path / "out"
    shutil.copytree(sharp_checkpoint, folder)
    out.mkdir()
    before = weights_fingerprint(folder)
    assert weights_fingerprint(folder) == before
    assert weights_fingerprint("builtin:lavida-small") == "builtin:lavida-small"
    check_and_write_run_file(out, {"model_path": str(folder), "weights": before}, [], write=True)
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of the last tensor
    weights.write_bytes(bytes(data))
    after = weights_fingerprint(folder)
    assert after != before
    with pytest.raises(InputError, match="weights="):
        check_and_write_run_file(out, {"model_path": str(folder), "weights": after}, [], write=True)
