"""The multimodal glue through the model: token counts (upstream arithmetic), newline placement, pooling switch,
prompt splicing, prompt tokenisation, end-to-end generation with the prefix cache."""
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from llava.constants import IMAGE_TOKEN_INDEX
from llava.conversation import build_prompt
from llava.errors import ConfigError, InputError
from llava.mm_utils import process_anyres_image, tokenizer_image_token
from llava.model.builder import small_model_config
from llava.model.language_model.llava_llada import LlavaLLaDAConfig, LlavaLLaDAForCausalLM
from llava.model.llava_arch import POOL_ENV, MultimodalConfig, VisualTokens, pool_2d, resolve_pooling
from shirg_patches import REGISTRY


def noise_image(size, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def build_variant(tokenizer, **overrides):
    """A model from `small_model_config` with the vision tower and LM shrunk further.

    Token geometry (384² views, 14 px patches, 27x27 grid, pinpoints) is untouched, so counts are the
    real ones; only widths/depths shrink to keep 14 any-res encodes fast.
    """
    cfg = small_model_config(tokenizer)
    cfg["vision_config"].update(hidden_size=16, num_hidden_layers=2, num_attention_heads=1, intermediate_size=16)
    cfg.update(mm_hidden_size=16, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, mlp_hidden_size=32)
    cfg.update(overrides)
    torch.manual_seed(0)
    return LlavaLLaDAForCausalLM(LlavaLLaDAConfig.from_dict(cfg)).eval()


@pytest.fixture(scope="module")
def geometry_model(small_tokenizer):
    return build_variant(small_tokenizer)


@pytest.fixture(autouse=True)
def no_pool_env(monkeypatch):
    monkeypatch.delenv(POOL_ENV, raising=False)


def count(model, size, method, **kw):
    with torch.no_grad():
        return model.encode_image(Image.new("RGB", size), method, **kw).tokens.shape[0]


# ---------------------------------------------------------------------------------------------
# token counts through the model (spec 4.5)
# ---------------------------------------------------------------------------------------------
COUNT_TABLE = {
    (768, 768): (1008, 3699),
    (640, 480): (834, 2929),
    (300, 300): (406, 1513),
    (1000, 500): (602, 2214),
    (1200, 400): (798, 2943),
    (2000, 600): (712, 2779),
    (600, 2000): (742, 2835),
}


@pytest.mark.shapes
@pytest.mark.parametrize("size", list(COUNT_TABLE), ids=lambda s: f"{s[0]}x{s[1]}")
def test_token_counts_through_model(geometry_model, size):
    pooled, unpooled = COUNT_TABLE[size]
    assert count(geometry_model, size, "pool") == pooled
    assert count(geometry_model, size, "full") == unpooled


@pytest.mark.shapes
def test_small_model_square_hd_counts_and_width(small_model):
    _, model = small_model
    with torch.no_grad():
        tokens = model.encode_image(Image.new("RGB", (768, 768)), "pool").tokens
    assert tuple(tokens.shape) == (1008, model.config.llada.d_model)


@pytest.mark.shapes
def test_flat_merge_gives_paper_counts(small_tokenizer):
    model = build_variant(small_tokenizer, mm_patch_merge_type="flat")
    assert not hasattr(model.model, "image_newline")
    assert "model.image_newline" not in model.state_dict()
    assert count(model, (768, 768), "pool") == 980  # 5 x 196
    assert count(model, (768, 768), "full") == 3645  # 5 x 729


@pytest.mark.shapes
@pytest.mark.parametrize("aspect", ["square", "pad"])
def test_single_view_aspects_give_729_and_reject_pruning(small_tokenizer, aspect):
    """Stage-1 / low-res settings: one 384² view, no pooling or merge (spec 4.3, last bullet).
    SHIRG brings its own views, so it is unaffected; baselines prune any-res tokens, so they refuse."""
    model = build_variant(small_tokenizer, image_aspect_ratio=aspect)
    for size in [(768, 768), (1000, 300), (100, 400)]:
        assert count(model, size, "pool") == 729
    assert count(model, (768, 768), "shirg") == 980
    with pytest.raises(InputError, match="anyres"):
        count(model, (768, 768), "random")


@pytest.mark.shapes
def test_single_view_pools_only_with_explicit_mm_2d_pool(small_tokenizer):
    """This project's `mm_2d_pool: true` pools the single view to 14x14 = 196 (a cheaper curriculum stage); the
    pooled tokens are exactly pool_2d of the unpooled view's, and null (every upstream config) keeps 729."""
    plain = build_variant(small_tokenizer, image_aspect_ratio="pad")
    pooled = build_variant(small_tokenizer, image_aspect_ratio="pad", mm_2d_pool=True)
    pooled.load_state_dict(plain.state_dict())
    image = Image.new("RGB", (500, 300), (200, 30, 30))
    with torch.no_grad():
        full = plain.encode_image(image, "pool")
        small = pooled.encode_image(image, "pool")
    assert full.tokens.shape[0] == 729 and small.tokens.shape[0] == 196
    assert small.view_shapes == [(14, 14)] and "mm_2d_pool" in small.info["pooling"]
    assert torch.equal(small.tokens, pool_2d(full.tokens[None], "bilinear")[0])


@pytest.mark.shapes
def test_pooled_layout_and_newlines(small_model):
    """[global view 14x14 ; unpadded 28x28 tile map, each kept row followed by image_newline]."""
    _, model = small_model
    image = noise_image((640, 480))
    with torch.no_grad():
        tokens = model.encode_image(image, "pool").tokens
        pixels = process_anyres_image(image, model.mm_config.image_grid_pinpoints, 384)
        proj = model.model.mm_projector(model.model.vision_tower(pixels).features)  # [5, 729, D]
    d = proj.shape[-1]
    pooled = F.interpolate(proj.view(5, 27, 27, d).permute(0, 3, 1, 2), size=(14, 14), mode="bilinear",
                           align_corners=False).permute(0, 2, 3, 1)  # [5, 14, 14, D]
    tile_map = torch.zeros(28, 28, d)
    for r in range(2):
        for c in range(2):
            tile_map[r * 14:(r + 1) * 14, c * 14:(c + 1) * 14] = pooled[1 + 2 * r + c]
    kept = tile_map[3:25]  # 640x480 on a 768² canvas: new_h = int(480*28/640) = 21, pad 3 -> 22 rows
    newline = model.model.image_newline.detach()

    assert tokens.shape[0] == 196 + 22 * 29 == 834
    torch.testing.assert_close(tokens[:196], pooled[0].reshape(196, d), rtol=1e-6, atol=1e-6)
    grid = tokens[196:].view(22, 29, d)
    assert all(torch.equal(grid[r, 28], newline) for r in range(22))
    torch.testing.assert_close(grid[:, :28], kept, rtol=1e-6, atol=1e-6)
    is_newline = (tokens == newline).all(-1)
    assert is_newline.nonzero().flatten().tolist() == [196 + 29 * r + 28 for r in range(22)]


# ---------------------------------------------------------------------------------------------
# the pooling switch
# ---------------------------------------------------------------------------------------------
def test_resolve_pooling_precedence(monkeypatch):
    assert resolve_pooling() == (True, "pooling on (LaViDa default)")
    assert resolve_pooling(config_value=False)[0] is False
    assert resolve_pooling(config_value=True)[0] is True
    monkeypatch.setenv(POOL_ENV, "")
    assert resolve_pooling()[0] is True  # empty counts as unset
    assert resolve_pooling(config_value=False)[0] is False
    monkeypatch.setenv(POOL_ENV, "1")
    assert resolve_pooling(explicit=True)[0] is True  # explicit flag beats the env
    assert resolve_pooling(config_value=True)[0] is False  # env beats the config
    monkeypatch.delenv(POOL_ENV)
    assert resolve_pooling(explicit=False, config_value=True)[0] is False


@pytest.mark.parametrize("value", ["1", "0", "false", "no"])
def test_any_non_empty_env_disables_pooling(monkeypatch, value):
    monkeypatch.setenv(POOL_ENV, value)
    pool, reason = resolve_pooling()
    assert pool is False and POOL_ENV in reason and repr(value) in reason
    warns_about_false_looking = "still DISABLES pooling" in reason
    assert warns_about_false_looking == (value != "1")


def test_env_read_at_call_time(monkeypatch):
    assert resolve_pooling()[0] is True
    monkeypatch.setenv(POOL_ENV, "1")
    assert resolve_pooling()[0] is False
    monkeypatch.delenv(POOL_ENV)
    assert resolve_pooling()[0] is True


@pytest.mark.shapes
def test_methods_and_the_pooling_env(geometry_model, monkeypatch):
    size = (300, 300)  # 406 pooled / 1513 unpooled, 3 views: the cheapest any-res image
    assert count(geometry_model, size, "lavida") == 406
    monkeypatch.setenv(POOL_ENV, "0")
    assert count(geometry_model, size, "lavida") == 1513
    assert count(geometry_model, size, "pool") == 406  # the method decides, env ignored
    assert count(geometry_model, size, "lavida", pool=True) == 406  # explicit flag wins
    monkeypatch.delenv(POOL_ENV)
    assert count(geometry_model, size, "full") == 1513
    assert count(geometry_model, size, "lavida", pool=False) == 1513
    with pytest.raises(InputError, match="--prune_method pool"):
        count(geometry_model, size, "pool", pool=False)
    with pytest.raises(InputError, match="--prune_method full"):
        count(geometry_model, size, "full", pool=True)


@pytest.mark.shapes
def test_config_mm_2d_pool(small_tokenizer, monkeypatch):
    model = build_variant(small_tokenizer, mm_2d_pool=False)
    assert count(model, (300, 300), "lavida") == 1513
    monkeypatch.setenv(POOL_ENV, "1")
    assert count(build_variant(small_tokenizer, mm_2d_pool=True), (300, 300), "lavida") == 1513


# ---------------------------------------------------------------------------------------------
# prompt splicing
# ---------------------------------------------------------------------------------------------
def visual(n, d, seed):
    return VisualTokens(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), "pool", n)


