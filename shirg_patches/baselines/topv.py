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

Cache-safe: the LM calls back once during prefill after layer `--topv_layer` (default 2), the
kept indices apply to all later layers, and the choice never changes during diffusion steps.
"""
import dataclasses
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from llava.errors import InputError
from shirg_patches.context import PruneContext, PruneHook, VisualTokens, run_select
from shirg_patches.ops import complement, spread, top_k_indices
from shirg_patches.registry import BudgetOptions, PruneMethod, get_method, option, register

MAX_DIST = 2 ** 0.5  # largest distance between two positions in one view


@dataclass(frozen=True)
class TopVOptions(BudgetOptions):
    layer: int = option(2, "TopV: prune after this LM layer during prefill", flag="topv_layer")
    recovery_ratio: float = option(0.1, "TopV: share of the budget spread evenly over pruned tokens")
    centre_weight: float = option(0.5, "TopV: weight of the distance-from-centre cost")
    spatial_weight: float = option(0.5, "TopV: weight of the spatial-distance cost")
    iters: int = option(10, "TopV: Sinkhorn iterations", flag="topv_iters")
    epsilon: float = option(0.05, "TopV: entropic regularisation of the transport plan", flag="topv_epsilon")

    def validate(self) -> None:
        super().validate()
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise InputError(f"--topv_layer must be a non-negative integer, got {self.layer!r}")
        if not 0 <= self.recovery_ratio <= 1:
            raise InputError(f"--recovery_ratio must be in [0, 1], got {self.recovery_ratio}")
        if isinstance(self.iters, bool) or not isinstance(self.iters, int) or self.iters < 1:
            raise InputError(f"--topv_iters must be a positive integer, got {self.iters!r}")
        if not self.epsilon > 0:
            raise InputError(f"--topv_epsilon must be > 0, got {self.epsilon}")


def topv_scores(layer_inputs: torch.Tensor, layer_outputs: torch.Tensor, positions: torch.Tensor,
                centre_weight: float = 0.5, spatial_weight: float = 0.5, iters: int = 10,
                epsilon: float = 0.05, view_sizes: Optional[Sequence[int]] = None,
                return_plan: bool = False):
    """[N] importance (higher = keep). view_sizes: tokens per view, in order (None = one view).
    Peak memory is two N x N fp32 matrices (the log kernel and one work buffer); `return_plan`
    also returns a copy of the transport plan P (a third one), for inspection and tests."""
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
    kept_plan = plan.clone() if return_plan else None
    scores = epsilon * n * plan.mul_(log_k).sum(1)  # = -N * sum_j P_ij C_ij
    return (scores, kept_plan) if return_plan else scores


def logsumexp_(a: torch.Tensor, dim: int) -> torch.Tensor:
    """torch.logsumexp that works in a's buffer (overwrites a): no N x N temporaries."""
    m = a.amax(dim, keepdim=True)
    return (m + a.sub_(m).exp_().sum(dim, keepdim=True).log_()).squeeze(dim)


def select_topv(ctx: PruneContext) -> torch.Tensor:
    """Keep the top-scoring tokens plus a uniform "recovery" share strided over the pruned ones
    (so large background regions are not lost entirely); exactly `budget` in total.

    Source and target are ctx.lm_hidden_in / lm_hidden_out, the visual tokens' hidden states
    entering and leaving the pruning layer (given together). Without them it falls back to the pre-LM approximation:
    ctx.features (the LM's layer-0 input) as both source and target, i.e. an identity "layer",
    which still ranks by distinctiveness, locality and centrality. SigLIP features cannot be
    the source there: their width differs from the LM's, so 1 - cos is undefined across them.
    """
    opt = ctx.options or TopVOptions(budget=ctx.budget)
    if (ctx.lm_hidden_in is None) != (ctx.lm_hidden_out is None):
        raise InputError("topv needs both lm_hidden_in and lm_hidden_out, or neither")
    source = ctx.features if ctx.lm_hidden_in is None else ctx.lm_hidden_in
    target = ctx.features if ctx.lm_hidden_out is None else ctx.lm_hidden_out
    scores = topv_scores(source, target, ctx.positions(), centre_weight=opt.centre_weight,
                         spatial_weight=opt.spatial_weight, iters=opt.iters, epsilon=opt.epsilon,
                         view_sizes=[r * c for r, c in ctx.view_shapes])
    n_recover = round(opt.recovery_ratio * ctx.budget)
    top = top_k_indices(scores, ctx.budget - n_recover)
    pruned = complement(top, ctx.num_tokens)
    recovered = pruned[spread(n_recover, pruned.numel())]
    return torch.cat([top, recovered])


def topv_prefill_hook(ctx: PruneContext, visual: VisualTokens, start: int, end: int, n_layers: int) -> PruneHook:
    """The prefill callback: at the pruning layer it scores the image's candidates from that
    layer's input and output hidden states and returns the sequence positions later layers keep
    (all text, plus the kept visual tokens). It fires once, during prefill, so the cache it shapes
    is static; `visual.kept` records the choice."""
    layer = ctx.options.layer
    if layer >= n_layers - 1:
        raise InputError(f"--prune_method {visual.method} prunes after LM layer {layer}, "
                         f"but the model has only {n_layers} layers")
    fired = []

    def hook(layer_idx, hidden_in, hidden_out, positions):
        if layer_idx != layer or fired:
            return None
        at_layer = dataclasses.replace(ctx, lm_hidden_in=hidden_in[0, start:end].float(),
                                       lm_hidden_out=hidden_out[0, start:end].float())
        kept = run_select(get_method(visual.method).select, at_layer).indices
        visual.kept = kept
        fired.append(True)
        seq = hidden_out.shape[1]
        dev = kept.device
        return torch.cat([torch.arange(0, start, device=dev), start + kept, torch.arange(end, seq, device=dev)])

    return hook


register(PruneMethod("topv", "optimal-transport importance at an early LM layer, pruned once in prefill", TopVOptions,
                     select=select_topv, prefill_hook=topv_prefill_hook))
