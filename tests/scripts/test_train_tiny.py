"""scripts/train_tiny.sh (`make train-tiny`) end to end with 2 steps per stage on 16 images of each kind: every
stage runs (0: the tower alone), stages 1-5 train on cached features of the frozen SigLIP (1-3 on one pooled view,
4-5 on pooled any-res views), and the two outputs
land where the demo and `llava.eval.claim` look for them (here: under tmp_path), loadable as base
model + SHIRG adapter."""
import json
import subprocess
import sys

from llava.model.builder import load_pretrained_model
from tests.llava.train.conftest import REPO, subprocess_env


def test_train_tiny_runs_every_stage(tmp_path):
    model_dir = tmp_path / "models" / "tiny"
    env = subprocess_env(OUT=str(tmp_path / "run"), MODEL_DIR=str(model_dir), PY=sys.executable,
                         STEPS0="2", STEPS1="2", STEPS2="2", STEPS3="2", STEPS4="2", STEPS5="2", STEPS6="2", BATCH="4",
                         N_SOLO="16", N_SINGLE="16", N_GRID="16")
    proc = subprocess.run(["bash", "scripts/train_tiny.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for stage in range(0, 7):
        assert f"stage {stage}:" in proc.stdout
    done = [json.loads(line.split("done: ", 1)[1]) for line in proc.stderr.splitlines() if "] done: " in line]
    assert len(done) == 6
    assert all(d["vision_feature_cache"]["entries"] > 0 for d in done[:5]) and "vision_feature_cache" not in done[5]
    assert (tmp_path / "run" / "data" / "grid-count" / "train_llava.json").exists()
    one_view = json.loads((tmp_path / "run" / "stage3" / "final" / "config.json").read_text())
    assert one_view["image_aspect_ratio"] == "pad" and one_view["mm_2d_pool"] is True
    config = json.loads((model_dir / "config.json").read_text())
    assert config["image_aspect_ratio"] == "anyres" and config["d_model"] == 64 and config.get("mm_2d_pool") is None
    tokenizer, model, _, _ = load_pretrained_model(str(tmp_path / "models" / "tiny-shirg-lora"),
                                                   model_base=str(model_dir))
    assert model.config.llada.n_layers == 3

    # rerunning a finished run trains nothing: every stage, stage 0 included, says it is done and is skipped
    again = subprocess.run(["bash", "scripts/train_tiny.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    assert all(f"stage {stage} is done" in again.stdout for stage in range(0, 7))
    assert "] done: " not in again.stderr and (model_dir / "config.json").exists()
