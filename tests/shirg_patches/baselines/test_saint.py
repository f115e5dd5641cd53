import functools

import pytest
import torch

from shirg_patches.baselines.saint import SaintOptions, select_saint
from shirg_patches.context import PruneContext
from tests.shirg_patches.baselines.conftest import selected


@pytest.fixture
def make_ctx(make_ctx):
    return functools.partial(make_ctx, keys=True)  # SAINT uses the SigLIP keys


@pytest.mark.parametrize("budget", [980, 3645, 1])
def test_contract_and_determinism(budget, make_ctx, check_contract):
    ctx = make_ctx(budget=budget)
    idx = selected(select_saint, ctx)
    check_contract(idx, ctx)
    assert torch.equal(idx, selected(select_saint, make_ctx(budget=budget)))


def duplicated_keys():
    """24 orthogonal keys on a 4x8 grid, 8 of them repeated (two triples, four pairs) at
    scattered positions; every other token is unique. Returns keys and, for each distinct key,
    the lowest index holding it."""
    key_of = list(range(24)) + [3, 3, 17, 17, 5, 20, 9, 23]
    order = torch.randperm(32, generator=torch.Generator().manual_seed(7))
    key_of = torch.tensor(key_of)[order]
    keys = torch.eye(24)[key_of]
    first = torch.stack([(key_of == k).nonzero()[0, 0] for k in range(24)])
    return keys, torch.sort(first).values


@pytest.mark.parametrize("iters", [1, 3, 8])
@pytest.mark.parametrize("use_keys", [True, False])
def test_exact_duplicates_go_first_and_lowest_index_survives(iters, use_keys):
    keys, expected = duplicated_keys()
    ctx = PruneContext(features=torch.randn(32, 4), vision_features=keys, view_shapes=[(4, 8)], budget=24,
                       keys=keys if use_keys else None, options=SaintOptions(budget=24, iters=iters))
    assert torch.equal(selected(select_saint, ctx), expected)
