"""Content-blind controls: a uniform random subset and a uniform spatial grid.

Neither looks at the features, so they measure what the token budget alone buys. Both choose
once from the seed and the view shapes, before the LM, so the prefix K/V cache stays valid
for every diffusion step.
"""
import torch

from shirg_patches.context import PruneContext
from shirg_patches.ops import spread
from shirg_patches.registry import BudgetOptions, PruneMethod, register


def select_random(ctx: PruneContext) -> torch.Tensor:
    """Keep `budget` tokens drawn uniformly without replacement (seeded by ctx.seed)."""
    perm = torch.randperm(ctx.num_tokens, generator=ctx.generator())
    return perm[: ctx.budget]


def allocate(sizes: list[int], budget: int) -> list[int]:
    """Split `budget` across views proportionally to `sizes` (largest remainder, exact sum,
    ties to the earlier view). Integer arithmetic, so no float rounding can break the sum."""
    total = sum(sizes)
    counts = [budget * s // total for s in sizes]
    remainders = [budget * s % total for s in sizes]
    order = sorted(range(len(sizes)), key=lambda v: (-remainders[v], v))
    for v in order[: budget - sum(counts)]:
        counts[v] += 1
    return counts


def grid_indices(rows: int, cols: int, k: int) -> torch.Tensor:
    """k flat raster indices forming a near-square grid over a rows x cols view: evenly spaced
    rows (about sqrt(k * rows / cols) of them), each with an evenly spaced set of columns;
    per-row counts differ by at most one so columns line up across rows."""
    n_rows = round((k * rows / cols) ** 0.5)
    n_rows = min(max(n_rows, -(-k // cols), 1), rows)  # >= ceil(k / cols) so every row fits
    per_row = torch.diff(torch.arange(n_rows + 1) * k // n_rows)
    row = spread(n_rows, rows).repeat_interleave(per_row)
    m = per_row.repeat_interleave(per_row)
    j = torch.arange(k) - (torch.cumsum(per_row, 0) - per_row).repeat_interleave(per_row)
    col = ((2 * j + 1) * cols) // (2 * m)
    return row * cols + col


def select_stride(ctx: PruneContext) -> torch.Tensor:
    """Keep a uniform spatial grid: the budget is split across views by their sizes, and each
    view keeps an evenly spaced grid of rows x columns."""
    counts = allocate([r * c for r, c in ctx.view_shapes], ctx.budget)
    kept = [off + grid_indices(r, c, k)
            for (r, c), off, k in zip(ctx.view_shapes, ctx.view_offsets(), counts) if k > 0]
    return torch.cat(kept)


register(PruneMethod("random", "uniform random subset (seeded)", BudgetOptions, select=select_random))
register(PruneMethod("stride", "uniform spatial grid per view", BudgetOptions, select=select_stride))
