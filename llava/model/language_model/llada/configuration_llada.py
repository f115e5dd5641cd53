"""LLaDA language-model config, read from the checkpoint's config.json.

Only the keys that change the math are kept. Upstream's own config class has gpt2-sized defaults
(dropout 0.1, tied weights, LayerNorm); nothing here falls back to those: the required keys must come
from the JSON, and the optional ones default to the published LLaDA-8B values.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from llava.constants import EOS_TOKEN_ID, MASK_TOKEN_ID, PAD_TOKEN_ID
from llava.errors import ConfigError

REQUIRED_KEYS = ("d_model", "n_layers", "n_heads", "mlp_hidden_size", "vocab_size", "rope_theta")

# Keys of the upstream config that select a different architecture than the one implemented here:
# key -> the only accepted value. Absent keys are fine (the JSON of LLaDA-8B holds exactly these values).
SUPPORTED_VALUES = {
    "block_type": "llama",
    "layer_norm_type": "rms",
    "activation_type": "silu",
    "rope": True,
    "alibi": False,
    "include_bias": False,
    "include_qkv_bias": False,
    "attention_layer_norm": False,
    "scale_logits": False,
    "input_emb_norm": False,
}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class LLaDAConfig:
    d_model: int
    n_layers: int
    n_heads: int
    mlp_hidden_size: int
    vocab_size: int
    rope_theta: float
    n_kv_heads: Optional[int] = None  # None -> n_heads (plain multi-head attention)
    embedding_size: Optional[int] = None  # rows of wte and of the LM head; None -> vocab_size
    rms_norm_eps: float = 1e-5
    max_sequence_length: int = 4096
    mask_token_id: int = MASK_TOKEN_ID
    eos_token_id: int = EOS_TOKEN_ID
    pad_token_id: int = PAD_TOKEN_ID
    weight_tying: bool = False

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.embedding_size is None:
            self.embedding_size = self.vocab_size
        for key in ("d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_hidden_size", "vocab_size",
                    "embedding_size", "max_sequence_length"):
            value = getattr(self, key)
            if not _is_int(value) or value < 1:
                raise ConfigError(f"config key {key!r} must be a positive integer, got {value!r}")
        for key in ("rope_theta", "rms_norm_eps"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"config key {key!r} must be a positive number, got {value!r}")
        for key in ("mask_token_id", "eos_token_id", "pad_token_id"):
            if not _is_int(getattr(self, key)):
                raise ConfigError(f"config key {key!r} must be an integer token id, got {getattr(self, key)!r}")
        if not isinstance(self.weight_tying, bool):
            raise ConfigError(f"config key 'weight_tying' must be true or false, got {self.weight_tying!r}")
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim {self.head_dim} must be even for rotary embeddings")
        if self.embedding_size < self.vocab_size:
            raise ConfigError(f"embedding_size {self.embedding_size} is smaller than vocab_size {self.vocab_size}")
        if not 0 <= self.mask_token_id < self.embedding_size:
            raise ConfigError(
                f"mask_token_id {self.mask_token_id} is outside the embedding ({self.embedding_size} rows)"
            )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LLaDAConfig":
        """Build from a config.json dict. Unknown keys are ignored because the LaViDa config.json also
        holds the multimodal keys; keys that would select an unimplemented architecture are rejected,
        and every kept key is type-checked here, once, naming the key."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"config must be a JSON object (key: value), got {type(d).__name__}")
        missing = [k for k in REQUIRED_KEYS if d.get(k) is None]
        if missing:
            raise ConfigError(f"config is missing required key(s): {', '.join(missing)}")
        for key, supported in SUPPORTED_VALUES.items():
            if key in d and d[key] is not None and d[key] != supported:
                raise ConfigError(f"unsupported config value {key}={d[key]!r} (only {supported!r} is implemented)")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names and v is not None})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
