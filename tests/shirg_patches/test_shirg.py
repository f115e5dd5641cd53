import math

import pytest
import torch
import torch.nn.functional as F

from llava.constants import DEFAULT_KEEP_RATIO, FOVEA_TOKENS, SHIRG_GLOBAL_TOKENS, SHIRG_KEPT
from llava.errors import InputError
from shirg_patches.context import PruneContext
from shirg_patches.scoring import NO_QUESTION_NOTE
from shirg_patches.shirg import (
    ShirgOptions,
    assemble_tokens,
    keep_count,
    resize_global_tokens,
    select_shirg,
)


def _ctx(budget=SHIRG_KEPT, attn=None, q=None, seed=0, **options):
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(FOVEA_TOKENS, 16, generator=g)
    return PruneContext(
        features=feats,
        vision_features=torch.randn(FOVEA_TOKENS, 8, generator=g),
        view_shapes=[(32, 32)],
        budget=budget,
        attn_received=torch.rand(FOVEA_TOKENS, generator=g) if attn is None else attn,
        question_embedding=q,
        seed=seed,
        options=ShirgOptions(**options),
    )


@pytest.mark.shapes
@pytest.mark.parametrize("ratio,k", [(DEFAULT_KEEP_RATIO, 724), (0.40, 410), (0.766, 784), (0.80, 819), (1.0, 1024)])
def test_keep_count(ratio, k):
    assert keep_count(ratio) == k
    assert SHIRG_GLOBAL_TOKENS + keep_count(DEFAULT_KEEP_RATIO) == 980


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.01, math.nan, "0.5", True, 1e-6])
def test_keep_count_errors(ratio):
    with pytest.raises(InputError):
        keep_count(ratio)


@pytest.mark.parametrize("mode", ["attn", "sim", "v1", "v2", "random"])
def test_select_exact_budget_sorted(mode):
    ctx = _ctx(budget=SHIRG_KEPT, q=torch.randn(16), score=mode)
    sel = select_shirg(ctx)
    idx = sel.indices
    assert idx.numel() == 724 and torch.equal(idx, torch.sort(idx).values)
    assert torch.unique(idx).numel() == 724
    assert sel.info["scores"].shape == (FOVEA_TOKENS,)
    assert torch.equal(select_shirg(_ctx(budget=SHIRG_KEPT, q=ctx.question_embedding, score=mode)).indices, idx)


def test_select_ties_take_lowest_indices_and_report_note():
    ctx = _ctx(budget=100, attn=torch.ones(FOVEA_TOKENS))
    sel = select_shirg(ctx)
    assert torch.equal(sel.indices, torch.arange(100))
    assert sel.info["shirg_note"] == NO_QUESTION_NOTE


def test_select_keeps_highest_scores():
    attn = torch.zeros(FOVEA_TOKENS)
    hot = torch.tensor([5, 900, 77, 300])
    attn[hot] = 1.0
    sel = select_shirg(_ctx(budget=4, attn=attn, score="attn"))
    assert torch.equal(sel.indices, torch.sort(hot).values)


@pytest.mark.shapes
@pytest.mark.parametrize("batched", [False, True])
def test_resize_global_tokens_matches_interpolate(batched):
    tokens = torch.randn(729, 12)
    out = resize_global_tokens(tokens[None] if batched else tokens)
    ref = F.interpolate(tokens.T.reshape(1, 12, 27, 27), size=(16, 16), mode="bilinear", align_corners=False)
    assert out.shape == (SHIRG_GLOBAL_TOKENS, 12)
    assert torch.allclose(out, ref.reshape(12, 256).T)
    with pytest.raises(ValueError):
        resize_global_tokens(torch.randn(700, 12))


@pytest.mark.shapes
def test_assemble_count():
    glob, fov = torch.randn(256, 8), torch.randn(1024, 8)
    kept = torch.sort(torch.randperm(1024, generator=torch.Generator().manual_seed(0))[:724]).values
    out = assemble_tokens(glob, fov, kept)
    assert out.shape == (980, 8)
    assert torch.equal(out[:256], glob) and torch.equal(out[256:], fov[kept])
    assert assemble_tokens(glob, fov, kept, expected_total=980).shape[0] == 980
    with pytest.raises(RuntimeError, match="expected 980"):
        assemble_tokens(glob, fov, kept[:-1], expected_total=980)
    with pytest.raises(RuntimeError, match="global 729"):
        assemble_tokens(torch.randn(729, 8), fov, kept)
