"""Small shared helpers: the package logger and per-stage wall-clock timing."""
from __future__ import annotations

import logging
import time
from collections import OrderedDict
from contextlib import contextmanager

import torch

logger = logging.getLogger("llava")


def synced_now(device: torch.device | None) -> float:
    """Wall clock once the device has finished its queued work: CUDA kernels are asynchronous,
    so without a sync a stage's time would land in the next stage."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class StageTimer:
    """Accumulates wall time per named stage, in the order stages first appear."""

    def __init__(self, device: torch.device | None = None):
        self.device = device
        self.seconds: "OrderedDict[str, float]" = OrderedDict()

    @contextmanager
    def __call__(self, stage: str):
        start = synced_now(self.device)
        try:
            yield
        finally:
            self.add(stage, synced_now(self.device) - start)

    def add(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    def total(self) -> float:
        return sum(self.seconds.values())


class NullTimer(StageTimer):
    """A timer that measures nothing (no device syncs), for callers that don't ask for timings."""

    @contextmanager
    def __call__(self, stage: str):
        yield
