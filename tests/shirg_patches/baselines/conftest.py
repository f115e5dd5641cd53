"""Shared fixtures for the baseline pruning-method tests: a `PruneContext` factory and the
selection-contract checker."""
import pytest
import torch

from shirg_patches.context import PruneContext, Selection

VIEWS = [(27, 27), (54, 54)]  # global view + merged tile grid of a square image: N = 3645


def _make_ctx(views=VIEWS, budget=980, seed=0, d=8, features=None, keys=False, attention=False,
              lm_extra_dim=0, **options):
    """A random context (generator seed 1234). Draw order, which the tests' numbers depend on:
    features [N, d + lm_extra_dim] (unless given), vision_features [N, d], then attn_received [N]
    if `attention`, then keys [N, d] if `keys`. Extra keyword arguments become `ctx.options`."""
    n = sum(r * c for r, c in views)
    g = torch.Generator().manual_seed(1234)
    if features is None:
        features = torch.randn(n, d + lm_extra_dim, generator=g)
    vision_features = torch.randn(n, d, generator=g)
    attn_received = torch.rand(n, generator=g) if attention else None
    keys = torch.randn(n, d, generator=g) if keys else None
    return PruneContext(features=features, vision_features=vision_features, view_shapes=views, budget=budget,
                        attn_received=attn_received, keys=keys, seed=seed, options=options)


def _check_contract(result, ctx):
    """`result` is a LongTensor of indices or a `Selection`, whose merged tokens are checked too."""
    idx = result.indices if isinstance(result, Selection) else result
    assert idx.dtype == torch.long and idx.shape == (ctx.budget,)
    assert torch.all(idx[1:] > idx[:-1])  # sorted and unique
    assert idx[0] >= 0 and idx[-1] < ctx.num_tokens
    if isinstance(result, Selection):
        tokens = result.tokens
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