@pytest.mark.shapes
def test_prepare_inputs_embeds_splices_images(small_model):
    _, model = small_model
    wte = model.model.transformer.wte.weight
    d = wte.shape[1]
    a, b = visual(7, d, 1), visual(3, d, 2)
    ids = [0, 11, 12, IMAGE_TOKEN_INDEX, 13, IMAGE_TOKEN_INDEX, 14, 15]
    with torch.no_grad():
        embeds, spans = model.prepare_inputs_embeds(torch.tensor(ids), [a, b])
    assert tuple(embeds.shape) == (1, 3 + 7 + 1 + 3 + 2, d)
    assert spans == [(3, 10), (11, 14)]
    e = embeds[0]
    assert torch.equal(e[:3], wte[[0, 11, 12]])
    assert torch.equal(e[3:10], a.tokens)
    assert torch.equal(e[10], wte[13])
    assert torch.equal(e[11:14], b.tokens)
    assert torch.equal(e[14:], wte[[14, 15]])


@pytest.mark.shapes
def test_prepare_inputs_embeds_truncates_text_with_warning(small_model, monkeypatch, caplog):
    _, model = small_model
    d = model.config.llada.d_model
    monkeypatch.setattr(model.mm_config, "tokenizer_model_max_length", 11)
    ids = [0, 11, IMAGE_TOKEN_INDEX, 12, IMAGE_TOKEN_INDEX, 13, 14, 15]
    a, b = visual(5, d, 1), visual(2, d, 2)
    with caplog.at_level(logging.WARNING, logger="llava"), torch.no_grad():
        embeds, spans = model.prepare_inputs_embeds(ids, [a, b])
    assert embeds.shape[1] == 11
    assert spans == [(2, 7), (8, 10)]  # both images whole; only the trailing text is cut
    assert torch.equal(embeds[0, 2:7], a.tokens) and torch.equal(embeds[0, 8:10], b.tokens)
    assert any("truncated" in r.getMessage() and "11" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("limit", [6, 9, 2])  # cuts the first image / the second image / drops both
def test_prepare_inputs_embeds_refuses_to_cut_image_tokens(small_model, monkeypatch, limit):
    """Upstream cuts silently; here the LM would see fewer visual tokens than reported, so it is an error."""
    _, model = small_model
    d = model.config.llada.d_model
    monkeypatch.setattr(model.mm_config, "tokenizer_model_max_length", limit)
    ids = [0, 11, IMAGE_TOKEN_INDEX, 12, IMAGE_TOKEN_INDEX, 13]
    with pytest.raises(InputError, match=rf"prompt is 11 tokens \(7 of them visual\) .* is {limit}: truncating "
                                         "would cut into the image tokens"):
        model.prepare_inputs_embeds(ids, [visual(5, d, 1), visual(2, d, 2)])


def test_generate_refuses_a_limit_that_cuts_the_image(small_tokenizer):
    """Through `generate`: tokenizer_model_max_length 300 < the 1008 pooled tokens of a square HD image."""
    model = build_variant(small_tokenizer, tokenizer_model_max_length=300)
    ids = tokenizer_image_token(build_prompt("What is it?"), small_tokenizer)
    with pytest.raises(InputError, match=r"\(1008 of them visual\).*tokenizer_model_max_length is 300"):
        model.generate(ids, [noise_image((768, 768))], prune_method="pool", gen_length=4, block_length=4)


@pytest.mark.parametrize("key, value, message", [
    ("tokenizer_model_max_length", 0, "'tokenizer_model_max_length' must be a positive integer, got 0"),
    ("tokenizer_model_max_length", -1, "'tokenizer_model_max_length' must be a positive integer, got -1"),
    ("tokenizer_model_max_length", "4096", "'tokenizer_model_max_length' must be a positive integer"),
    ("mm_hidden_size", True, "'mm_hidden_size' must be a positive integer"),
    ("mm_projector_type", 2, "'mm_projector_type' must be a string"),
    ("mm_2d_pool", "yes", "'mm_2d_pool' must be true, false or null"),
    ("vision_config", [64], "'vision_config' must be an object"),
    ("image_grid_pinpoints", [[384]], r"'image_grid_pinpoints' must be a non-empty list of \[width, height\]"),
    ("image_grid_pinpoints", [[384, 0]], "'image_grid_pinpoints'"),
    ("image_grid_pinpoints", [], "'image_grid_pinpoints'"),
    ("image_grid_pinpoints", 384, "'image_grid_pinpoints'"),
    ("image_grid_pinpoints", "[(384, 768),", "'image_grid_pinpoints'"),
])
def test_multimodal_config_values_checked_at_load(key, value, message):
    with pytest.raises(ConfigError, match=message):
        MultimodalConfig.from_dict({key: value})


def test_pinpoints_as_upstream_string_and_integral_floats():
    assert MultimodalConfig.from_dict({"image_grid_pinpoints": "[(384, 768), (768, 768)]"}).image_grid_pinpoints \
        == [(384, 768), (768, 768)]
    assert MultimodalConfig.from_dict({"image_grid_pinpoints": [[768.0, 384]]}).image_grid_pinpoints == [(768, 384)]


def test_prepare_inputs_embeds_count_mismatch(small_model):
    _, model = small_model
    d = model.config.llada.d_model
    with pytest.raises(InputError, match="1 <image> placeholders but 2 images"):
        model.prepare_inputs_embeds([0, IMAGE_TOKEN_INDEX, 5], [visual(2, d, 0), visual(2, d, 1)])
    with pytest.raises(InputError, match="0 <image> placeholders but 1 images"):
        model.prepare_inputs_embeds([0, 5], [visual(2, d, 0)])


def test_prepare_inputs_embeds_one_prompt_only(small_model):
    _, model = small_model
    with pytest.raises(InputError, match=r"one non-empty prompt.*\(2, 3\)"):
        model.prepare_inputs_embeds(torch.tensor([[0, 5, 6], [0, 7, 8]]), [])
    with pytest.raises(InputError, match="one non-empty prompt"):
        model.prepare_inputs_embeds([], [])
    with torch.no_grad():
        embeds, spans = model.prepare_inputs_embeds(torch.tensor([[0, 5, 6]]), [])
    assert tuple(embeds.shape) == (1, 3, model.config.llada.d_model) and spans == []


# ---------------------------------------------------------------------------------------------
# prompt tokenisation (upstream quirk) and question embedding
# ---------------------------------------------------------------------------------------------
def test_prompt_tokenisation_drops_newline_after_image(small_tokenizer):
    tok = small_tokenizer
    prompt = build_prompt("What is the color?")
    ids = tokenizer_image_token(prompt, tok)
    assert ids[0] == tok.bos_token_id == tok.convert_tokens_to_ids("<|startoftext|>")
    assert ids.count(IMAGE_TOKEN_INDEX) == 1
    head, tail = prompt.split("<image>")
    head_ids = tok(head, add_special_tokens=False).input_ids
    tail_ids = tok(tail, add_special_tokens=False).input_ids
    assert tok.decode(tail_ids[:1]) == "\n"  # the token upstream drops
    assert ids == head_ids + [IMAGE_TOKEN_INDEX] + tail_ids[1:]
    assert tok.decode(ids[len(head_ids) + 1:]) == tail[1:]  # everything after the newline survives
    assert tail[1:].startswith("What is the color?<|eot_id|>") and tail.endswith("assistant<|end_header_id|>\n\n")


def test_question_embedding(small_model):
    _, model = small_model
    wte = model.model.transformer.wte.weight
    q = model.question_embedding([3, 5, 7, 5])
    torch.testing.assert_close(q, wte[[3, 5, 7, 5]].mean(0), rtol=0, atol=0)
    assert q.dtype == torch.float32 and q.shape == (wte.shape[1],)
    assert model.question_embedding([]) is None
    assert model.question_embedding(None) is None


# ---------------------------------------------------------------------------------------------
# end to end
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def e2e_prompt(small_tokenizer):
    return torch.tensor(tokenizer_image_token(build_prompt("What is the color?"), small_tokenizer))


@pytest.mark.parametrize("method, image_tokens", [("pool", 406), ("full", 1513)])
def test_generate_end_to_end(small_model, e2e_prompt, method, image_tokens):
    tok, model = small_model
    image = noise_image((300, 300), seed=3)
    first = {}

    def on_step(i, tokens, cache):
        if i == 0:
            first["cache"] = cache.clone()
            first["cache_obj"] = cache
        assert cache is first["cache_obj"]
        for a, b in zip(cache.keys + cache.values, first["cache"].keys + first["cache"].values):
            assert torch.equal(a, b)
        first.setdefault("steps", []).append(i)

    out = model.generate(e2e_prompt, [image], prune_method=method, gen_length=8, block_length=8, steps=4,
                         on_step=on_step)
    text_tokens = e2e_prompt.numel() - 1
    assert out.prompt_length == text_tokens + image_tokens
    assert out.visual[0].tokens.shape[0] == image_tokens
    assert tuple(out.tokens.shape) == (1, 8)
    assert not (out.tokens == tok.mask_token_id).any()
    assert out.generation.nfe == 5 and first["steps"] == [0, 1, 2, 3]
    cache = out.generation.prefix_cache
    assert cache.prefix_length == out.prompt_length
    assert all(k.shape[2] == out.prompt_length for k in cache.keys)

    again = model.generate(e2e_prompt, [image], prune_method=method, gen_length=8, block_length=8, steps=4)
    assert torch.equal(again.tokens, out.tokens)  # temperature 0 is deterministic


def test_generate_without_prefix_cache(small_model, e2e_prompt):
    tok, model = small_model
    seen = []
    out = model.generate(e2e_prompt, [noise_image((300, 300), seed=3)], prune_method="pool", gen_length=8,
                         block_length=8, steps=4, prefix_cache=False, on_step=lambda i, t, c: seen.append(c))
    assert out.generation.nfe == 4 and seen == [None] * 4  # no prefill pass
    assert out.generation.prefix_cache is None and out.generation.prefill_seconds == 0.0
    assert tuple(out.tokens.shape) == (1, 8) and not (out.tokens == tok.mask_token_id).any()


# ---- training needs gradients through every method's selection ----------------------------------------------
@pytest.mark.parametrize("method", sorted(REGISTRY))
def test_backward_through_selection_reaches_projector_and_tower(small_model, method):
    """A loss on the selected visual tokens back-propagates through the selection (indices carry no
    gradient, the kept tokens do) into the projector and the SigLIP tower, for every method."""
    tok, model = small_model
    model.zero_grad(set_to_none=True)
    q = tok("what colour is the square", add_special_tokens=False).input_ids
    v = model.encode_image(noise_image((500, 400), seed=3), method, q, {"seed": 0})
    target = torch.randn(v.tokens.shape, generator=torch.Generator().manual_seed(0))
    F.mse_loss(v.tokens, target).backward()
    for name in ("mm_projector.0.weight", "mm_projector.2.weight",
                 "vision_tower.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight"):
        grad = model.model.get_parameter(name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, (method, name)
    model.zero_grad(set_to_none=True)
