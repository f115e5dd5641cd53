"""TopV-style pruning (after Yang et al., CVPR 2025): rank visual tokens by an optimal-transport
plan between the inputs and the outputs of an early LM layer.

Cost of moving input token i onto output token j:
    C_ij = (1 - cos(x_i, y_j)) + spatial_weight * |p_i - p_j| + centre_weight * |p_i - centre|
with p the token's (row, col) normalised within its own view; tokens of different views are
set the largest in-view distance apart (sqrt 2). The entropic plan P (uniform marginals) comes
from a fixed number of log-domain Sinkhorn iterations, and
    importance_i = -N * sum_j P_ij C_ij,
the negated expected cost of transporting token i: a token is important when the layer's
output still holds its content nearby. The centre term is constant per row, so it cannot
change P; it enters the importance through this expected cost.

Cache-safe: the LM calls back once during prefill after layer DEFAULT_TOPV_LAYER, the kept
indices apply to all later layers, and the choice never changes during diffusion steps.
"""
import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from llava.errors import InputError
from shirg_patches.baselines.random_stride import spread
from shirg_patches.context import PruneContext, complement, finalize_indices, top_k_indices

DEFAULT_TOPV_LAYER = 2
MAX_DIST = 2 ** 0.5  # largest distance between two positions in one view


def topv_scores(layer_inputs: torch.Tensor, layer_outputs: torch.Tensor, positions: torch.Tensor,
                centre_weight: float = 0.5, spatial_weight: float = 0.5, iters: int = 10,
                epsilon: float = 0.05, view_sizes: Optional[Sequence[int]] = None) -> torch.Tensor:
    """[N] importance (higher = keep). view_sizes: tokens per view, in order (None = one view).
    Peak memory is two N x N fp32 matrices (the log kernel and one work buffer)."""
    n = layer_inputs.shape[0]
    # detached: the scores only rank, and the in-place / out= ops below fail under autograd
    x = F.normalize(layer_inputs.detach().float(), dim=-1)
    y = F.normalize(layer_outputs.detach().float(), dim=-1)
    pos = positions.to(x.device, torch.float32)
    cost = x @ y.T                              # becomes the cost in place
    cost.neg_().add_(1 + spatial_weight * MAX_DIST)
    start = 0
    for size in view_sizes or [n]:              # in-view pairs: replace sqrt 2 by real distance
        p = pos[start:start + size]
        cost[start:start + size, start:start + size] += torch.cdist(p, p).sub_(MAX_DIST).mul_(spatial_weight)
        start += size
    cost += centre_weight * (pos - 0.5).norm(dim=-1)[:, None]
    log_k = cost.div_(-epsilon)                 # the same buffer: log kernel = -C / eps
    log_m = -math.log(n)                        # uniform marginals 1/N
    buf = torch.empty_like(log_k)
    f, g = x.new_zeros(n), x.new_zeros(n)
    for _ in range(iters):
        f = log_m - logsumexp_(torch.add(log_k, g[None, :], out=buf), dim=1)
        g = log_m - logsumexp_(torch.add(log_k, f[:, None], out=buf), dim=0)
    plan = torch.add(log_k, f[:, None], out=buf).add_(g[None, :]).exp_()
    return epsilon * n * plan.mul_(log_k).sum(1)  # = -N * sum_j P_ij C_ij


def logsumexp_(a: torch.Tensor, dim: int) -> torch.Tensor:
    """torch.logsumexp that works in a's buffer (overwrites a): no N x N temporaries."""
    m = a.amax(dim, keepdim=True)
    return (m + a.sub_(m).exp_().sum(dim, keepdim=True).log_()).squeeze(dim)


def select_topv(ctx: PruneContext) -> torch.Tensor:
    """Keep the top-scoring tokens plus a uniform "recovery" share strided over the pruned ones
    (so large background regions are not lost entirely); exactly `budget` in total.

    Options: layer_inputs / layer_outputs ([N, D] hidden states of the visual tokens at the
    pruning layer, given together); recovery_ratio 0.1; centre_weight 0.5; spatial_weight 0.5;
    iters 10; epsilon 0.05. Without layer states it falls back to the pre-LM approximation:
    ctx.features (the LM's layer-0 input) as both source and target, i.e. an identity "layer",
    which still ranks by distinctiveness, locality and centrality. SigLIP features cannot be
    the source there: their width differs from the LM's, so 1 - cos is undefined across them.
    """
    opt = ctx.options
    if ("layer_inputs" in opt) != ("layer_outputs" in opt):
        raise InputError("topv needs both layer_inputs and layer_outputs, or neither")
    source = opt.get("layer_inputs", ctx.features)
    target = opt.get("layer_outputs", ctx.features)
    scores = topv_scores(source, target, ctx.positions(),
                         centre_weight=opt.get("centre_weight", 0.5),
                         spatial_weight=opt.get("spatial_weight", 0.5),
                         iters=opt.get("iters", 10), epsilon=opt.get("epsilon", 0.05),
                         view_sizes=[r * c for r, c in ctx.view_shapes])
    n_recover = round(opt.get("recovery_ratio", 0.1) * ctx.budget)
    top = top_k_indices(scores, ctx.budget - n_recover)
    pruned = complement(top, ctx.num_tokens)
    recovered = pruned[spread(n_recover, pruned.numel())]
    return finalize_indices(torch.cat([top, recovered]), ctx.budget, ctx.num_tokens)
