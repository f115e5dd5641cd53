"""The GPU default dtype (bf16) end to end, on CPU: every prune method must run without dtype
mismatches (fp32 scores next to bf16 features, fp32 RoPE tables, float64 sampling)."""
import copy

import numpy as np
import pytest
import torch
from PIL import Image

from llava.conversation import build_prompt
from llava.mm_utils import tokenizer_image_token
from shirg_patches import REGISTRY


@pytest.fixture(scope="module")
def bf16_model(small_model):
    tok, model = small_model
    return tok, copy.deepcopy(model).to(torch.bfloat16)


@pytest.mark.parametrize("method", sorted(REGISTRY))
def test_every_method_runs_in_bf16(bf16_model, method):
    tok, model = bf16_model
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8))
    question = "what color is the square"
    ids = tokenizer_image_token(build_prompt(question), tok)
    qids = tok(question, add_special_tokens=False).input_ids
    out = model.generate(ids, [image], prune_method=method, question_ids=qids, gen_length=4, block_length=4, steps=2)
    visual = out.visual[0]
    assert visual.tokens.dtype == torch.bfloat16
    assert out.tokens.shape == (1, 4)
    assert all(k.dtype == torch.bfloat16 for k in out.generation.prefix_cache.keys)
    if method in ("pool", "full", "lavida"):
        assert visual.kept is None
    else:
        assert visual.lm_token_count == 980
