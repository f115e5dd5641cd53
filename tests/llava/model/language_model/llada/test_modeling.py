import math
import re
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from llava.errors import InputError
from llava.model.language_model.llada import modeling_llada as M
from llava.model.language_model.llada.configuration_llada import LLaDAConfig
from llava.model.language_model.llada.modeling_llada import LLaDAModel, RMSNorm, apply_rope, rope_tables


def make_model(seed=0, **overrides):
    cfg = dict(d_model=64, n_layers=2, n_heads=4, mlp_hidden_size=128, vocab_size=97, rope_theta=10000.0,
               mask_token_id=96, eos_token_id=95, pad_token_id=95)
    torch.manual_seed(seed)
    model = LLaDAModel(LLaDAConfig(**{**cfg, **overrides})).eval()
    with torch.no_grad():  # non-trivial norm weights so the weight-multiply order is exercised
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("ln_f.weight"):
                p.uniform_(0.5, 1.5)
    return model


def reference_logits(model, x, visible=None):
    """Independent re-statement of LLaDA's math: explicit softmax attention, complex-number RoPE."""
    cfg = model.config
    T, hd, g = x.shape[1], cfg.head_dim, cfg.n_heads // cfg.n_kv_heads

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps) * w

    def rope(t):  # pairs (i, i + hd/2) as complex numbers, rotated by pos * theta^(-2i/hd)
        half = hd // 2
        freq = cfg.rope_theta ** (-2 * torch.arange(half, dtype=torch.float64) / hd)
        angles = torch.arange(T, dtype=torch.float64)[:, None] * freq
        rot = torch.polar(torch.ones(T, half, dtype=torch.float64), angles)
        z = torch.complex(t[..., :half].double(), t[..., half:].double()) * rot
        return torch.cat([z.real, z.imag], -1).to(t.dtype)

    for blk in model.transformer.blocks:
        n1 = rms(x, blk.attn_norm.weight)
        heads = lambda lin, n: lin(n1).view(x.shape[0], T, n, hd).transpose(1, 2)
        q = rope(heads(blk.q_proj, cfg.n_heads))
        k = rope(heads(blk.k_proj, cfg.n_kv_heads)).repeat_interleave(g, 1)
        v = heads(blk.v_proj, cfg.n_kv_heads).repeat_interleave(g, 1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
        if visible is not None:
            scores = scores.masked_fill(~visible, -math.inf)
        y = (scores.softmax(-1) @ v).transpose(1, 2).reshape_as(x)
        h = x + blk.attn_out(y)
        n2 = rms(h, blk.ff_norm.weight)
        x = h + blk.ff_out(F.silu(blk.ff_proj(n2)) * blk.up_proj(n2))
    return rms(x, model.transformer.ln_f.weight) @ model.transformer.ff_out.weight.T


def test_rmsnorm_formula_and_dtype_order():
    norm = RMSNorm(8, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
    x = torch.randn(3, 8) * 5
    expected = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), expected, atol=1e-6, rtol=1e-6)
    norm = norm.to(torch.bfloat16)
    xb = x.bfloat16()
    xf = xb.float()
    normalised = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).bfloat16()
    assert torch.equal(norm(xb), normalised * norm.weight)  # cast back first, then weight in bf16


def test_rope_matches_complex_rotation():
    hd, theta, T = 16, 10000.0, 37
    x = torch.randn(2, 3, T, hd)
    cos, sin = rope_tables(torch.arange(T), hd, theta)
    half = hd // 2
    freq = theta ** (-2 * torch.arange(half, dtype=torch.float64) / hd)
    angle = torch.arange(T, dtype=torch.float64)[:, None] * freq
    z = torch.complex(x[..., :half].double(), x[..., half:].double()) * torch.polar(torch.ones_like(angle), angle)
    torch.testing.assert_close(apply_rope(x, cos, sin), torch.cat([z.real, z.imag], -1).float(), atol=1e-5, rtol=1e-5)
    assert cos.dtype == torch.float32 and apply_rope(x.bfloat16(), cos, sin).dtype == torch.bfloat16


