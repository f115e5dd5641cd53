"""Training checkpoints: `output_dir/checkpoint-N/`, written atomically, verified before any resume.

A checkpoint folder holds the model (a PEFT adapter folder or a full `save_pretrained` checkpoint, so
`checkpoint-N` itself loads with `--model-path` / `--model-base`), `optimizer.pt` + `scheduler.pt` (torch
engine) or `deepspeed/` (DeepSpeed's own files, one optimizer partition per rank), `rng_state_<rank>.pth`, and
LAST `trainer_state.json`: step, data-loader position, run shape (world size, micro batch, accumulation, seed),
and a manifest of every other file with its size (and CRC-32 for files up to 256 MB).

The whole folder is built under a temp name and renamed when complete (`llava.utils.atomic_dir`), so a killed
run leaves either a complete checkpoint or a `checkpoint-N.tmp-*` folder that `latest` ignores (and the next run
deletes). A folder that is complete by name but damaged afterwards (a missing, truncated or altered file) is an
error naming the file; a run never silently restarts from scratch because its checkpoint is bad.
"""
from __future__ import annotations

import json
import random
import re
import shutil
import zlib
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from llava.errors import CheckpointError, InputError
from llava.utils import logger

STATE_NAME = "trainer_state.json"
CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
CRC_LIMIT = 256 * 2**20


def crc32(path: Path) -> int:
    value = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            value = zlib.crc32(chunk, value)
    return value


def manifest(folder: Path) -> dict:
    """relative path -> {size, crc32 (small files only)} for every file under `folder`."""
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != STATE_NAME:
            size = p.stat().st_size
            entry = {"size": size}
            if size <= CRC_LIMIT:
                entry["crc32"] = crc32(p)
            files[str(p.relative_to(folder))] = entry
    return files


def write_state(folder: Path, state: dict) -> None:
    """The manifest is taken here, so call this after every other file is written."""
    state = dict(state, files=manifest(folder))
    (folder / STATE_NAME).write_text(json.dumps(state, indent=1))


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if p.is_dir() and (m := CKPT_RE.match(p.name))]
    return sorted(found)


def stale_temp_folders(output_dir: Path) -> list[Path]:
    """Leftovers of a save that was killed (atomic_dir's temp names)."""
    if not output_dir.is_dir():
        return []
    return [p for p in output_dir.iterdir() if p.is_dir() and ".tmp-" in p.name]


def resolve_resume(arg: Optional[str], output_dir: Path) -> Optional[Path]:
    """`--resume_from_checkpoint`: None, `latest` (highest complete checkpoint-N in output_dir, or None when
    there is none yet: a fresh start, as upstream), or a checkpoint folder."""
    if not arg:
        return None
    if arg == "latest":
        ckpts = list_checkpoints(output_dir)
        if not ckpts:
            logger.info("--resume_from_checkpoint latest: no checkpoint in %s yet, starting from step 0", output_dir)
            return None
        return ckpts[-1][1]
    path = Path(arg)
    if not path.is_dir():
        raise InputError(f"--resume_from_checkpoint {arg}: no such checkpoint folder")
    return path


def verify_checkpoint(folder: Path) -> dict:
    """trainer_state.json of `folder` after checking every file it lists; errors name the bad file."""
    state_file = folder / STATE_NAME
    if not state_file.is_file():
        raise CheckpointError(f"{state_file} is missing: {folder} is incomplete or not a training checkpoint")
    try:
        state = json.loads(state_file.read_text())
        files = state["files"]
        int(state["global_step"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{state_file} is corrupt ({type(e).__name__}: {e})") from None
    for rel, entry in files.items():
        p = folder / rel
        if not p.is_file():
            raise CheckpointError(f"checkpoint file {p} is missing")
        size = p.stat().st_size
        if size != entry["size"]:
            raise CheckpointError(
                f"checkpoint file {p} is truncated or corrupt: {size} bytes, expected {entry['size']}")
        if "crc32" in entry and crc32(p) != entry["crc32"]:
            raise CheckpointError(f"checkpoint file {p} is corrupt: its CRC-32 does not match {STATE_NAME}")
    return state


def torch_load(path: Path, weights_only: bool = True):
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing")
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as e:
        raise CheckpointError(f"cannot read checkpoint file {path}: {e}") from None


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def prune_checkpoints(output_dir: Path, keep: Optional[int]) -> None:
    """`--save_total_limit`: delete the oldest checkpoints beyond `keep`."""
    if not keep or keep < 1:
        return
    for _, path in list_checkpoints(output_dir)[:-keep]:
        logger.info("deleting %s (--save_total_limit %d)", path, keep)
        shutil.rmtree(path, ignore_errors=True)
