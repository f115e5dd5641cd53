"""Index helpers every prune method may use (no method imports another method's file)."""
from __future__ import annotations

import torch


def top_k_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Deterministic top-k: ties broken by the lower index. Returns indices sorted ascending."""
    # stable sort on -score keeps lower index first among equal scores
    order = torch.sort(-scores.float(), stable=True).indices
    return torch.sort(order[:k]).values


def complement(indices: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """The indices in [0, num_tokens) not in `indices`, ascending."""
    keep = torch.ones(num_tokens, dtype=torch.bool, device=indices.device)
    keep[indices] = False
    return keep.nonzero().squeeze(1)


def spread(k: int, n: int) -> torch.Tensor:
    """k distinct evenly spaced integers in [0, n), centred in their cells (k <= n)."""
    return ((2 * torch.arange(k) + 1) * n) // (2 * k)
