import pytest
import torch
import torch.nn.functional as F

from llava.constants import (
    SCORE_V1_ATTN,
    SCORE_V1_SIM,
    SCORE_V2_ATTN,
    SCORE_V2_DIVERSITY,
    SCORE_V2_SIM,
    SCORE_V2_TEMPERATURE,
)
from llava.errors import InputError
from shirg_patches.ops import top_k_indices
from shirg_patches.scoring import (
    NO_QUESTION_NOTE,
    SCORE_MODES,
    attention_score,
    diversity_score,
    minmax,
    score_tokens,
    similarity_score,
)


def _inputs(m=64, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, d, generator=g), torch.rand(m, generator=g), torch.randn(d, generator=g)


def test_minmax_range_and_constant_input():
    assert torch.allclose(minmax(torch.tensor([2.0, 4.0, 3.0])), torch.tensor([0.0, 1.0, 0.5]))
    out = minmax(torch.full((5,), 7.0))
    assert torch.equal(out, torch.zeros(5))
    assert torch.equal(attention_score(torch.ones(1024)), torch.zeros(1024))


def test_v1_formula_exact():
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    attn = torch.tensor([1.0, 3.0, 2.0])
    q = torch.tensor([2.0, 0.0])
    a = torch.tensor([0.0, 1.0, 0.5])
    s = torch.tensor([1.0, 0.5, 0.0])  # min-max of cos = 1, 0, -1
    assert torch.allclose(similarity_score(feats, q), s)
    out = score_tokens(feats, attn, q, mode="v1")
    assert out.note is None
    assert torch.allclose(out.scores, SCORE_V1_ATTN * a + SCORE_V1_SIM * s)


def test_similarity_is_minmax_rescaled_per_image():
    # cosines 0.6, 0.8, 1.0: a narrow band still spans the full [0, 1], like a_i does
    q = torch.tensor([1.0, 0.0])
    feats = torch.tensor([[0.6, 0.8], [0.8, 0.6], [1.0, 0.0]])
    assert torch.allclose(similarity_score(feats, q), torch.tensor([0.0, 0.5, 1.0]), atol=1e-6)


def test_v2_formula_and_softmax_keeps_top_k():
    feats, attn, q = _inputs()
    k = 20
    out = score_tokens(feats, attn, q, mode="v2", k=k, temperature=SCORE_V2_TEMPERATURE)
    first = SCORE_V2_ATTN * attention_score(attn) + SCORE_V2_SIM * similarity_score(feats, q)
    d = F.cosine_similarity(feats, feats[top_k_indices(first, k)].mean(0)[None], dim=-1)
    raw = first - SCORE_V2_DIVERSITY * d
    assert torch.allclose(out.scores, torch.softmax(raw / SCORE_V2_TEMPERATURE, dim=0))
    assert torch.allclose(out.scores.sum(), torch.tensor(1.0))
    for kk in (1, 10, 20, 40):
        assert torch.equal(top_k_indices(out.scores, kk), top_k_indices(raw, kk))


def test_diversity_penalises_tokens_like_the_provisional_set():
    feats = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0]])
    d = diversity_score(feats, torch.tensor([0, 1]))
    assert d[0] > d[2] and d[1] > d[2]


def test_question_changes_kept_set():
    # half the tokens point along e0, half along e1; attention is flat so only s ranks
    m = 16
    feats = torch.zeros(m, 2)
    feats[: m // 2, 0] = 1.0
    feats[m // 2 :, 1] = 1.0
    attn = torch.ones(m)
    for mode in ("v1", "v2", "sim"):
        keep0 = top_k_indices(score_tokens(feats, attn, torch.tensor([1.0, 0.0]), mode=mode, k=8).scores, 8)
        keep1 = top_k_indices(score_tokens(feats, attn, torch.tensor([0.0, 1.0]), mode=mode, k=8).scores, 8)
        assert torch.equal(keep0, torch.arange(8))
        assert torch.equal(keep1, torch.arange(8, 16))


@pytest.mark.parametrize("mode", ["sim", "v1", "v2"])
def test_no_question_falls_back_to_attention_with_note(mode):
    feats, attn, _ = _inputs()
    out = score_tokens(feats, attn, None, mode=mode)
    assert out.note == NO_QUESTION_NOTE
    assert torch.equal(out.scores, attention_score(attn))
    assert score_tokens(feats, attn, None, mode="attn").note is None


def test_random_is_seeded():
    feats, attn, q = _inputs()
    a = score_tokens(feats, attn, q, mode="random", seed=3).scores
    assert torch.equal(a, score_tokens(feats, None, None, mode="random", seed=3).scores)
    assert not torch.equal(a, score_tokens(feats, attn, q, mode="random", seed=4).scores)


def test_errors():
    feats, attn, q = _inputs()
    with pytest.raises(InputError, match="valid: attn, sim, v1, v2, random"):
        score_tokens(feats, attn, q, mode="bogus")
    for mode in set(SCORE_MODES) - {"random", "sim"}:
        with pytest.raises(InputError, match="attn_received is None"):
            score_tokens(feats, None, q, mode=mode)
    assert torch.equal(score_tokens(feats, None, q, mode="sim").scores, similarity_score(feats, q))
    with pytest.raises(InputError, match="attn_received is None"):
        score_tokens(feats, None, None, mode="sim")  # the fallback needs attention
    with pytest.raises(InputError, match="temperature"):
        score_tokens(feats, attn, q, mode="v2", k=4, temperature=0.0)
    with pytest.raises(ValueError, match="dim"):
        score_tokens(feats, attn, torch.ones(3), mode="v1")
