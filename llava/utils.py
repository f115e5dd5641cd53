"""Small shared helpers: the package logger and per-stage wall-clock timing."""
from __future__ import annotations

import logging
import time
from collections import OrderedDict
from contextlib import contextmanager

import torch

logger = logging.getLogger("llava")


def _sync(device: torch.device | None) -> None:
    # CUDA kernels are asynchronous: without a sync a stage's time lands in the next stage.
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


class StageTimer:
    """Accumulates wall time per named stage, in the order stages first appear."""

    def __init__(self, device: torch.device | None = None):
        self.device = device
        self.seconds: "OrderedDict[str, float]" = OrderedDict()

    @contextmanager
    def __call__(self, stage: str):
        _sync(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            _sync(self.device)
            self.add(stage, time.perf_counter() - start)

    def add(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    def total(self) -> float:
        return sum(self.seconds.values())


class NullTimer(StageTimer):
    """A timer that measures nothing (no device syncs), for callers that don't ask for timings."""

    @contextmanager
    def __call__(self, stage: str):
        yield
