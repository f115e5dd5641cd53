"""Small shared helpers: the package logger, per-stage wall-clock timing, atomic writes."""
from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
import time
import uuid
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a local torch.distributed rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def give_mode_of(reference: Path, *paths: Path) -> None:
    """Give `paths` the permission bits of `reference`: safetensors creates its files 0600, while the config
    files beside them get the usual umask permissions."""
    mode = reference.stat().st_mode & 0o777
    for path in paths:
        os.chmod(path, mode)


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a new empty folder next to `path`; when the block succeeds it replaces `path`.

    A failure anywhere (including the final rename) leaves `path` as it was, old contents
    included, and no temp folder behind: readers never see a half-written folder.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path} exists and is not a folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    # mkdir (not mkdtemp, which is always 0700) so the result gets the usual umask permissions
    tmp = path.parent / f"{path.name}.tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    old = tmp.with_name(tmp.name + "-old")  # unique because tmp is
    try:
        yield tmp
        # Move the old folder aside (not delete) until the new one is in place, so a failed
        # final rename can put it back instead of losing it.
        if path.exists():
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            if old.exists():
                os.replace(old, path)
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_file(path: str | os.PathLike, permissions: int = 0o644) -> Iterator[BinaryIO]:
    """Yield a binary file handle on a temp file next to `path`, renamed over `path` when the
    block succeeds, so a failure never leaves a half-written file (the old one stays)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
        os.chmod(tmp, permissions)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
