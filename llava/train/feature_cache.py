"""Memoised vision-tower outputs for training stages that keep SigLIP frozen (`--vision_feature_cache_gb`).

Why: on a CPU the vision tower is about half of an any-res training step (5 views x 729 tokens), and a frozen
tower returns the same features for the same pixels every epoch. The cache sits on `model.vision_features` --
the one call every encode path makes (LaViDa's any-res views, single views, a prune method's own views) -- and is
keyed by a BLAKE2 digest of the preprocessed pixel tensor, so nothing upstream of it (image loading, resizing,
the method's view geometry) is assumed: a different crop is a different key. Stored outputs are the exact
tensors the tower returned (same dtype and device), so a cached run is bit-identical to an uncached one
(tested). It refuses to run when any vision-tower parameter would be trained (full or LoRA): stale features
would silently stop that training.
"""
from __future__ import annotations

import hashlib
from typing import Callable

import torch
import torch.nn as nn

from llava.errors import InputError
from llava.model.multimodal_encoder.siglip_encoder import VisionOutput
from llava.utils import logger


def trainable_vision_parameters(model: nn.Module) -> list[str]:
    """Names (inside the vision tower) of its parameters that would be trained, LoRA ones included."""
    return [n for n, p in model.model.vision_tower.named_parameters() if p.requires_grad]


def _digest(pixels: torch.Tensor, with_attention: bool) -> bytes:
    data = pixels.detach().to("cpu").contiguous()
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((tuple(data.shape), str(data.dtype), with_attention)).encode())
    h.update(data.view(torch.uint8).numpy())  # the raw bytes, any dtype (numpy has no bf16), without a copy
    return h.digest()


def _nbytes(out: VisionOutput) -> int:
    return sum(t.numel() * t.element_size() for t in (out.features, out.attn_received, out.keys) if t is not None)


class VisionFeatureCache:
    """Wraps `model.vision_features` (an instance attribute shadowing the method); `uninstall()` restores it.
    Past `max_bytes` it stops storing (and says so once) but keeps serving what it has."""

    def __init__(self, model: nn.Module, max_bytes: int):
        trained = trainable_vision_parameters(model)
        if trained:
            raise InputError(
                f"--vision_feature_cache_gb needs a frozen vision tower, but {len(trained)} of its parameters are "
                f"trained (e.g. vision_tower.{trained[0]}): drop mm_vision_tower from --mm_tunable_parts and keep "
                "LoRA out of SigLIP, or set --vision_feature_cache_gb 0")
        self.model, self.max_bytes = model, int(max_bytes)
        self.compute: Callable = model.vision_features  # the bound method
        self.store: dict[bytes, VisionOutput] = {}
        self.bytes = self.hits = self.misses = 0
        self._full_logged = False
        model.vision_features = self

    def __call__(self, pixel_values: torch.Tensor, with_attention: bool) -> VisionOutput:
        key = _digest(pixel_values, with_attention)
        hit = self.store.get(key)
        if hit is not None:
            self.hits += 1
            return hit
        self.misses += 1
        with torch.no_grad():
            out = self.compute(pixel_values, with_attention)
        size = _nbytes(out)
        if self.bytes + size <= self.max_bytes:
            self.store[key] = out
            self.bytes += size
        elif not self._full_logged:
            self._full_logged = True
            logger.warning("vision feature cache full at %.2f GB (%d entries): later views are recomputed",
                           self.bytes / 1e9, len(self.store))
        return out

    def stats(self) -> dict:
        return {"entries": len(self.store), "gb": round(self.bytes / 1e9, 3), "hits": self.hits,
                "misses": self.misses}

    def uninstall(self) -> None:
        if self.model.__dict__.get("vision_features") is self:
            del self.model.vision_features
