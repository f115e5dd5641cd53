"""LaViDa-LLaDA: the LLaDA LM plus SigLIP tower, projector and `image_newline`.

Module nesting reproduces upstream checkpoint keys: `model.transformer.*` (LLaDA),
`model.vision_tower.vision_tower.vision_model.*` (SigLIP, last layer dropped, no head),
`model.mm_projector.{0,2}.*`, `model.image_newline`. No `lm_head` (the head is
`model.transformer.ff_out`).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from PIL import Image
from torch import nn
from transformers import SiglipVisionConfig

from llava.errors import ConfigError, InputError
from llava.model.language_model.llada.configuration_llada import LLaDAConfig
from llava.model.language_model.llada.generate import GenerationOutput
from llava.model.language_model.llada.generate import generate as llada_generate
from llava.model.language_model.llada.generate import generate_batch as llada_generate_batch
from llava.model.language_model.llada.modeling_llada import LLaDAModel
from llava.model.llava_arch import LlavaMetaForCausalLM, MultimodalConfig, VisualTokens, build_prefill_hook
from llava.model.multimodal_encoder.siglip_encoder import SigLipVisionTower, so400m_vision_config
from llava.model.multimodal_projector.builder import build_vision_projector
from llava.utils import NullTimer, StageTimer


class LlavaLLaDAConfig:
    """One config.json: LLaDA keys + `mm_*` keys (+ `vision_config` for non-stock towers).

    Unknown keys are kept verbatim so saving a loaded config loses nothing.
    """

    def __init__(self, raw: dict):
        self.raw = dict(raw)
        self.llada = LLaDAConfig.from_dict(raw)
        self.mm = MultimodalConfig.from_dict(raw)
        self.vision = resolve_vision_config(self.mm)
        tile = self.vision.image_size
        if self.mm.image_aspect_ratio == "anyres":
            bad = [list(p) for p in self.mm.image_grid_pinpoints if p[0] % tile or p[1] % tile]
            if bad:
                raise ConfigError(
                    f"config key 'image_grid_pinpoints': {bad[0]} is not a whole number of {tile} px tiles "
                    f"(the vision tower's image_size)"
                )

    @classmethod
    def from_dict(cls, d: dict) -> "LlavaLLaDAConfig":
        return cls(d)

    def to_dict(self) -> dict:
        out = dict(self.raw)
        out.update(self.llada.to_dict())
        out.update({k: v for k, v in self.mm.to_dict().items() if v is not None})
        out["architectures"] = ["LlavaLLaDAModelLM"]
        return out


def resolve_vision_config(mm: MultimodalConfig) -> SiglipVisionConfig:
    """The FULL SigLIP config (the tower drops its last layer itself).

    Order: `vision_config` in config.json, else `config.json` inside a local `mm_vision_tower`
    folder, else the stock so400m dims when the name says so400m (no hub access ever).
    """
    if mm.vision_config:
        return checked_vision_config(mm.vision_config, "vision_config")
    local = os.path.join(str(mm.mm_vision_tower), "config.json")
    if os.path.isfile(local):
        try:
            with open(local, encoding="utf-8") as f:
                cfg = json.load(f)
        except (OSError, ValueError) as e:  # ValueError: bad JSON or bad UTF-8
            raise ConfigError(f"cannot read the vision tower config {local}: {e}") from None
        if isinstance(cfg, dict) and isinstance(cfg.get("vision_config"), dict):
            return checked_vision_config(cfg["vision_config"], f"{local}: vision_config")
        return checked_vision_config(cfg, local)
    if "so400m" in str(mm.mm_vision_tower):
        return so400m_vision_config()
    raise ConfigError(
        f"cannot tell the SigLIP dims for mm_vision_tower={mm.mm_vision_tower!r}: add a `vision_config` "
        "dict to config.json or point mm_vision_tower at a local folder with config.json"
    )


# SigLIP dims that must be positive integers (the tower's geometry and widths), and floats that must be finite
_VISION_INT_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_channels", "image_size", "patch_size")
_VISION_FLOAT_KEYS = ("layer_norm_eps", "attention_dropout")


def checked_vision_config(d, where: str) -> SiglipVisionConfig:
    """A SiglipVisionConfig from a dict whose types and dims were checked first, naming the bad key."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where} must be a JSON object, got {type(d).__name__}")
    for key in _VISION_INT_KEYS:
        value = d.get(key)
        if key in d and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ConfigError(f"{where}.{key} must be a positive integer, got {value!r}")
    for key in _VISION_FLOAT_KEYS:
        value = d.get(key)
        if key in d and (isinstance(value, bool) or not isinstance(value, (int, float))
                         or not math.isfinite(value) or value < 0):
            raise ConfigError(f"{where}.{key} must be a non-negative number, got {value!r}")
    if "hidden_act" in d:
        from transformers.activations import ACT2FN

        if not isinstance(d["hidden_act"], str) or d["hidden_act"] not in ACT2FN:
            raise ConfigError(f"{where}.hidden_act {d['hidden_act']!r} is not an activation transformers knows")
    try:
        config = SiglipVisionConfig(**d)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where} is not a valid SigLIP vision config: {e}") from None
    if config.hidden_size % config.num_attention_heads:
        raise ConfigError(
            f"{where}.hidden_size {config.hidden_size} is not divisible by num_attention_heads "
            f"{config.num_attention_heads}"
        )
    if config.patch_size > config.image_size:
        raise ConfigError(f"{where}.patch_size {config.patch_size} is larger than image_size {config.image_size}")
    return config


