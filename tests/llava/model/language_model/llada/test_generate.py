import pytest
import torch

from llava.errors import InputError
from llava.model.language_model.llada import generate as G
from llava.model.language_model.llada.configuration_llada import LLaDAConfig
from llava.model.language_model.llada.generate import generate, num_transfer_tokens, steps_per_block
from llava.model.language_model.llada.modeling_llada import LLaDAModel

MASK = 96


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = LLaDAConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden_size=128, vocab_size=97,
                      rope_theta=10000.0, mask_token_id=MASK, eos_token_id=95, pad_token_id=95)
    return LLaDAModel(cfg).eval()


@pytest.fixture
def prompt():
    return torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1))


# upstream's per-step transfer counts (its float32 arithmetic), step 0 first
SCHEDULE_TABLE = [
    (64, 32, None, None, [2] * 32),
    (64, 32, "shift", None,
     [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 1, 1, 2, 2, 1, 2, 2, 3, 2, 2, 3, 3, 4, 3, 4, 5, 5, 4]),
    (64, 32, "shift", 1 / 3,
     [6, 5, 5, 4, 3, 4, 3, 2, 3, 2, 3, 2, 2, 1, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]),
    (32, 16, "shift", 0.33, [6, 4, 4, 3, 2, 2, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1]),
    (32, 16, "shift", 1 / 3, [6, 4, 4, 2, 3, 2, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1]),
    (32, 16, "shift", 3, [1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 3, 4, 4, 5]),
    (32, 24, "shift", 0.33, [4, 3, 3, 2] + [1] * 20),
    (32, 8, "shift", 0.33, [10, 7, 4, 4, 2, 2, 2, 1]),
    (16, 8, "shift", 0.33, [5, 4, 2, 1, 1, 1, 1, 1]),
]


@pytest.mark.parametrize("m,steps,schedule,alpha,expected", SCHEDULE_TABLE)
def test_schedule_reference_vectors(m, steps, schedule, alpha, expected):
    kwargs = None if alpha is None else {"shift": alpha}
    assert num_transfer_tokens(m, steps, schedule, kwargs) == expected


@pytest.mark.parametrize("spelling", ["none", "None", "NONE"])
def test_schedule_none_spellings(spelling):
    assert num_transfer_tokens(37, 8, spelling) == num_transfer_tokens(37, 8, None) == [5] * 5 + [4] * 3


def test_default_block_length_is_used_when_none_is_given():
    assert steps_per_block(64, None) == 64 and steps_per_block(256, None) == 128
    assert steps_per_block(256, None, 64) == 32  # 64 steps over the 2 default blocks


def test_schedule_none_is_base_plus_remainder():
    assert num_transfer_tokens(10, 4) == [3, 3, 2, 2]
    assert num_transfer_tokens(0, 3) == [0, 0, 0]


@pytest.mark.parametrize("schedule", [None, "linear", "shift", "cosine", "logit_normal"])
@pytest.mark.parametrize("m,steps", [(1, 1), (7, 3), (16, 16), (32, 5), (64, 64), (4, 6)])
def test_schedules_unmask_everything(schedule, m, steps):
    counts = num_transfer_tokens(m, steps, schedule)
    assert len(counts) == steps and sum(counts) == m and min(counts) >= 0


def test_more_steps_than_masks_pads_zeros():
    assert num_transfer_tokens(4, 6, "linear") == [1, 1, 1, 1, 0, 0]
    assert num_transfer_tokens(4, 6, "cosine") == [1, 1, 1, 1, 0, 0]


def test_float32_shortfall_goes_to_last_step():
    # shift 0.1 gives f(1) = 0.99999976 in float32, so the truncated counts reach only m - 1
    counts = num_transfer_tokens(32, 4, "shift", {"shift": 0.1})
    assert sum(counts) == 32


def test_linear_schedule_name_uses_float_grid():
    # float32 t=1/3 times 6 is 1.9999999, truncated to 1: "linear" is not the even split of schedule=None
    assert num_transfer_tokens(6, 3) == [2, 2, 2]
    assert num_transfer_tokens(6, 3, "linear") == [3, 1, 2]


