"""LaViDa-LLaDA: the LLaDA LM plus SigLIP tower, projector and `image_newline`.

Module nesting reproduces upstream checkpoint keys: `model.transformer.*` (LLaDA),
`model.vision_tower.vision_tower.vision_model.*` (SigLIP, last layer dropped, no head),
`model.mm_projector.{0,2}.*`, `model.image_newline`. No `lm_head` (the head is
`model.transformer.ff_out`).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from PIL import Image
from torch import nn
from transformers import SiglipVisionConfig

from llava.errors import ConfigError, InputError
from llava.model.language_model.llada.configuration_llada import LLaDAConfig
from llava.model.language_model.llada.generate import GenerationOutput, generate as llada_generate
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
        return SiglipVisionConfig(**mm.vision_config)
    local = os.path.join(str(mm.mm_vision_tower), "config.json")
    if os.path.isfile(local):
        with open(local) as f:
            cfg = json.load(f)
        return SiglipVisionConfig(**cfg.get("vision_config", cfg))
    if "so400m" in str(mm.mm_vision_tower):
        return so400m_vision_config()
    raise ConfigError(
        f"cannot tell the SigLIP dims for mm_vision_tower={mm.mm_vision_tower!r}: add a `vision_config` "
        "dict to config.json or point mm_vision_tower at a local folder with config.json"
    )


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
