import functools

import pytest
import torch
import torch.nn.functional as F

from llava.errors import InputError
from shirg_patches.baselines.visionzip import VisionZipOptions, select_visionzip
from shirg_patches.context import Selection
from tests.shirg_patches.baselines.conftest import selected


@pytest.fixture
def make_ctx(make_ctx):
    # LM features 4 wider than the SigLIP ones, plus attention and keys
    return functools.partial(make_ctx, lm_extra_dim=4, attention=True, keys=True)


@pytest.mark.parametrize("budget", [980, 3645, 1])
def test_contract_and_determinism(budget, make_ctx, check_contract):
    ctx = make_ctx(budget=budget)
    sel = selected(select_visionzip, ctx)
    assert isinstance(sel, Selection)
    check_contract(sel, ctx)
    again = selected(select_visionzip, make_ctx(budget=budget))
    assert torch.equal(sel.indices, again.indices) and torch.equal(sel.tokens, again.tokens)


def test_full_budget_keeps_every_token_unchanged(make_ctx):
    ctx = make_ctx(budget=3645)
    sel = selected(select_visionzip, ctx)
    assert torch.equal(sel.tokens, ctx.features)


def test_keeps_highest_attention_tokens_as_they_are(make_ctx):
    ctx = make_ctx()
    sel = selected(select_visionzip, ctx)
    dominant = torch.topk(ctx.attn_received, round(0.85 * 980)).indices
    pos = torch.searchsorted(sel.indices, dominant)
    assert torch.equal(sel.indices[pos], dominant)
    assert torch.equal(sel.tokens[pos], ctx.features[dominant])


@pytest.mark.parametrize("use_keys", [True, False])
def test_contextual_tokens_are_averages_of_their_merged_tokens(use_keys, make_ctx):
    ctx = make_ctx(views=[(6, 6)], budget=10, options=VisionZipOptions(budget=10, dominant_ratio=0.6))
    if not use_keys:
        ctx.keys = None
    sel = selected(select_visionzip, ctx)
    k = F.normalize(ctx.keys if use_keys else ctx.vision_features, dim=-1)
    dominant = set(torch.topk(ctx.attn_received, 6).indices.tolist())
    targets = [i for i in sel.indices.tolist() if i not in dominant]
    assert len(targets) == 4
    groups = {t: [t] for t in targets}
    for i in set(range(36)) - dominant - set(targets):  # brute force: nearest target by cosine
        groups[max(targets, key=lambda t: float(k[i] @ k[t]))].append(i)
    assert sum(len(g) > 1 for g in groups.values()) >= 2  # the case really merges
    for row, i in enumerate(sel.indices.tolist()):
        expected = ctx.features[groups[i]].mean(0) if i in groups else ctx.features[i]
        assert torch.allclose(sel.tokens[row], expected, atol=1e-6)


def test_contextual_targets_are_strided_over_the_rest(make_ctx):
    ctx = make_ctx(views=[(10, 10)], budget=5, options=VisionZipOptions(budget=5, dominant_ratio=0.2))
    ctx.attn_received = torch.zeros(100)
    ctx.attn_received[0] = 1.0  # dominant: token 0; 4 targets over tokens 1..99
    assert selected(select_visionzip, ctx).indices.tolist() == [0, 13, 38, 62, 87]


def test_needs_attention(make_ctx):
    ctx = make_ctx(views=[(4, 4)], budget=4)
    ctx.attn_received = None
    with pytest.raises(InputError):
        selected(select_visionzip, ctx)