@pytest.mark.parametrize(
    "schedule,kwargs,msg",
    [("exponential", None, "linear, shift, cosine, logit_normal"), ("shift", {"alpha": 2}, "alpha"),
     ("shift", {"shift": 0}, "positive"), ("", None, "unknown --schedule ''; choose one of: none"),
     (None, {"shift": 2}, r"--shift only applies to --schedule shift \(the schedule is none\)"),
     ("cosine", {"shift": 2}, r"the schedule is cosine")],
)
def test_schedule_errors(schedule, kwargs, msg):
    with pytest.raises(InputError, match=msg):
        num_transfer_tokens(8, 4, schedule, kwargs)


@pytest.mark.parametrize(
    "kwargs,expected",
    [(dict(gen_length=64, block_length=64), 64), (dict(gen_length=128, block_length=32), 32),
     (dict(gen_length=64, block_length=64, step_ratio=0.5), 32),
     (dict(gen_length=32, block_length=32, step_ratio=0.5), 16),
     (dict(gen_length=64, block_length=32, step_ratio=0.3), 9),
     (dict(gen_length=64, block_length=32, step_per_block=8), 8),
     (dict(gen_length=64, block_length=32, step_per_block=100), 32),
     (dict(gen_length=128, block_length=32, steps=64), 16),
     (dict(gen_length=64, block_length=64, steps=64), 64)],
)
def test_steps_per_block(kwargs, expected):
    assert steps_per_block(**kwargs) == expected


@pytest.mark.parametrize(
    "kwargs,msg",
    [(dict(gen_length=100, block_length=32), "--gen-length 100 is not divisible by --block-length 32"),
     (dict(gen_length=64, block_length=32, steps=8, step_ratio=0.5), "at most one"),
     (dict(gen_length=64, block_length=32, step_per_block=8, step_ratio=0.5), "at most one"),
     (dict(gen_length=64, block_length=16, steps=10), "divisible by the 4 block"),
     (dict(gen_length=64, block_length=64, steps=128), "between 1 and --gen-length 64"),
     (dict(gen_length=64, block_length=64, steps=0), "--steps 0"),
     (dict(gen_length=64, block_length=32, step_ratio=0.01), "--step-ratio"),
     (dict(gen_length=64, block_length=32, step_ratio=1.5), "--step-ratio"),
     (dict(gen_length=64, block_length=32, step_per_block=0), "--step-per-block"),
     (dict(gen_length=200, block_length=None), r"--gen-length 200 is not a multiple of the default block length 128 "
                                               r"\(no --block-length was given\).*e\.g\. --block-length 100"),
     (dict(gen_length=0, block_length=None), "--gen-length must be positive, got 0")],
)
def test_steps_per_block_errors(kwargs, msg):
    with pytest.raises(InputError, match=msg):
        steps_per_block(**kwargs)


def test_prefix_cache_stays_bit_identical(model, prompt):
    reference = model.prefill(prompt).clone()
    seen = []

    def check(step, tokens, cache):
        seen.append(step)
        assert all(torch.equal(a, b) for a, b in zip(cache.keys, reference.keys))
        assert all(torch.equal(a, b) for a, b in zip(cache.values, reference.values))

    out = generate(model, prompt, gen_length=8, block_length=4, on_step=check)
    assert seen == list(range(8)) and out.nfe == 9 and len(out.step_seconds) == 8
    assert all(torch.equal(a, b) for a, b in zip(out.prefix_cache.keys + out.prefix_cache.values,
                                                 reference.keys + reference.values))
    assert out.tokens.shape == (2, 8) and not (out.tokens == MASK).any()


def test_cached_first_step_uses_model_step(model, prompt):
    """The first committed token of a cached run is the argmax of one cached forward over all-mask slots."""
    out = generate(model, prompt, gen_length=4, block_length=4, step_per_block=4)
    with torch.no_grad():
        logits = model(model.embed_tokens(torch.full((2, 4), MASK)), prefix_cache=model.prefill(prompt))
    p = logits.double().softmax(-1)
    conf, x0 = p.max(-1)
    first = conf.argmax(-1)
    assert torch.equal(out.tokens[torch.arange(2), first], x0[torch.arange(2), first])


