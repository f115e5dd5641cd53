"""The `--prune_method` registry: CLI name -> how the visual tokens are produced.

Every method is decided once, before the diffusion steps, so the prefix K/V cache stays
valid for the whole answer. A method says which views it encodes, whether LaViDa's 27->14
pooling applies, and (for pruning methods) a pure `select(ctx) -> indices | Selection`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from llava.errors import InputError
from shirg_patches.context import PruneContext, Selection, SelectFn

ANYRES = "anyres"  # LaViDa's global 384² view + grid tiles
GLOBAL_FOVEA = "global+fovea"  # SHIRG: global 384² view + one 448² foveal view


@dataclass(frozen=True)
class PruneMethod:
    name: str
    summary: str
    views: str = ANYRES
    pool: Optional[bool] = None  # anyres only: True pools 27->14, None = pooling flag decides
    select: Optional[SelectFn] = None  # None: keep everything (LaViDa merge with newline tokens)
    needs_attention: bool = False  # wants SigLIP attention-received scores
    needs_keys: bool = False  # wants SigLIP keys of the last kept layer
    lm_layer: Optional[int] = None  # prune inside the LM after this layer during prefill (TopV)


REGISTRY: dict[str, PruneMethod] = {}


def register(method: PruneMethod) -> PruneMethod:
    if method.name in REGISTRY:
        raise ValueError(f"prune method {method.name!r} registered twice")
    REGISTRY[method.name] = method
    return method


def get_method(name: str) -> PruneMethod:
    try:
        return REGISTRY[name]
    except KeyError:
        raise InputError(
            f"unknown --prune_method {name!r}; choose one of: {', '.join(sorted(REGISTRY))}"
        ) from None


register(PruneMethod("lavida", "LaViDa any-res; pooling follows --pool/--no-pool, NOT_ALWASY_DO_2DPOOL, config"))
register(PruneMethod("pool", "LaViDa default: 5 views pooled 27x27->14x14, newline per row (1008 for a square image)", pool=True))
register(PruneMethod("full", "LaViDa unpooled: 5 views x 729 tokens, newline per row (3699 for a square image)", pool=False))


def _register_methods() -> None:
    # imported here so `shirg_patches.context` stays importable on its own
    from shirg_patches.baselines.divprune import select_divprune
    from shirg_patches.baselines.random_stride import select_random, select_stride
    from shirg_patches.baselines.saint import select_saint
    from shirg_patches.baselines.topv import DEFAULT_TOPV_LAYER, select_topv
    from shirg_patches.baselines.visionzip import select_visionzip
    from shirg_patches.shirg import select_shirg

    register(PruneMethod(
        "shirg", "SHIRG: global 384² -> 256 tokens + top-724 of a 448² fovea (1024) = 980",
        views=GLOBAL_FOVEA, select=select_shirg, needs_attention=True))
    # Baselines prune LaViDa's unpooled any-res tokens (global 27x27 + unpadded tile grid) to --budget.
    register(PruneMethod("random", "uniform random subset (seeded)", select=select_random))
    register(PruneMethod("stride", "uniform spatial grid per view", select=select_stride))
    register(PruneMethod("saint", "drop the most redundant tokens of the SigLIP-key cosine graph", select=select_saint,
                         needs_keys=True))
    register(PruneMethod("topv", "optimal-transport importance at an early LM layer, pruned once in prefill",
                         select=select_topv, lm_layer=DEFAULT_TOPV_LAYER))
    register(PruneMethod("visionzip", "top attention-received tokens + merged contextual tokens",
                         select=select_visionzip, needs_attention=True, needs_keys=True))
    register(PruneMethod("divprune", "greedy max-min diversity of the projected tokens", select=select_divprune))


_register_methods()

__all__ = ["PruneContext", "PruneMethod", "Selection", "REGISTRY", "get_method", "register", "ANYRES", "GLOBAL_FOVEA"]
