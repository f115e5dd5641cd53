import pytest
import torch

from llava.errors import InputError
from shirg_patches.baselines.topv import TopVOptions, select_topv, topv_scores
from shirg_patches.context import PruneContext
from tests.shirg_patches.baselines.conftest import selected

SMALL_VIEWS = [(9, 9), (18, 18)]  # default views at 1/3 scale: Sinkhorn on N = 3645 takes ~1 s on CPU


@pytest.mark.parametrize("budget", [109, 405, 1])
def test_contract_and_determinism(budget, make_ctx, check_contract):
    ctx = make_ctx(views=SMALL_VIEWS, budget=budget)
    idx = selected(select_topv, ctx)
    check_contract(idx, ctx)
    assert torch.equal(idx, selected(select_topv, make_ctx(views=SMALL_VIEWS, budget=budget)))


def test_prefers_the_centre_when_features_are_equal():
    ctx = PruneContext(features=torch.ones(81, 4), vision_features=torch.ones(81, 4), view_shapes=[(9, 9)],
                       budget=9, options=TopVOptions(budget=9, recovery_ratio=0.0))
    assert selected(select_topv, ctx).tolist() == [30, 31, 32, 39, 40, 41, 48, 49, 50]  # the central 3x3
    scores = topv_scores(ctx.features, ctx.features, ctx.positions()).view(9, 9)
    assert scores[4, 4] == scores.max() and scores[0, 0] == scores.min()


def test_each_view_has_its_own_centre():
    views = [(5, 5), (9, 9)]
    ctx = PruneContext(features=torch.ones(106, 4), vision_features=torch.ones(106, 4), view_shapes=views, budget=2)
    scores = topv_scores(ctx.features, ctx.features, ctx.positions(), view_sizes=[25, 81])
    assert sorted(torch.topk(scores, 2).indices.tolist()) == [12, 25 + 40]


def test_uses_layer_states_and_drops_tokens_the_layer_overwrote(make_ctx):
    g = torch.Generator().manual_seed(3)
    inputs = torch.randn(144, 16, generator=g)
    outputs = inputs.clone()
    overwritten = torch.tensor([0, 17, 70, 71, 143])
    outputs[overwritten] = torch.randn(5, 16, generator=g)
    ctx = make_ctx(views=[(12, 12)], budget=100, d=16, options=TopVOptions(budget=100, recovery_ratio=0.0),
                   lm_hidden_in=inputs, lm_hidden_out=outputs)
    kept = selected(select_topv, ctx)
    assert not set(overwritten.tolist()) & set(kept.tolist())


def test_recovery_takes_evenly_strided_pruned_tokens():
    ctx = PruneContext(features=torch.ones(81, 4), vision_features=torch.ones(81, 4), view_shapes=[(9, 9)],
                       budget=10, options=TopVOptions(budget=10, recovery_ratio=0.1))
    kept = set(selected(select_topv, ctx).tolist())
    centre = {30, 31, 32, 39, 40, 41, 48, 49, 50}
    assert centre <= kept and len(kept - centre) == 1


def test_half_given_layer_states_is_an_error(make_ctx):
    ctx = make_ctx(views=[(4, 4)], budget=4, lm_hidden_in=torch.randn(16, 8))
    with pytest.raises(InputError):
        selected(select_topv, ctx)



def test_sinkhorn_plan_has_uniform_marginals(make_ctx):
    """The entropic plan transports uniform marginals: the last half-step fits the columns
    exactly, and the rows converge to 1/N as the iterations grow (the default 10 is close)."""
    ctx = make_ctx(views=[(9, 9), (6, 12)], budget=40, d=16)
    n = ctx.num_tokens
    out = torch.randn(n, 16, generator=torch.Generator().manual_seed(5))
    row_errors = []
    for iters in (10, 50, 200):
        scores, plan = topv_scores(ctx.features, out, ctx.positions(), iters=iters, view_sizes=[81, 72],
                                   return_plan=True)
        assert plan.shape == (n, n) and torch.all(plan >= 0)
        assert torch.allclose(plan.sum(0) * n, torch.ones(n), atol=1e-5)
        row_errors.append((plan.sum(1) * n - 1).abs().max().item())
        assert torch.equal(scores, topv_scores(ctx.features, out, ctx.positions(), iters=iters, view_sizes=[81, 72]))
    assert row_errors[0] < 0.2 and row_errors[0] > row_errors[1] > row_errors[2] and row_errors[2] < 2e-3