@pytest.mark.shapes
def test_state_dict_key_names():
    model = make_model()
    block_keys = ["attn_norm", "q_proj", "k_proj", "v_proj", "attn_out", "ff_norm", "ff_proj", "up_proj", "ff_out"]
    expected = {"transformer.wte.weight", "transformer.ln_f.weight", "transformer.ff_out.weight"}
    expected |= {f"transformer.blocks.{i}.{k}.weight" for i in range(2) for k in block_keys}
    sd = model.state_dict()
    assert set(sd) == expected
    assert all(re.fullmatch(r"transformer\.(wte|ln_f|ff_out|blocks\.\d+\.\w+)\.weight", k) for k in sd)
    assert sd["transformer.blocks.0.ff_proj.weight"].shape == (128, 64)
    assert sd["transformer.blocks.0.ff_out.weight"].shape == (64, 128)
    assert sd["transformer.ff_out.weight"].shape == (97, 64)


def test_weight_tying_uses_wte():
    model = make_model(weight_tying=True, embedding_size=100)
    assert "transformer.ff_out.weight" not in model.state_dict()
    x = torch.randn(1, 4, 64)
    expected = model.transformer.ln_f(reference_hidden(model, x)) @ model.transformer.wte.weight.T
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    assert model(x).shape == (1, 4, 100)


def reference_hidden(model, x):
    cos, sin = rope_tables(torch.arange(x.shape[1]), model.config.head_dim, model.config.rope_theta)
    for blk in model.transformer.blocks:
        x, _ = blk(x, cos, sin)
    return x


@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_forward_matches_reference_math(n_kv_heads):
    model = make_model(n_kv_heads=n_kv_heads)
    x = torch.randn(2, 9, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_logits(model, x), atol=1e-5, rtol=1e-5)


def test_logits_at_runs_the_head_on_the_chosen_slots_only():
    """The training loss asks for its supervised slots only; they must be the full logits' rows, plain and ragged."""
    model = make_model()
    x = torch.randn(2, 9, 64)
    at = torch.rand(2, 9) < 0.4
    at[0, 0] = True
    with torch.no_grad():
        torch.testing.assert_close(model(x, logits_at=at), model(x)[at], atol=1e-6, rtol=1e-6)
        ragged = model(x, lengths=[9, 6])
        torch.testing.assert_close(model(x, lengths=[9, 6], logits_at=at), ragged[at], atol=1e-6, rtol=1e-6)
    assert model(x, logits_at=at).shape == (int(at.sum()), model.config.embedding_size)


def test_attention_is_bidirectional():
    model = make_model()
    x = torch.randn(1, 6, 64)
    y = x.clone()
    y[0, -1] += 1.0
    assert not torch.allclose(model(x)[0, 0], model(y)[0, 0])


