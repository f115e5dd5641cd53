import pytest
import torch

from shirg_patches.baselines.random_stride import allocate, select_random, select_stride
from tests.shirg_patches.baselines.conftest import selected


@pytest.mark.parametrize("select", [select_random, select_stride])
@pytest.mark.parametrize("budget", [980, 3645, 1])
def test_contract_and_determinism(select, budget, make_ctx, check_contract):
    ctx = make_ctx(budget=budget)
    check_contract(select(ctx), ctx)
    assert torch.equal(selected(select, ctx), selected(select, make_ctx(budget=budget)))


def test_random_differs_across_seeds(make_ctx):
    assert not torch.equal(selected(select_random, make_ctx(seed=0)), selected(select_random, make_ctx(seed=1)))


def test_allocate_is_proportional_and_exact():
    assert allocate([729, 2916], 980) == [196, 784]
    assert allocate([729, 2916], 1) == [0, 1]
    for budget in [1, 7, 500, 981, 1753, 3645]:
        counts = allocate([729, 1458, 1458], budget)
        assert sum(counts) == budget and all(0 <= c <= s for c, s in zip(counts, [729, 1458, 1458]))


def rows_cols(idx, cols):
    return sorted(set((idx // cols).tolist())), sorted(set((idx % cols).tolist()))


def test_stride_picks_evenly_spaced_rows_and_columns(make_ctx):
    idx = selected(select_stride, make_ctx(views=[(8, 8)], budget=16))
    assert rows_cols(idx, 8) == ([1, 3, 5, 7], [1, 3, 5, 7])

    ctx = make_ctx()  # 196 in the 27x27 view, 784 in the 54x54 view: 14x14 and 28x28 grids
    idx = selected(select_stride, ctx)
    for (r, c), off, side in zip(ctx.view_shapes, ctx.view_offsets(), [14, 28]):
        local = idx[(idx >= off) & (idx < off + r * c)] - off
        rows, cols = rows_cols(local, c)
        assert len(rows) == len(cols) == side and local.numel() == side * side
        for axis in (rows, cols):
            gaps = torch.diff(torch.tensor(axis))
            assert gaps.max() - gaps.min() <= 1


def test_stride_odd_budget_stays_a_grid(make_ctx):
    idx = selected(select_stride, make_ctx(views=[(5, 5)], budget=7))
    rows, _ = rows_cols(idx, 5)
    per_row = torch.bincount(idx // 5, minlength=5)[rows]
    assert per_row.sum() == 7 and per_row.max() - per_row.min() <= 1
