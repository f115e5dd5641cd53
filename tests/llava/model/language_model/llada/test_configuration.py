import pytest

from llava.errors import ConfigError
from llava.model.language_model.llada.configuration_llada import REQUIRED_KEYS, LLaDAConfig

# The LLaDA-8B-Instruct config.json values that matter, plus keys this class ignores.
LLADA_8B = {
    "d_model": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 32, "mlp_hidden_size": 12288,
    "mlp_ratio": 4, "vocab_size": 126464, "embedding_size": 126464, "rope_theta": 500000.0,
    "rms_norm_eps": 1e-05, "max_sequence_length": 4096, "mask_token_id": 126336, "eos_token_id": 126081,
    "pad_token_id": 126081, "weight_tying": False, "block_type": "llama", "layer_norm_type": "rms",
    "activation_type": "silu", "rope": True, "alibi": False, "include_bias": False, "include_qkv_bias": False,
    "attention_layer_norm": False, "multi_query_attention": None, "attention_dropout": 0.0,
    "residual_dropout": 0.0, "init_fn": "mitchell", "precision": "amp_bf16",
    # multimodal keys of the LaViDa config.json
    "mm_projector_type": "mlp2x_gelu", "mm_hidden_size": 1152, "image_aspect_ratio": "anyres",
}

TINY = dict(d_model=64, n_layers=2, n_heads=4, mlp_hidden_size=128, vocab_size=97, rope_theta=10000.0,
            mask_token_id=96, eos_token_id=95, pad_token_id=95)


def test_from_dict_llada_8b():
    cfg = LLaDAConfig.from_dict(LLADA_8B)
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim) == (4096, 32, 32, 32, 128)
    assert cfg.embedding_size == 126464 and cfg.rope_theta == 500000.0 and cfg.weight_tying is False
    assert (cfg.mask_token_id, cfg.eos_token_id, cfg.pad_token_id) == (126336, 126081, 126081)


def test_defaults_are_llada_not_upstream_dataclass():
    cfg = LLaDAConfig.from_dict(TINY)
    assert cfg.n_kv_heads == 4 and cfg.embedding_size == 97 and cfg.head_dim == 16
    assert cfg.weight_tying is False and cfg.rms_norm_eps == 1e-5 and cfg.max_sequence_length == 4096
    assert not any("dropout" in k for k in cfg.to_dict())


def test_null_optionals_fall_back():
    cfg = LLaDAConfig.from_dict({**TINY, "n_kv_heads": None, "embedding_size": None})
    assert cfg.n_kv_heads == 4 and cfg.embedding_size == 97


def test_to_dict_round_trip():
    cfg = LLaDAConfig.from_dict({**TINY, "n_kv_heads": 2, "embedding_size": 128, "weight_tying": True})
    assert LLaDAConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("key", REQUIRED_KEYS)
def test_missing_key_is_named(key):
    d = {k: v for k, v in TINY.items() if k != key}
    with pytest.raises(ConfigError, match=key):
        LLaDAConfig.from_dict(d)


@pytest.mark.parametrize(
    "key,value",
    [("block_type", "sequential"), ("layer_norm_type", "default"), ("activation_type", "gelu"), ("alibi", True),
     ("include_bias", True), ("include_qkv_bias", True), ("attention_layer_norm", True), ("rope", False)],
)
def test_unsupported_values_rejected(key, value):
    with pytest.raises(ConfigError, match=f"unsupported config value {key}="):
        LLaDAConfig.from_dict({**TINY, key: value})


@pytest.mark.parametrize(
    "override,msg",
    [({"n_heads": 5}, "not divisible by n_heads"), ({"n_kv_heads": 3}, "not divisible by n_kv_heads"),
     ({"embedding_size": 50}, "smaller than vocab_size"), ({"n_layers": 0}, "n_layers"),
     ({"mask_token_id": 97}, "mask_token_id")],
)
def test_inconsistent_values_rejected(override, msg):
    with pytest.raises(ConfigError, match=msg):
        LLaDAConfig.from_dict({**TINY, **override})


@pytest.mark.parametrize("override, msg", [
    ({"rope_theta": "abc"}, "'rope_theta' must be a positive number, got 'abc'"),
    ({"rope_theta": float("inf")}, "'rope_theta' must be a positive number"),
    ({"rope_theta": 0}, "'rope_theta' must be a positive number"),
    ({"rope_theta": True}, "'rope_theta' must be a positive number"),
    ({"rms_norm_eps": "1e-5"}, "'rms_norm_eps' must be a positive number"),
    ({"rms_norm_eps": float("nan")}, "'rms_norm_eps' must be a positive number"),
    ({"d_model": 64.0}, "'d_model' must be a positive integer"),
    ({"embedding_size": "128"}, "'embedding_size' must be a positive integer"),
    ({"max_sequence_length": 0}, "'max_sequence_length' must be a positive integer"),
    ({"mask_token_id": "96"}, "'mask_token_id' must be an integer token id"),
    ({"eos_token_id": 95.5}, "'eos_token_id' must be an integer token id"),
    ({"pad_token_id": [95]}, "'pad_token_id' must be an integer token id"),
    ({"weight_tying": "false"}, "'weight_tying' must be true or false"),
])
def test_value_types_checked_at_load(override, msg):
    with pytest.raises(ConfigError, match=msg):
        LLaDAConfig.from_dict({**TINY, **override})


@pytest.mark.parametrize("raw", [[1, 2], "d_model", 5, None])
def test_config_must_be_an_object(raw):
    with pytest.raises(ConfigError, match="config must be a JSON object"):
        LLaDAConfig.from_dict(raw)


def test_integer_rope_theta_is_a_number():
    assert LLaDAConfig.from_dict({**TINY, "rope_theta": 10000}).rope_theta == 10000
