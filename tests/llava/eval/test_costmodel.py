"""The cost model's formulas, hand-checked on tiny dims, and its real-scale anchors (LaViDa-8B parameter counts
and checkpoint size, the token counts of a square HD image)."""
import csv
import subprocess
import sys
from pathlib import Path

import pytest

from llava.eval import costmodel as cm


def test_linear_hand_checked():
    c = cm.linear(3, 5, 7, dtype_bytes=2)
    assert c.flops == 2 * 3 * 5 * 7 == 210
    assert c.weight_bytes == 5 * 7 * 2
    assert c.act_bytes == 3 * (5 + 7) * 2
    assert cm.linear(3, 5, 7, 2, bias=True).weight_bytes == (5 * 7 + 7) * 2


def test_attention_hand_checked():
    fused = cm.attention(4, 4, 8, 8, dtype_bytes=2)
    assert fused.flops == 4 * 4**2 * 8 == 512
    assert fused.act_bytes == (2 * 4 * 8 + 2 * 4 * 8) * 2  # read Q, K, V; write O
    assert fused.weight_bytes == 0
    eager = cm.attention(4, 4, 8, 8, 2, heads=2, score_bytes=4)
    assert eager.act_bytes - fused.act_bytes == 2 * 16 * 2 * (4 + 2)


def test_lm_forward_tiny_config():
    lm = cm.LMDims(d_model=8, layers=2, heads=2, kv_heads=2, mlp=16, vocab=10)
    dims = cm.ModelDims(lm=lm)
    assert lm.params() == 10 * 8 * 2 + 2 * (4 * 64 + 3 * 128 + 2 * 8) + 8 == 1480
    c = cm.lm_forward(dims, 3, 3, logit_tokens=3, embed_tokens=3)
    per_layer = 2 * 3 * (4 * 64 + 3 * 128) + 4 * 3 * 3 * 8
    assert c.flops == 2 * per_layer + 2 * 3 * 8 * 10
    # every weight except the embedding rows not looked up is read once
    assert c.weight_bytes == (lm.params() - (10 - 3) * 8) * 2


def test_cost_roofline():
    gpu = cm.Gpu("toy", peak_flops=100.0, bandwidth=10.0)
    assert cm.Cost(flops=1000, weight_bytes=20).seconds(gpu) == 10.0
    assert cm.Cost(flops=1000, weight_bytes=20).bound(gpu) == "compute"
    assert cm.Cost(flops=100, act_bytes=50).seconds(gpu) == 5.0
    assert cm.Cost(flops=100, act_bytes=50).bound(gpu) == "memory"


@pytest.mark.shapes
def test_token_counts():
    dims = cm.ModelDims()
    assert dims.vision.tokens(384) == 729 and dims.vision.tokens(448) == 1024
    assert cm.registry_methods()["pool"].projected_tokens(dims) == 3645
    assert cm.registry_methods()["full"].projected_tokens(dims) == 3645
    assert cm.registry_methods()["shirg"].projected_tokens(dims) == 1753
    methods = cm.registry_methods()
    assert [methods[m].lm_visual_tokens for m in ("pool", "full", "shirg", "topv")] == [1008, 3699, 980, 980]


def test_param_counts_match_spec():
    dims = cm.ModelDims()
    assert dims.vision.params() == pytest.approx(397.8e6, rel=0.01)
    assert dims.lm.params() == pytest.approx(8.02e9, rel=0.01)
    assert dims.lm.params() * dims.dtype_bytes == 16_031_162_368  # LLaDA-8B safetensors size
    assert dims.projector.params() == 21_504_000


def test_siglip_weights_read_once_per_call():
    dims = cm.ModelDims()
    weights = dims.vision.params() * dims.dtype_bytes
    assert cm.siglip_call(dims, 5, 384).weight_bytes == weights
    shirg = cm.siglip_call(dims, 1, 384) + cm.siglip_call(dims, 1, 448)
    assert shirg.weight_bytes == 2 * weights
    assert shirg.flops < cm.siglip_call(dims, 5, 384).flops


def test_cached_step_reads_all_lm_weights_and_is_memory_bound():
    dims = cm.ModelDims()
    p, q = 1008 + 60, 32
    step = cm.lm_forward(dims, q, p + q, q, embed_tokens=q)
    lm = dims.lm
    assert step.weight_bytes == (lm.params() - (lm.vocab - q) * lm.d_model) * 2
    assert step.bytes >= 15e9  # ~15 GB of matrices + the K/V cache, every step
    assert step.bound(cm.GPUS["a100"]) == "memory" and step.bound(cm.GPUS["h100"]) == "memory"
    uncached = cm.lm_forward(dims, p + q, p + q, q, embed_tokens=q)
    assert uncached.flops > step.flops
    assert uncached.bound(cm.GPUS["a100"]) == "compute"


def test_answer_rows_compose_stages():
    dims, gpu = cm.ModelDims(), cm.GPUS["a100"]
    rows = {r.stage: r for r in cm.method_rows(cm.registry_methods()["shirg"], dims, gpu, 32, 16, 60)}
    assert "select" in rows and rows["select"].cost.flops < 0.01 * rows["siglip"].cost.flops
    cached = rows["prefill"].seconds + 16 * rows["step cached"].seconds
    assert rows["LM answer cached"].seconds == pytest.approx(cached)
    assert rows["LM answer uncached"].seconds == pytest.approx(16 * rows["step uncached"].seconds)
    front = rows["siglip"].seconds + rows["select"].seconds + rows["projector"].seconds
    assert rows["total cached"].seconds == pytest.approx(front + cached)
    assert rows["total cached"].seconds < rows["total uncached"].seconds


def test_cli_prints_table_and_writes_csv(tmp_path, capsys):
    out = tmp_path / "cost.csv"
    assert cm.main(["--gpu", "h100", "--steps", "8", "--csv", str(out)]) == 0
    text = capsys.readouterr().out
    assert "GFLOPs" in text and "step cached" in text and "H100-SXM" in text
    assert "pool 1008" in text and "full 3699" in text and "shirg 980" in text
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["method"] for r in rows} == {"pool", "full", "shirg"}
    assert all(float(r["est_ms"]) > 0 for r in rows)


def test_cli_rejects_unknown_method():
    with pytest.raises(SystemExit):
        cm.main(["--methods", "pool,nope"])


def test_import_needs_no_torch():
    code = "import sys, llava.eval.costmodel; assert 'torch' not in sys.modules"
    repo_root = Path(cm.__file__).resolve().parents[2]  # `python -c` puts its cwd on sys.path
    subprocess.run([sys.executable, "-c", code], check=True, cwd=repo_root)
