"""Fold a LoRA adapter into its base and write a normal checkpoint folder.

    python -m llava.train.merge_lora --model-path OUTPUT/final --model-base BASE --out MERGED [--max-shard-size 5GB]

MERGED then loads with `load_pretrained_model(MERGED)` / `python -m llava.eval.run --model-path MERGED` with no
peft involved. The merge runs in fp32 on CPU by default (`--dtype bf16` halves memory for an 8B base); the folder
is written atomically (nothing half-written on failure).
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

import torch

from llava.errors import LavidaError


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llava.train.merge_lora", description=__doc__.split("\n\n")[0])
    p.add_argument("--model-path", "--model_path", required=True, help="adapter folder (e.g. OUTPUT/final)")
    p.add_argument("--model-base", "--model_base", required=True, help="the base the adapter was trained on")
    p.add_argument("--out", required=True, help="folder for the merged checkpoint")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--max-shard-size", default="5GB")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="[%(name)s] %(message)s", stream=sys.stderr)
    from llava.model.builder import load_pretrained_model, parse_size, save_pretrained

    try:
        parse_size(args.max_shard_size)
        dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
        tokenizer, model, _, _ = load_pretrained_model(args.model_path, args.model_base, torch_dtype=dtype)
        save_pretrained(model, tokenizer, args.out, max_shard_size=args.max_shard_size)
    except LavidaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"merged {args.model_path} into {args.model_base} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
