"""SHIRG token scores for the foveal view.

Every score is computed once, before the LM, from the vision tower's attention and the
question embedding, so the selection never depends on the diffusion state and the prefix
KV-cache stays valid.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from llava.constants import (
    SCORE_V1_ATTN,
    SCORE_V1_SIM,
    SCORE_V2_ATTN,
    SCORE_V2_DIVERSITY,
    SCORE_V2_SIM,
    SCORE_V2_TEMPERATURE,
    SHIRG_KEPT,
)
from llava.errors import InputError
from shirg_patches.ops import top_k_indices

SCORE_MODES = ("attn", "sim", "v1", "v2", "random")
NO_QUESTION_NOTE = "no question: text relevance s is undefined, ranking by attention a alone"


@dataclass
class ScoreResult:
    """Per-token scores ([M], higher = keep) and a note when the requested mode had to fall back."""

    scores: torch.Tensor
    note: Optional[str] = None


def minmax(x: torch.Tensor) -> torch.Tensor:
    """Rescale to [0, 1] per image so terms with different ranges can be mixed by fixed weights.
    A constant input carries no ranking information and maps to all zeros (never NaN)."""
    x = x.float()
    if x.numel() == 0:
        return x
    lo, span = x.min(), x.max() - x.min()
    if not torch.isfinite(span):
        raise ValueError("minmax got non-finite values")
    return (x - lo) / span if span > 0 else torch.zeros_like(x)


def attention_score(attn_received: torch.Tensor) -> torch.Tensor:
    """a_i: attention token i receives in the last kept SigLIP layer, min-max normalised.
    SigLIP has no CLS token, so received attention stands in for 'how much the view relies on i'."""
    return minmax(attn_received.flatten())


def similarity_score(features: torch.Tensor, question_embedding: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """s_i: cosine to the mean question embedding in LM space, min-max rescaled to [0, 1] per image.

    Min-max, like a_i, rather than (cos + 1) / 2: cosines of one image's tokens to a question
    span a narrow band, so the affine map would shrink s's spread and the 0.3 weight would barely
    move the ranking. Returns None without a question: there is nothing to be relevant to."""
    if question_embedding is None:
        return None
    q = question_embedding.float().flatten()
    if q.shape[0] != features.shape[-1]:
        raise ValueError(f"question embedding has dim {q.shape[0]}, features have {features.shape[-1]}")
    return minmax(F.cosine_similarity(features.float(), q[None], dim=-1))


def diversity_score(features: torch.Tensor, provisional_idx: torch.Tensor) -> torch.Tensor:
    """d_i: cosine of token i to the mean of a provisional kept set. One vectorised step
    replaces a K-step greedy loop (~one prefill of GPU time) and still penalises redundancy."""
    x = features.float()
    centroid = x[provisional_idx].mean(dim=0)
    return F.cosine_similarity(x, centroid[None], dim=-1)


def check_score_mode(mode: str) -> None:
    if mode not in SCORE_MODES:
        raise InputError(f"unknown --shirg_score {mode!r}; valid: {', '.join(SCORE_MODES)}")


def score_tokens(
    features: torch.Tensor,
    attn_received: Optional[torch.Tensor],
    question_embedding: Optional[torch.Tensor],
    mode: str = "v1",
    k: int = SHIRG_KEPT,
    seed: int = 0,
    temperature: float = SCORE_V2_TEMPERATURE,
) -> ScoreResult:
    """Score the M foveal tokens (features [M, D] after the projector, attn_received [M]).

    v1 = 0.7a + 0.3s. v2 = softmax((0.5a + 0.3s - 0.1d) / T), d from the first pass's top-k.
    Softmax is monotonic, so it never changes a top-K ranking; it only matters where the
    scores are used as weights. Without a question every mode except `random` and `attn`
    falls back to a alone and says so in `note`.
    """
    check_score_mode(mode)
    m = features.shape[0]
    if mode == "random":
        return ScoreResult(torch.rand(m, generator=torch.Generator().manual_seed(int(seed))))
    s = similarity_score(features, question_embedding)
    if mode == "sim" and s is not None:
        return ScoreResult(s)
    if attn_received is None:
        raise InputError(f"SHIRG score mode {mode!r} needs the vision tower's attention (attn_received is None)")
    if attn_received.numel() != m:
        raise ValueError(f"attn_received has {attn_received.numel()} entries, features have {m} tokens")
    a = attention_score(attn_received)
    if mode == "attn":
        return ScoreResult(a)
    if s is None:
        return ScoreResult(a, NO_QUESTION_NOTE)
    if mode == "v1":
        return ScoreResult(SCORE_V1_ATTN * a + SCORE_V1_SIM * s)
    if not 1 <= k <= m:
        raise ValueError(f"provisional set size k must be in [1, {m}], got {k}")
    if not temperature > 0:
        raise InputError(f"softmax temperature must be > 0, got {temperature}")
    first = SCORE_V2_ATTN * a + SCORE_V2_SIM * s
    d = diversity_score(features, top_k_indices(first, k))
    return ScoreResult(torch.softmax((first - SCORE_V2_DIVERSITY * d) / temperature, dim=0))
