"""LaViDa's SigLIP vision tower: so400m with its last encoder layer dropped and no pooling head.

Features are the output of the last kept layer BEFORE `post_layernorm` (= hidden_states[-2] of the full model).
Optionally also returns, for token pruning, the attention each patch receives in that last kept layer and its keys.
"""

import copy
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import SiglipVisionConfig, SiglipVisionModel

from llava.constants import SIGLIP_IMAGE_SIZE, SIGLIP_PATCH_SIZE
from llava.errors import ConfigError


def so400m_vision_config() -> SiglipVisionConfig:
    """Full (27-layer) `google/siglip-so400m-patch14-384` vision config; the tower removes the last layer itself."""
    return SiglipVisionConfig(
        hidden_size=1152,
        intermediate_size=4304,
        num_hidden_layers=27,
        num_attention_heads=16,
        num_channels=3,
        patch_size=SIGLIP_PATCH_SIZE,
        image_size=SIGLIP_IMAGE_SIZE,
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6,
    )


@dataclass
class VisionOutput:
    """features [V,N,C]; attn_received [V,N] (fp32) and keys [V,N,C] only when asked for (else None)."""

    features: torch.Tensor
    attn_received: torch.Tensor | None = None
    keys: torch.Tensor | None = None


class SiglipVisionHolder(nn.Module):
    """Puts the HF model under `.vision_model` so state-dict keys match LaViDa checkpoints (`vision_model.*`).

    transformers 5 flattened `SiglipVisionModel` (its own keys start at `embeddings.`), while 4.x nests the same
    modules under `vision_model.`; unwrapping the 4.x nesting gives one layout for both.
    """

    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        model = SiglipVisionModel(config)
        self.vision_model = getattr(model, "vision_model", model)


class SigLipVisionTower(nn.Module):
    """SigLIP minus its last layer and head; keys `vision_tower.vision_model.*` (`model.vision_tower.` in LaViDa)."""

    ATTN_IMPLEMENTATIONS = ("eager", "sdpa")

    def __init__(self, vision_config: SiglipVisionConfig, attn_implementation: str = "eager"):
        """`eager` (default) is upstream's attention: explicit matmuls with an fp32 softmax, so bf16
        features match the checkpoint's training/eval numerics; `sdpa` is faster and equal in fp32
        (~1e-6) but differs by ~1 % relative in bf16."""
        super().__init__()
        if attn_implementation not in self.ATTN_IMPLEMENTATIONS:
            raise ConfigError(
                f"vision attention {attn_implementation!r} unsupported; use one of {self.ATTN_IMPLEMENTATIONS}"
            )
        if vision_config.num_hidden_layers < 2:
            raise ConfigError(
                f"vision tower needs at least 2 layers (the last is dropped); got {vision_config.num_hidden_layers}"
            )
        config = copy.deepcopy(vision_config)
        config.num_hidden_layers -= 1
        config.vision_use_head = False
        config._attn_implementation = attn_implementation
        self.config = config
        self.vision_tower = SiglipVisionHolder(config)
        # Recompute each encoder layer in backward instead of storing its activations (training only; set by
        # `--gradient_checkpointing`). Matters once LoRA trains the tower: 5 any-res views x 729 tokens x 26
        # layers of activations dominate SHIRG-LoRA memory at 8B.
        self.gradient_checkpointing = False

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def patch_size(self) -> int:
        return self.config.patch_size

    @property
    def num_patches_per_side(self) -> int:
        return self.config.image_size // self.config.patch_size

    def forward(
        self,
        pixel_values: torch.Tensor,
        interpolate_pos_encoding: bool | None = None,
        return_attention: bool = False,
    ) -> VisionOutput:
        """Encode views [V,3,S,S] into [V,(S/14)²,C] patch features.

        interpolate_pos_encoding=None means: interpolate (bicubic) exactly when S differs from the trained size,
        so 448² views give 32×32 = 1024 tokens.
        """
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"expected pixel_values [V,3,S,S], got {tuple(pixel_values.shape)}")
        if interpolate_pos_encoding is None:
            interpolate_pos_encoding = tuple(pixel_values.shape[-2:]) != (self.image_size, self.image_size)
        model = self.vision_tower.vision_model
        hidden = model.embeddings(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
        *early_layers, last_layer = model.encoder.layers
        for layer in early_layers:
            hidden = self._run_layer(layer, hidden)
        last_input = hidden
        features = self._run_layer(last_layer, hidden)
        if not return_attention:
            return VisionOutput(features=features)
        attn_received, keys = attention_received(last_layer, last_input)
        return VisionOutput(features=features, attn_received=attn_received, keys=keys)

    def _run_layer(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return _layer_output(checkpoint(layer, hidden, None, use_reentrant=False))
        return _layer_output(layer(hidden, None))


def _layer_output(out) -> torch.Tensor:
    """transformers 4.x encoder layers return a tuple `(hidden_states, ...)`, 5.x the tensor itself."""
    return out[0] if isinstance(out, tuple) else out


def attention_received(layer: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean attention each token receives in `layer` (over heads and all queries) [V,N], and its keys [V,N,C].

    Recomputes q/k for this one layer instead of running the tower in eager mode, one view at a time so the
    heads×N×N probabilities never exist for all views at once. Scores are computed and returned in fp32 and
    detached: they are a ranking signal (bf16 would create ties), and keeping their graph would cost N² memory
    per view. Keys keep the model dtype and their graph.
    """
    attn = layer.self_attn
    normed = layer.layer_norm1(hidden)
    keys = attn.k_proj(normed)
    with torch.no_grad():
        queries = attn.q_proj(normed)
        num_views, num_tokens, _ = hidden.shape
        received = []
        for view in range(num_views):
            q = queries[view].float().view(num_tokens, attn.num_heads, attn.head_dim).transpose(0, 1)
            k = keys[view].float().view(num_tokens, attn.num_heads, attn.head_dim).transpose(0, 1)
            probs = torch.softmax((q @ k.transpose(-1, -2)) * attn.scale, dim=-1)  # [heads, query, key]
            received.append(probs.mean(dim=(0, 1)))
    return torch.stack(received), keys
