"""SigLIP tower on a tiny fp32 config: shapes, key names, features and attention-received vs transformers."""

import copy

import pytest
import torch
from transformers import SiglipVisionConfig, SiglipVisionModel

from llava.errors import ConfigError
from llava.model.multimodal_encoder.siglip_encoder import SigLipVisionTower, so400m_vision_config


def tiny_config(layers=3):
    return SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        patch_size=14,
        image_size=384,
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6,
    )


@pytest.fixture(scope="module")
def tower():
    torch.manual_seed(0)
    return SigLipVisionTower(tiny_config()).eval()


def reference_model(tower, attn_implementation):
    """A plain transformers model of the truncated depth carrying the tower's weights."""
    config = copy.deepcopy(tower.config)
    config._attn_implementation = attn_implementation
    model = SiglipVisionModel(config).eval()
    model.load_state_dict(tower.vision_tower.vision_model.state_dict())
    return model


def test_so400m_config():
    config = so400m_vision_config()
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (1152, 27, 16)
    assert (config.intermediate_size, config.patch_size, config.image_size) == (4304, 14, 384)
    assert config.hidden_act == "gelu_pytorch_tanh" and config.layer_norm_eps == 1e-6


@pytest.mark.shapes
def test_so400m_tower_layout_on_meta():
    """Checkpoint shapes (upstream key names) of the real tower, built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        tower = SigLipVisionTower(so400m_vision_config())
    shapes = {k: tuple(v.shape) for k, v in tower.state_dict().items()}
    prefix = "vision_tower.vision_model."
    assert shapes[prefix + "embeddings.patch_embedding.weight"] == (1152, 3, 14, 14)
    assert shapes[prefix + "embeddings.position_embedding.weight"] == (729, 1152)
    assert shapes[prefix + "encoder.layers.25.mlp.fc1.weight"] == (4304, 1152)
    assert prefix + "encoder.layers.26.mlp.fc1.weight" not in shapes
    assert shapes[prefix + "post_layernorm.bias"] == (1152,)
    assert sum(p.numel() for p in tower.parameters()) == 397_747_744  # ≈ 397.8 M


def test_state_dict_keys_and_properties(tower):
    keys = set(tower.state_dict())
    prefix = "vision_tower.vision_model."
    assert prefix + "embeddings.patch_embedding.weight" in keys
    assert prefix + "embeddings.position_embedding.weight" in keys
    assert prefix + "encoder.layers.1.self_attn.q_proj.weight" in keys
    assert prefix + "encoder.layers.1.mlp.fc2.bias" in keys
    assert prefix + "post_layernorm.weight" in keys
    assert not any(".layers.2." in k for k in keys)  # last of 3 layers dropped
    assert not any("head" in k for k in keys)
    assert all(k.startswith(prefix) for k in keys)
    assert tower.vision_tower.vision_model.config._attn_implementation == "eager"  # upstream's numerics
    assert (tower.hidden_size, tower.image_size, tower.patch_size, tower.num_patches_per_side) == (32, 384, 14, 27)


def test_sdpa_matches_eager_in_fp32_and_bad_kernel_is_rejected():
    torch.manual_seed(0)
    eager = SigLipVisionTower(tiny_config())
    sdpa = SigLipVisionTower(tiny_config(), attn_implementation="sdpa")
    sdpa.load_state_dict(eager.state_dict())
    pixels = torch.randn(2, 3, 384, 384)
    torch.testing.assert_close(sdpa(pixels).features, eager(pixels).features, rtol=1e-4, atol=1e-5)
    with pytest.raises(ConfigError, match="unsupported"):
        SigLipVisionTower(tiny_config(), attn_implementation="flash")


def test_too_few_layers():
    with pytest.raises(ConfigError, match="at least 2 layers"):
        SigLipVisionTower(tiny_config(layers=1))


@torch.no_grad()
def test_features_match_transformers(tower):
    pixels = torch.randn(2, 3, 384, 384)
    out = tower(pixels)
    assert out.features.shape == (2, 729, 32) and out.attn_received is None and out.keys is None
    reference = reference_model(tower, "sdpa")(pixels, output_hidden_states=True)
    torch.testing.assert_close(out.features, reference.hidden_states[-1])
    assert not torch.allclose(out.features, reference.last_hidden_state)  # no post_layernorm


@torch.no_grad()
def test_features_are_penultimate_of_full_model(tower):
    full = SiglipVisionModel(tiny_config()).eval()
    missing, unexpected = full.load_state_dict(tower.vision_tower.vision_model.state_dict(), strict=False)
    assert all(".layers.2." in k or k.startswith("head.") for k in missing) and not unexpected
    pixels = torch.randn(1, 3, 384, 384)
    torch.testing.assert_close(tower(pixels).features, full(pixels, output_hidden_states=True).hidden_states[-2])


@pytest.mark.shapes
@torch.no_grad()
def test_448_interpolates_positions_bicubic(tower):
    pixels = torch.randn(1, 3, 448, 448)
    out = tower(pixels)
    assert out.features.shape == (1, 1024, 32)
    reference = reference_model(tower, "sdpa")(pixels, interpolate_pos_encoding=True, output_hidden_states=True)
    torch.testing.assert_close(out.features, reference.hidden_states[-1])

    embeddings = tower.vision_tower.vision_model.embeddings
    table = embeddings.position_embedding.weight.T.reshape(1, 32, 27, 27)
    bicubic = torch.nn.functional.interpolate(table, size=(32, 32), mode="bicubic", align_corners=False)
    patches = embeddings.patch_embedding(pixels).flatten(2).transpose(1, 2)
    expected = patches + bicubic.flatten(2).transpose(1, 2)
    torch.testing.assert_close(embeddings(pixels, interpolate_pos_encoding=True), expected)

    with pytest.raises(RuntimeError):
        tower(pixels, interpolate_pos_encoding=False)


@torch.no_grad()
@pytest.mark.parametrize("side", [384, 448])
def test_attention_received_matches_eager(tower, side):
    pixels = torch.randn(3, 3, side, side)
    out = tower(pixels, return_attention=True)
    tokens = (side // 14) ** 2
    assert out.attn_received.shape == (3, tokens) and out.keys.shape == (3, tokens, 32)
    assert out.attn_received.dtype == torch.float32

    eager = reference_model(tower, "eager")
    reference = eager(pixels, interpolate_pos_encoding=side != 384, output_attentions=True, output_hidden_states=True)
    expected = reference.attentions[-1].mean(dim=(1, 2))  # [V, heads, query, key] -> mean over heads and queries
    torch.testing.assert_close(out.attn_received, expected)
    torch.testing.assert_close(out.attn_received.sum(-1), torch.ones(3))  # each query's row sums to 1

    last = eager.encoder.layers[-1]
    torch.testing.assert_close(out.keys, last.self_attn.k_proj(last.layer_norm1(reference.hidden_states[-2])))
    torch.testing.assert_close(out.features, tower(pixels).features)


def test_attention_received_is_detached_keys_are_not(tower):
    out = tower(torch.randn(1, 3, 384, 384), return_attention=True)
    assert not out.attn_received.requires_grad and out.keys.requires_grad and out.features.requires_grad


def test_rejects_bad_shape(tower):
    with pytest.raises(ValueError, match=r"\[V,3,S,S\]"):
        tower(torch.randn(3, 384, 384))


@torch.no_grad()
def test_layers_returning_tuples_like_transformers_4(tower, monkeypatch):
    """transformers 4.x (incl. upstream's pin 4.50.3) encoder layers return `(hidden_states,)`; the tower
    must unwrap it instead of feeding a tuple to the next layer."""
    pixels = torch.randn(1, 3, 384, 384)
    expected = tower(pixels, return_attention=True)
    for layer in tower.vision_tower.vision_model.encoder.layers:
        real_forward = layer.forward
        monkeypatch.setattr(layer, "forward", lambda *a, _f=real_forward, **k: (_f(*a, **k),))
    out = tower(pixels, return_attention=True)
    torch.testing.assert_close(out.features, expected.features, rtol=0, atol=0)
    torch.testing.assert_close(out.attn_received, expected.attn_received, rtol=0, atol=0)


def test_gradient_checkpointing_same_grads(monkeypatch):
    """Checkpointed layers (training, grad enabled) give the same features and grads; eval and no_grad skip it."""
    import llava.model.multimodal_encoder.siglip_encoder as E

    calls = []
    real = E.checkpoint
    monkeypatch.setattr(E, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    pixels = torch.randn(2, 3, 384, 384)
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        tower = SigLipVisionTower(tiny_config()).train()
        tower.gradient_checkpointing = ckpt
        tower(pixels).features.square().mean().backward()
        grads.append([p.grad for p in tower.parameters()])
    assert len(calls) == 2  # both kept layers, only when enabled
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    with torch.no_grad():
        tower(pixels)
    tower.eval()
    tower(pixels)
    assert len(calls) == 2
