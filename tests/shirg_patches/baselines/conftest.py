"""Shared fixtures for the baseline pruning-method tests: a `PruneContext` factory and the
selection-contract checker."""
import pytest
import torch

from shirg_patches.context import PruneContext, Selection, run_select

VIEWS = [(27, 27), (54, 54)]  # global view + merged tile grid of a square image: N = 3645


def _make_ctx(views=VIEWS, budget=980, seed=0, d=8, features=None, keys=False, attention=False,
              lm_extra_dim=0, options=None, **fields):
    """A random context (generator seed 1234). Draw order, which the tests' numbers depend on:
    features [N, d + lm_extra_dim] (unless given), vision_features [N, d], then attn_received [N]
    if `attention`, then keys [N, d] if `keys`. `options` is the method's options object (None =
    its defaults); extra keyword arguments are further `PruneContext` fields."""
    n = sum(r * c for r, c in views)
    g = torch.Generator().manual_seed(1234)
    if features is None:
        features = torch.randn(n, d + lm_extra_dim, generator=g)
    vision_features = torch.randn(n, d, generator=g)
    attn_received = torch.rand(n, generator=g) if attention else None
    keys = torch.randn(n, d, generator=g) if keys else None
    return PruneContext(features=features, vision_features=vision_features, view_shapes=views, budget=budget,
                        attn_received=attn_received, keys=keys, seed=seed, options=options, **fields)


def selected(select, ctx):
    """What the core gets from a method: its result held to the contract by `run_select` (sorted
    indices; merged tokens permuted alongside). Indices for index-style methods, else the Selection."""
    sel = run_select(select, ctx)
    return sel if sel.tokens is not None else sel.indices


def _check_contract(result, ctx):
    """`result` (a method's raw output: indices or a `Selection`) passes the core's one contract
    check, `run_select`; merged tokens must match the budget and the features' width and dtype."""
    sel = run_select(lambda _: result, ctx)
    assert sel.indices.dtype == torch.long and sel.indices.shape == (ctx.budget,)
    assert torch.all(sel.indices[1:] > sel.indices[:-1])
    if isinstance(result, Selection):
        tokens = sel.tokens
        assert tokens is not None
        assert tokens.shape == (ctx.budget, ctx.features.shape[1]) and tokens.dtype == ctx.features.dtype


@pytest.fixture
def make_ctx():
    """Factory: make_ctx(views=VIEWS, budget=980, seed=0, d=8, features=None, keys=False,
    attention=False, lm_extra_dim=0, **options) -> PruneContext."""
    return _make_ctx


@pytest.fixture
def check_contract():
    """check_contract(result, ctx): asserts the selection contract (sorted unique in-range indices)."""
    return _check_contract
