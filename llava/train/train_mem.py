"""Upstream's launch entry (`torchrun ... llava/train/train_mem.py --deepspeed ...`): the same trainer.

Upstream's file differs from train.py only by asking for flash-attention; here the LM uses flash-attn by itself
when the package is installed and the run is bf16 on CUDA, so this is a plain alias. Works as a script path or
as `python -m llava.train.train_mem`.
"""
import os
import sys

if __package__ in (None, ""):  # run as a file path: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from llava.train.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
