"""The training-free pruning baselines inside the real (small) model and through the CLI:
budgeted counts, seed determinism, raster order, TopV's in-LM cache shape, autograd safety."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from llava.constants import TOKEN_BUDGET
from llava.conversation import build_prompt
from llava.mm_utils import tokenizer_image_token
from llava.model.llava_arch import build_prefill_hook
from shirg_patches import REGISTRY
from shirg_patches.baselines.topv import TopVOptions

BASELINES = [name for name, m in REGISTRY.items() if m.budgeted]
FAST = ("--gen-length", "8", "--steps", "4")
QUESTION = "what is the color of the circle"
CANDIDATES_100 = 729 + 28 * 27  # global 27x27 + unpadded 1x2 tile grid of a 100x100 image


def noise(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def image():
    return noise(100, 100, seed=2)


@pytest.fixture
def cli(run_cli, tmp_path):
    """The CLI on a 100x100 noise image with a short answer."""
    path = tmp_path / "img.png"
    noise(100, 100, seed=2).save(path)
    return lambda *argv: run_cli("--image", path, *FAST, *argv)


def kept_indices(tok, model, image, method, options):
    """The kept candidate indices; TopV chooses inside the LM, so run its prefill."""
    ids = tokenizer_image_token(build_prompt(QUESTION), tok)
    q = tok(QUESTION, add_special_tokens=False).input_ids
    with torch.no_grad():
        v = model.encode_image(image, method, q, dict(options))
        if v.context is not None:
            embeds, spans = model.prepare_inputs_embeds(ids, [v])
            model.model.prefill(embeds, build_prefill_hook([v], spans, model.config.llada.n_layers))
    return v


def test_baselines_are_registered():
    for name in BASELINES:
        assert REGISTRY[name].select is not None


# ---- through the CLI -----------------------------------------------------------------------------
@pytest.mark.parametrize("method", BASELINES)
def test_cli_prints_default_budget(cli, method):
    code, out, err = cli("--prune_method", method)
    assert code == 0, err
    assert f"visual tokens: {TOKEN_BUDGET}  (method {method}, candidates {CANDIDATES_100}" in out


@pytest.mark.parametrize("method", BASELINES)
def test_cli_budget_500(cli, method):
    code, out, err = cli("--prune_method", method, "--budget", "500", "--json")
    assert code == 0, err
    r = json.loads(out)
    assert r["visual_tokens"] == 500 and r["candidates"] == CANDIDATES_100
    assert {"preprocess", "vision", "projector", "selection", "prefill", "steps"} <= set(r["timings_ms"])


@pytest.mark.parametrize("method", BASELINES)
def test_cli_same_seed_same_report(cli, method):
    def report(seed):
        code, out, _ = cli("--prune_method", method, "--seed", seed, "--json")
        assert code == 0
        r = json.loads(out)
        r.pop("timings_ms")
        return r

    assert report(7) == report(7)


# ---- at model level ------------------------------------------------------------------------------
@pytest.mark.parametrize("method", BASELINES)
def test_kept_is_deterministic_raster_and_budgeted(small_model, image, method):
    tok, model = small_model
    a = kept_indices(tok, model, image, method, {"seed": 3, "budget": 500})
    b = kept_indices(tok, model, image, method, {"seed": 3, "budget": 500})
    assert torch.equal(a.kept, b.kept)
    assert a.kept.numel() == 500 == a.lm_token_count
    assert bool((a.kept.diff() > 0).all()) and 0 <= a.kept[0] and a.kept[-1] < CANDIDATES_100
    if a.context is None:
        assert torch.equal(a.tokens, b.tokens) and a.tokens.shape[0] == 500


def test_random_depends_on_the_seed(small_model, image):
    tok, model = small_model
    a = kept_indices(tok, model, image, "random", {"seed": 0})
    b = kept_indices(tok, model, image, "random", {"seed": 1})
    assert not torch.equal(a.kept, b.kept)


@pytest.mark.parametrize("budget", [None, 500])
def test_topv_prunes_only_later_layers_of_the_cache(small_model, image, budget):
    tok, model = small_model
    ids = tokenizer_image_token(build_prompt(QUESTION), tok)
    options = {"seed": 0} if budget is None else {"seed": 0, "budget": budget}
    budget = budget or TOKEN_BUDGET
    q = tok(QUESTION, add_special_tokens=False).input_ids
    out = model.generate(ids, [image], prune_method="topv", question_ids=q,
                         prune_options=options, gen_length=4, block_length=4, steps=2)
    v = out.visual[0]
    prompt = out.prompt_length
    assert v.candidates == CANDIDATES_100 and v.tokens.shape[0] == CANDIDATES_100  # all enter the prompt
    assert v.lm_token_count == budget and v.kept.numel() == budget and bool((v.kept.diff() > 0).all())
    lengths = out.generation.prefix_cache.layer_lengths()
    assert len(lengths) == model.config.llada.n_layers > TopVOptions().layer + 1
    for layer, n in enumerate(lengths):
        assert n == (prompt if layer <= TopVOptions().layer else prompt - (CANDIDATES_100 - budget)), layer


@pytest.mark.parametrize("method", BASELINES)
def test_selection_works_with_autograd_on(small_model, image, method):
    """Training (LoRA on SigLIP/projector) encodes images with grad on: selection must not fail
    and the kept tokens must still carry the gradient back to the projector."""
    tok, model = small_model
    q = tok(QUESTION, add_special_tokens=False).input_ids
    v = model.encode_image(image, method, q, {"seed": 0})
    assert v.tokens.requires_grad
    if v.context is not None:  # TopV: its pre-LM fallback scores ctx.features (grad-carrying)
        kept = REGISTRY[method].select(v.context)
        assert kept.numel() == TOKEN_BUDGET