class LlavaLLaDAModel(LLaDAModel):
    """LLaDA's `transformer` plus the vision modules, all under one `model.` prefix."""

    def __init__(self, config: LlavaLLaDAConfig):
        super().__init__(config.llada)
        mm = config.mm
        self.vision_tower = SigLipVisionTower(config.vision, mm.mm_vision_attn_implementation)
        if self.vision_tower.hidden_size != mm.mm_hidden_size:
            raise ConfigError(
                f"mm_hidden_size {mm.mm_hidden_size} != vision tower width {self.vision_tower.hidden_size}"
            )
        self.mm_projector = build_vision_projector(mm.mm_projector_type, mm.mm_hidden_size, config.llada.d_model)
        if "unpad" in mm.mm_patch_merge_type:
            self.image_newline = nn.Parameter(torch.zeros(config.llada.d_model))


@dataclass
class MultimodalGeneration:
    generation: GenerationOutput
    visual: list[VisualTokens]
    prompt_length: int

    @property
    def tokens(self) -> torch.Tensor:
        return self.generation.tokens


class LlavaLLaDAForCausalLM(nn.Module, LlavaMetaForCausalLM):
    def __init__(self, config: LlavaLLaDAConfig):
        super().__init__()
        self.config = config
        self.mm_config = config.mm
        self.model = LlavaLLaDAModel(config)

    def get_model(self) -> LlavaLLaDAModel:
        return self.model

    @torch.no_grad()
    def generate(
        self,
        input_ids: Sequence[int] | torch.Tensor,
        images: Sequence[Image.Image] = (),
        *,
        prune_method: str = "pool",
        question_ids: Optional[Sequence[int]] = None,
        prune_options: Optional[dict] = None,
        pool: Optional[bool] = None,
        timer: Optional[StageTimer] = None,
        **gen_kwargs,
    ) -> MultimodalGeneration:
        """Encode images (once), splice them into the prompt, run the diffusion sampler.

        `gen_kwargs` go to `llada.generate.generate` (gen_length, block_length, steps,
        step_per_block, step_ratio, temperature, remasking, schedule, schedule_kwargs,
        prefix_cache, generator, on_step).
        """
        timer = timer or NullTimer()
        visual = [self.encode_image(img, prune_method, question_ids, prune_options, pool, timer) for img in images]
        with timer("embed"):
            embeds, spans = self.prepare_inputs_embeds(input_ids, visual)
        hook = build_prefill_hook(visual, spans, self.config.llada.n_layers)
        out = llada_generate(self.model, embeds, prune_hook=hook, **gen_kwargs)
        if out.prefill_seconds:
            timer.add("prefill", out.prefill_seconds)
        timer.add("steps", sum(out.step_seconds))
        return MultimodalGeneration(out, visual, embeds.shape[1])

    @torch.no_grad()
    def generate_batch(
        self,
        input_ids: Sequence[Sequence[int] | torch.Tensor],
        images: Sequence[Sequence[Image.Image]],
        *,
        prune_method: str = "pool",
        question_ids: Optional[Sequence[Optional[Sequence[int]]]] = None,
        prune_options: Optional[dict] = None,
        pool: Optional[bool] = None,
        timers: Optional[Sequence[StageTimer]] = None,
        **gen_kwargs,
    ) -> list[MultimodalGeneration]:
        """`generate` for B prompts at once (one list of images per prompt); returns one result per prompt.

        Each prompt's images are encoded and spliced exactly as in `generate`; the prompts, whose lengths
        may differ (visual-token counts and question lengths), are then sampled together by
        `llada.generate.generate_batch` (right padding, per-sample positions and attention), so at
        temperature 0 every answer equals the batch-1 answer. Methods that prune inside the LM (a
        prefill hook, e.g. TopV) keep one prompt per prefill: their prompts run one at a time here.

        `timers` (one per prompt) get each prompt's own encode stages, and the batch's prefill and
        steps time divided by B (the share of one answer). Each result's `generation` holds its own
        row of tokens and the batch's shared nfe / timings.
        """
        B = len(input_ids)
        if len(images) != B:
            raise InputError(f"generate_batch got {B} prompts but {len(images)} image lists")
        question_ids = list(question_ids) if question_ids is not None else [None] * B
        timers = list(timers) if timers is not None else [NullTimer() for _ in range(B)]
        if len(question_ids) != B or len(timers) != B:
            raise InputError("generate_batch needs one question_ids entry and one timer per prompt")
        if B == 0:
            return []
        from shirg_patches import get_method

        if get_method(prune_method).prefill_hook is not None:
            return [self.generate(ids, imgs, prune_method=prune_method, question_ids=q, prune_options=prune_options,
                                  pool=pool, timer=t, **gen_kwargs)
                    for ids, imgs, q, t in zip(input_ids, images, question_ids, timers)]
        visuals, prompts = [], []
        for ids, imgs, q, timer in zip(input_ids, images, question_ids, timers):
            visual = [self.encode_image(img, prune_method, q, prune_options, pool, timer) for img in imgs]
            with timer("embed"):
                embeds, _ = self.prepare_inputs_embeds(ids, visual)
            visuals.append(visual)
            prompts.append(embeds)
        out = llada_generate_batch(self.model, prompts, **gen_kwargs)
        results = []
        for b, timer in enumerate(timers):
            if out.prefill_seconds:
                timer.add("prefill", out.prefill_seconds / B)
            timer.add("steps", sum(out.step_seconds) / B)
            row = GenerationOutput(out.tokens[b : b + 1], out.nfe, out.prefill_seconds, out.step_seconds)
            results.append(MultimodalGeneration(row, visuals[b], prompts[b].shape[1]))
        return results
