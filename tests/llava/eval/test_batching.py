"""Batched greedy generation equals batch 1 for every registered prune method: the same answer tokens and the
same canvas after every diffusion step, with prompts of different lengths (different images and questions) in
one batch, with the prefix cache (and without it for a pooled, an unpooled and a budgeted method)."""
import pytest
import torch
from PIL import Image, ImageDraw

from llava.conversation import build_prompt
from llava.mm_utils import tokenizer_image_token
from shirg_patches import REGISTRY, get_method

QUESTIONS = ("What is the value of the tallest bar?", "Which colour is it?", "How many shapes are there?")
SIZES = ((420, 300), (300, 460), (380, 380))
UNCACHED_TOO = ("pool", "full", "shirg")


def images():
    out = []
    for k, size in enumerate(SIZES):
        im = Image.new("RGB", size, (250 - 40 * k, 240, 230))
        d = ImageDraw.Draw(im)
        for j in range(5):
            d.rectangle([20 + 60 * j, 40 + 15 * k, 60 + 60 * j, size[1] - 30], fill=(40 * j, 90 + 50 * k, 200 - 30 * j))
        out.append(im)
    return out


def run_single(model, ids, image, qids, method, **kw):
    steps = []
    out = model.generate(ids, [image], prune_method=method, question_ids=qids, prune_options={"seed": 3},
                         on_step=lambda i, t, c: steps.append(t[0].clone()), **kw)
    return out, steps


@pytest.mark.parametrize("method", sorted(REGISTRY))
def test_batch_equals_batch_1_every_method(sharp_model, method):
    tok, model = sharp_model
    ims = images()
    ids = [tokenizer_image_token(build_prompt(q), tok) for q in QUESTIONS]
    qids = [tok(q, add_special_tokens=False).input_ids for q in QUESTIONS]
    # the uncached (full recompute) ragged path does not depend on the method: three methods cover it
    caches = (True, False) if method in UNCACHED_TOO else (True,)
    for prefix_cache in caches:
        kw = dict(gen_length=4, block_length=2, steps=4, prefix_cache=prefix_cache, temperature=0.0)
        batch_steps = []
        outs = model.generate_batch(ids, [[im] for im in ims], prune_method=method, question_ids=qids,
                                    prune_options={"seed": 3},
                                    on_step=lambda i, t, c: batch_steps.append(t.clone()), **kw)
        singles = [run_single(model, i, im, q, method, **kw) for i, im, q in zip(ids, ims, qids)]
        for b, (out, (ref, ref_steps)) in enumerate(zip(outs, singles)):
            assert torch.equal(out.tokens, ref.tokens), (method, prefix_cache, b)
            assert out.prompt_length == ref.prompt_length
            assert [v.lm_token_count for v in out.visual] == [v.lm_token_count for v in ref.visual]
            if get_method(method).prefill_hook is None:  # one shared sampler: its canvas, row by row
                assert len(batch_steps) == len(ref_steps)
                assert all(torch.equal(s[b], r) for s, r in zip(batch_steps, ref_steps)), (method, prefix_cache, b)
        assert len({o.prompt_length for o in outs}) > 1, "the batch must be ragged"
    tokens = {tuple(r.tokens[0].tolist()) for r, _ in singles}
    assert len(tokens) > 1, "the sharp model's answers must differ between prompts"