@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_cached_step_equals_full_recompute_with_prefix_mask(n_kv_heads):
    model = make_model(n_kv_heads=n_kv_heads)
    P, L = 7, 5
    prompt, response = torch.randn(2, P, 64), torch.randn(2, L, 64)
    with torch.no_grad():
        cache = model.prefill(prompt)
        cached = model(response, prefix_cache=cache)
        visible = torch.ones(P + L, P + L, dtype=torch.bool)
        visible[:P, P:] = False  # the prompt never sees the response
        full = model(torch.cat([prompt, response], 1), attention_mask=visible[None, None])
        ref = reference_logits(model, torch.cat([prompt, response], 1), visible)
    torch.testing.assert_close(cached, full[:, P:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(full, ref, atol=1e-5, rtol=1e-5)
    assert cache.layer_lengths() == [P, P] and cache.keys[0].shape == (2, n_kv_heads, P, 16)


def test_cache_with_mask_checks_lengths():
    model = make_model()
    cache = model.prefill(torch.randn(1, 4, 64))
    with pytest.raises(InputError, match="attention_mask covers"):
        model(torch.randn(1, 3, 64), prefix_cache=cache, attention_mask=torch.ones(1, 1, 3, 3, dtype=torch.bool))


def test_prefix_cache_clone_is_independent():
    cache = make_model().prefill(torch.randn(1, 4, 64))
    copy = cache.clone()
    copy.keys[0].zero_()
    assert not torch.equal(copy.keys[0], cache.keys[0]) and copy.prefix_length == cache.prefix_length


def test_prune_hook_in_prefill():
    model = make_model(n_layers=3)
    P, keep = 8, torch.tensor([0, 3, 5, 6])
    prompt = torch.randn(2, P, 64)
    seen = []

    def hook(layer, hidden_in, hidden_out, positions):
        seen.append((layer, hidden_in.shape[1], hidden_out.shape[1], positions.tolist()))
        return keep if layer == 0 else None

    with torch.no_grad():
        full = model.prefill(prompt)
        pruned = model.prefill(prompt, prune_hook=hook)
        assert pruned.layer_lengths() == [P, 4, 4] and pruned.prefix_length == P
        assert seen[0] == (0, P, P, list(range(P))) and seen[1] == (1, 4, 4, [0, 3, 5, 6])
        # up to and including the pruning layer nothing changes
        assert torch.equal(pruned.keys[0], full.keys[0]) and torch.equal(pruned.values[0], full.values[0])
        # later layers: the kept tokens, at their original RoPE positions
        cos, sin = rope_tables(torch.arange(P), 16, 10000.0)
        h0, _ = model.transformer.blocks[0](prompt, cos, sin)
        _, (k1, v1) = model.transformer.blocks[1](h0[:, keep], cos[keep], sin[keep])
        torch.testing.assert_close(pruned.keys[1], k1, atol=0, rtol=0)
        torch.testing.assert_close(pruned.values[1], v1, atol=0, rtol=0)
        # a cached step runs; responses sit after the original prompt length
        response = torch.randn(2, 3, 64)
        assert model(response, prefix_cache=pruned).shape == (2, 3, 97)
        h = response
        rcos, rsin = rope_tables(torch.arange(P, P + 3), 16, 10000.0)
        for i, blk in enumerate(model.transformer.blocks):
            h, _ = blk(h, rcos, rsin, (pruned.keys[i], pruned.values[i]))
        torch.testing.assert_close(model(response, prefix_cache=pruned), model.lm_logits(h), atol=1e-6, rtol=1e-6)
        # keeping everything is the same as not pruning
        same = model.prefill(prompt, prune_hook=lambda i, a, b, pos: torch.arange(pos.numel()))
        assert all(torch.equal(a, b) for a, b in zip(same.keys, full.keys))


@pytest.mark.parametrize("bad", [torch.tensor([0, 8]), torch.tensor([1, 1]), torch.tensor([[0]]), torch.tensor([0.0])])
def test_prune_hook_bad_indices(bad):
    with pytest.raises(RuntimeError, match="prune_hook"):
        make_model().prefill(torch.randn(1, 8, 64), prune_hook=lambda *a: bad)


def test_flash_attn_selection(monkeypatch):
    monkeypatch.setattr(M, "flash_attn_func", lambda *a, **k: None)
    cuda = lambda dtype: SimpleNamespace(device=torch.device("cuda"), dtype=dtype)
    assert M.use_flash_attn(cuda(torch.bfloat16), None)
    assert M.use_flash_attn(cuda(torch.float16), None)
    assert not M.use_flash_attn(cuda(torch.float32), None)
    assert not M.use_flash_attn(cuda(torch.bfloat16), torch.ones(1, dtype=torch.bool))
    assert not M.use_flash_attn(torch.zeros(1, dtype=torch.bfloat16), None)  # CPU
    monkeypatch.setattr(M, "flash_attn_func", None)
    assert not M.use_flash_attn(cuda(torch.bfloat16), None)


def test_flash_branch_layout(monkeypatch):
    """The flash branch hands [B, T, H, hd] tensors with un-repeated K/V heads to flash_attn_func."""
    calls = []

    def fake_flash(q, k, v, causal):
        calls.append((q.shape, k.shape, causal))
        g = q.shape[2] // k.shape[2]
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2).repeat_interleave(g, 1), v.transpose(1, 2).repeat_interleave(g, 1)
        )
        return out.transpose(1, 2)

    q, k, v = torch.randn(2, 4, 5, 16), torch.randn(2, 2, 7, 16), torch.randn(2, 2, 7, 16)
    expected = M.attention(q, k, v)
    monkeypatch.setattr(M, "flash_attn_func", fake_flash)
    monkeypatch.setattr(M, "use_flash_attn", lambda q, mask: True)
    torch.testing.assert_close(M.attention(q, k, v), expected)
    assert calls == [((2, 5, 4, 16), (2, 7, 2, 16), False)]


def test_gradient_checkpointing_same_grads(monkeypatch):
    calls = []
    real = M.checkpoint
    monkeypatch.setattr(M, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(2, 6, 64)
    grads = []
    for ckpt in (False, True):
        model = make_model().train()
        model.gradient_checkpointing = ckpt
        model(x).square().mean().backward()
        grads.append([p.grad for n, p in model.named_parameters() if n != "transformer.wte.weight"])
    assert len(calls) == 2  # one per block, only when enabled
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
