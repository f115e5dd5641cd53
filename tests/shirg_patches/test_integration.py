"""SHIRG and the prune registry inside the real (small) model: token counts over image shapes,
question dependence, and prefix-cache safety of every registered method."""
import numpy as np
import pytest
import torch
from PIL import Image

from llava.constants import FOVEA_TOKENS, SHIRG_GLOBAL_TOKENS
from llava.conversation import build_prompt
from llava.errors import InputError
from llava.mm_utils import load_image, tokenizer_image_token
from llava.model.llava_arch import build_prefill_hook
from shirg_patches import REGISTRY, get_method
from shirg_patches.heatmap import save_heatmap

SIZES = [(14, 14), (14, 4000), (4000, 14), (100, 100), (300, 300), (447, 449), (448, 448), (640, 480),
         (768, 768), (1000, 800), (1280, 720), (2000, 600), (600, 2000), (3000, 3000)]
QUESTIONS = ["what is the color of the circle", "how many bars are there", "describe the picture", "red"]


def noise(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def qids(tok, q):
    return tok(q, add_special_tokens=False).input_ids


@pytest.fixture(scope="module")
def hd_image():
    return noise(768, 768)


# ---- the registry ---------------------------------------------------------------------------------
def test_unknown_method_lists_valid_names():
    with pytest.raises(InputError) as e:
        get_method("nope")
    msg = str(e.value)
    assert "'nope'" in msg and all(name in msg for name in REGISTRY)


def test_every_method_is_registered_with_a_summary():
    assert {"pool", "full", "shirg", "random", "stride", "saint", "topv", "visionzip", "divprune"} <= set(REGISTRY)
    for name, method in REGISTRY.items():
        assert method.name == name and method.summary.strip(), name


# ---- SHIRG token counts --------------------------------------------------------------------------
@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_shirg_is_980_for_every_size(small_model, size):
    tok, model = small_model
    image = load_image(noise(*size))
    with torch.no_grad():
        v = model.encode_image(image, "shirg", qids(tok, QUESTIONS[0]))
    assert v.lm_token_count == 980 == SHIRG_GLOBAL_TOKENS + 724
    assert v.tokens.shape == (980, model.config.llada.d_model)
    assert v.candidates == SHIRG_GLOBAL_TOKENS + FOVEA_TOKENS
    assert v.kept.numel() == 724 and bool((v.kept.diff() > 0).all())  # raster order, no duplicates
    left, top, right, bottom = v.info["fovea_box"]
    assert 0 <= left < right <= size[0] and 0 <= top < bottom <= size[1]
    if min(size) >= 448:  # native-resolution centre window
        assert (right - left, bottom - top) == (448, 448)
    else:
        assert (left, top, right, bottom) == (0, 0, *size)


@pytest.mark.parametrize("ratio, k", [(0.40, 410), (724 / 1024, 724), (0.766, 784), (0.80, 819)])
def test_keep_ratio_sets_k(small_model, hd_image, ratio, k):
    tok, model = small_model
    with torch.no_grad():
        v = model.encode_image(hd_image, "shirg", qids(tok, "red"), {"keep_ratio": ratio})
    assert v.kept.numel() == k and v.lm_token_count == 256 + k


def test_saliency_fovea_is_a_native_window_inside_the_image(small_model):
    tok, model = small_model
    image = noise(1280, 720, seed=3)
    with torch.no_grad():
        v = model.encode_image(image, "shirg", qids(tok, "red"), {"fovea": "saliency"})
    left, top, right, bottom = v.info["fovea_box"]
    assert (right - left, bottom - top) == (448, 448)
    assert 0 <= left and right <= 1280 and 0 <= top and bottom <= 720
    assert v.info["fovea"] == "saliency" and v.lm_token_count == 980


def test_heatmap_from_grad_carrying_model_outputs(small_model, tmp_path):
    """The training path encodes with grad on; the heat-map must draw those tensors as they are."""
    tok, model = small_model
    image = noise(640, 480)
    v = model.encode_image(image, "shirg", qids(tok, "red"))
    scores = v.tokens[256:, 0].detach().clone().requires_grad_(True)  # any grad-carrying per-kept value
    full = torch.zeros(FOVEA_TOKENS).index_put((v.kept,), scores)  # [1024], grad-carrying
    path = save_heatmap(tmp_path / "h.png", image, v.info["fovea_box"], v.kept, scores=full)
    with Image.open(path) as im:
        assert im.format == "PNG"


# ---- question dependence --------------------------------------------------------------------------
def _kept_sets(tok, model, image, score):
    with torch.no_grad():
        return {q: set(model.encode_image(image, "shirg", qids(tok, q), {"score": score}).kept.tolist())
                for q in QUESTIONS}


def test_sim_score_depends_on_the_question(small_model, hd_image):
    """With random weights the text term alone must still move the kept set a lot."""
    tok, model = small_model
    kept = _kept_sets(tok, model, hd_image, "sim")
    for i, a in enumerate(QUESTIONS):
        for b in QUESTIONS[i + 1:]:
            assert len(kept[a] ^ kept[b]) >= 100, (a, b)  # of 724 kept (observed >= 146 per side)


def test_v1_depends_on_the_question_but_attn_does_not(small_model, hd_image):
    """v1 = 0.7a + 0.3s is dominated by attention on random weights, yet s still flips tokens
    near the top-K boundary; `attn` alone ignores the question (the control)."""
    tok, model = small_model
    v1 = _kept_sets(tok, model, hd_image, "v1")
    assert any(v1[a] != v1[b] for i, a in enumerate(QUESTIONS) for b in QUESTIONS[i + 1:])
    assert v1[QUESTIONS[0]] != v1[QUESTIONS[1]]
    attn = _kept_sets(tok, model, hd_image, "attn")
    assert len({frozenset(s) for s in attn.values()}) == 1


def test_no_question_ranks_by_attention_alone(small_model, hd_image):
    tok, model = small_model
    with torch.no_grad():
        none = model.encode_image(hd_image, "shirg", None)
        attn = model.encode_image(hd_image, "shirg", qids(tok, "red"), {"score": "attn"})
    assert torch.equal(none.kept, attn.kept)
    assert "no question" in none.info["shirg_note"]


# ---- prefix-cache safety, every registered method ----------------------------------------------
@pytest.mark.parametrize("weights", ["small_model", "trained_model"])
@pytest.mark.parametrize("method", sorted(REGISTRY))
def test_prefix_cache_never_changes(request, weights, method):
    """The prompt K/V computed at prefill is bit-identical at every diffusion step, and equals a
    fresh prefill of the same prompt (so it is the prompt's cache, not a stale one); for the random-weight
    model and for the committed trained one."""
    tok, model = request.getfixturevalue(weights)
    q = QUESTIONS[0]
    ids = tokenizer_image_token(build_prompt(q), tok)
    image = noise(100, 100, seed=1)
    seen = {}

    def on_step(i, tokens, cache):
        assert cache is not None
        if not seen:
            seen["first"] = cache.clone()
            seen["obj"] = cache
        first = seen["first"]
        assert cache is seen["obj"]
        assert len(cache.keys) == len(first.keys) == model.config.llada.n_layers
        for layer, (k, v) in enumerate(zip(cache.keys, cache.values)):
            assert torch.equal(k, first.keys[layer]) and torch.equal(v, first.values[layer]), (i, layer)
        seen["steps"] = seen.get("steps", 0) + 1

    options = {"seed": 0}
    n_layers = model.config.llada.n_layers
    if getattr(get_method(method).options(), "layer", 0) >= n_layers - 1:  # in-LM pruning on a shallow LM
        options["layer"] = n_layers - 2
    out = model.generate(ids, [image], prune_method=method, question_ids=qids(tok, q), prune_options=options,
                         gen_length=8, block_length=4, steps=4, on_step=on_step)
    assert seen["steps"] == 4 == len(out.generation.step_seconds)
    assert out.generation.prefix_cache is seen["obj"]

    with torch.no_grad():
        embeds, spans = model.prepare_inputs_embeds(ids, out.visual)
        fresh = model.model.prefill(embeds, build_prefill_hook(out.visual, spans, model.config.llada.n_layers))
    for layer in range(len(fresh.keys)):
        assert torch.equal(fresh.keys[layer], seen["first"].keys[layer])
        assert torch.equal(fresh.values[layer], seen["first"].values[layer])