def test_full_mode_accounting(model, prompt):
    seen = []
    out = generate(model, prompt, gen_length=8, block_length=4, step_ratio=0.5, prefix_cache=False,
                   on_step=lambda i, t, c: seen.append(c))
    assert out.nfe == 4 and out.prefix_cache is None and out.prefill_seconds == 0.0 and seen == [None] * 4
    assert out.tokens.shape == (2, 8) and not (out.tokens == MASK).any()
    cached = generate(model, prompt, gen_length=8, block_length=4, step_ratio=0.5)
    assert cached.nfe == 5 and cached.prefill_seconds > 0


def test_steps_argument(model, prompt):
    out = generate(model, prompt, gen_length=8, block_length=4, steps=4)
    assert out.nfe == 5


def test_temperature_reproducible(model, prompt):
    run = lambda seed: generate(model, prompt, gen_length=8, block_length=8, temperature=1.0,
                                generator=torch.Generator().manual_seed(seed)).tokens
    assert torch.equal(run(3), run(3))
    greedy = generate(model, prompt, gen_length=8, block_length=8).tokens
    assert any(not torch.equal(run(s), greedy) for s in range(4))


@pytest.mark.parametrize("remasking", ["low_confidence", "random", "entropy", "entrophy", "margin"])
@pytest.mark.parametrize("schedule", [None, "shift"])
def test_remasking_respects_blocks(model, prompt, remasking, schedule):
    block, S = 4, 2
    expected = num_transfer_tokens(block, S, schedule)
    history = []
    out = generate(model, prompt, gen_length=12, block_length=block, step_per_block=S, remasking=remasking,
                   schedule=schedule, generator=torch.Generator().manual_seed(0),
                   on_step=lambda i, t, c: history.append(t.clone()))
    assert len(history) == 6 and out.nfe == 7
    for step, tokens in enumerate(history):
        b, i = divmod(step, S)
        masked = (tokens == MASK).view(2, 3, block)
        assert not masked[:, :b].any()  # earlier blocks final
        assert masked[:, b + 1 :].all()  # later blocks untouched
        assert ((~masked[:, b]).sum(-1) == sum(expected[: i + 1])).all()
    # committed tokens never change
    for before, after in zip(history, history[1:]):
        kept = before != MASK
        assert torch.equal(before[kept], after[kept])


def test_step_skipped_when_block_done(model, prompt, monkeypatch):
    monkeypatch.setattr(G, "num_transfer_tokens", lambda m, steps, *a: [m] + [0] * (steps - 1))
    out = generate(model, prompt, gen_length=8, block_length=4)
    assert out.nfe == 1 + 2 and not (out.tokens == MASK).any()


def test_prune_hook_through_generate(model, prompt):
    hook = lambda layer, h_in, h_out, pos: torch.tensor([0, 2, 4]) if layer == 0 else None
    out = generate(model, prompt, gen_length=4, block_length=4, prune_hook=hook)
    assert out.prefix_cache.layer_lengths() == [5, 3] and out.prefix_cache.prefix_length == 5
    assert out.nfe == 5 and not (out.tokens == MASK).any()


@pytest.mark.parametrize(
    "kwargs,msg",
    [(dict(remasking="top_p"), "low_confidence, random, entropy, margin"),
     (dict(schedule="quadratic"), "linear, shift"),
     (dict(temperature=-1.0), "temperature"), (dict(prefix_cache=False, prune_hook=lambda *a: None), "prefix cache"),
     (dict(gen_length=6, block_length=4), "--gen-length 6 is not divisible by --block-length 4")],
)
def test_generate_input_errors(model, prompt, kwargs, msg):
    with pytest.raises(InputError, match=msg):
        generate(model, prompt, **{"gen_length": 4, "block_length": 4, **kwargs})
