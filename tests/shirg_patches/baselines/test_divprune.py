import pytest
import torch
import torch.nn.functional as F

from shirg_patches.baselines.divprune import select_divprune
from shirg_patches.baselines.random_stride import select_random
from tests.shirg_patches.baselines.conftest import selected


@pytest.mark.parametrize("budget", [980, 3645, 1])
def test_contract_and_determinism(budget, make_ctx, check_contract):
    ctx = make_ctx(budget=budget)
    idx = selected(select_divprune, ctx)
    check_contract(idx, ctx)
    assert torch.equal(idx, selected(select_divprune, make_ctx(budget=budget)))


def min_pairwise_distance(x):
    x = F.normalize(x, dim=-1)
    d = 1 - x @ x.T
    d.fill_diagonal_(float("inf"))
    return d.min().item()


def test_more_diverse_than_random(make_ctx):
    g = torch.Generator().manual_seed(5)
    centres = torch.randn(40, 8, generator=g)
    features = centres[torch.randint(40, (729,), generator=g)] + 0.05 * torch.randn(729, 8, generator=g)
    ctxs = [make_ctx(views=[(27, 27)], budget=60, seed=s, features=features) for s in range(5)]
    random_min = sum(min_pairwise_distance(features[selected(select_random, c)]) for c in ctxs) / len(ctxs)
    div_min = min_pairwise_distance(features[selected(select_divprune, ctxs[0])])
    assert div_min > 2 * random_min


def test_starts_from_the_most_atypical_token(make_ctx):
    features = torch.ones(16, 4) + 0.01 * torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
    features[11] = -1.0  # the one token pointing away from all others
    assert selected(select_divprune, make_ctx(views=[(4, 4)], budget=1, d=4, features=features)).tolist() == [11]


def test_duplicates_are_never_both_kept_while_unique_tokens_remain(make_ctx):
    features = torch.eye(8).repeat(2, 1)  # tokens i and i+8 are identical
    idx = selected(select_divprune, make_ctx(views=[(4, 4)], budget=8, d=8, features=features))
    assert sorted((idx % 8).tolist()) == list(range(8))
