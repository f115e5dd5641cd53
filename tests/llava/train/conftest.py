"""Fixtures for trainer tests: a tiny data set (8 bundled records) and in-process / subprocess runs.

Runs use the built-in small model with `stride` at a 32-token budget, so the LM sees short sequences and a step
takes a fraction of a second; the objective and the data pipeline are the real ones.
"""
import glob
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.cli_helpers import call_main

REPO = Path(__file__).resolve().parents[3]
PLAYGROUND = REPO / "playground" / "data"
FAST = ["--prune_method", "stride", "--prune_options", "budget=32", "--save_steps", "0",
        "--learning_rate", "1e-3"]


def common(data, out, *extra) -> list:
    """Trainer argv for a fast run on `data` into `out` (FAST, batch 2), then `extra`."""
    return ["--data_path", data, "--output_dir", out, *FAST, "--per_device_train_batch_size", "2", *extra]


def one_error_line(err: str) -> str:
    """The single `error: ...` line a CLI printed for bad input (and no traceback)."""
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def write_data_list(folder: Path, n: int = 8) -> Path:
    """A yaml data list with the first n bundled records (images from the repo)."""
    path = folder / "data.yaml"
    path.write_text("datasets:\n"
                    f"  - json_path: {PLAYGROUND / 'train.json'}\n"
                    f"    image_root: {PLAYGROUND}\n"
                    f"    sampling_strategy: first:{n}\n")
    return path


@pytest.fixture(scope="session")
def data8(tmp_path_factory) -> Path:
    return write_data_list(tmp_path_factory.mktemp("data8"))


@pytest.fixture
def train_main(capsys):
    """`train_main(*argv) -> (exit code, stderr)` for `llava.train.train.main`, in this process.

    Root handlers are cleared around the call so the trainer's own logging set-up writes to the captured
    stderr, as in a terminal."""
    from llava.train.train import main

    def call(*argv):
        code = call_main(main, argv)
        return code, capsys.readouterr().err

    return call


def subprocess_env(**extra) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env.update(extra)
    return env


def run_module(*args, timeout=600, **popen) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, env=subprocess_env(), capture_output=True,
                          text=True, timeout=timeout, **popen)


def final_weights(out: Path, folder: str = "final") -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors files in out/<folder> (full checkpoint or adapter + non-LoRA files)."""
    from safetensors.torch import load_file

    state = {}
    for f in sorted(glob.glob(str(out / folder / "*.safetensors"))):
        for k, v in load_file(f).items():
            state[f"{Path(f).name}:{k}"] = v
    assert state, f"no weights in {out / folder}"
    return state


def assert_same_weights(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    worst = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    assert worst <= atol, f"weights differ by up to {worst:g}"
