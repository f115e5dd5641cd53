"""Which parameters does a training configuration really train? One batch, forward + backward, then compare.

    python -m llava.train.check_grads --model_name_or_path builtin:lavida-small --prune_method shirg \
        --lora_enable True [any other llava.train.train flag]

Builds the model exactly as `llava.train.train` does for the same flags (LoRA, `--mm_tunable_parts`, `--bits`,
gradient checkpointing), runs the training loss (token dropout on) on 2 samples — the first two records of
`--data_path` if given, else two built-in EntityGrid-QA images made in memory — and lists every parameter that
received a non-zero gradient. Exit 0 only if that set is EXACTLY the intended one: the LoRA A/B matrices of every
resolved target plus the chosen non-LoRA trainables (the tunable parts minus parameters this objective never
reaches, which the trainer freezes and names). Exit 1 on any difference (a trainable tensor left without
gradient, or a frozen one receiving some), 2 on bad flags.

LoRA's B matrices start at zero, which makes every A gradient exactly zero on the first step; the check sets the
B matrices to small random values first, so "non-zero gradient" means "connected to the loss" for both factors.
DeepSpeed/DDP flags are accepted and ignored: this runs one CPU process.
"""
from __future__ import annotations

import logging
import sys
from collections import OrderedDict
from typing import Optional, Sequence

import numpy as np
import torch

from llava.errors import LavidaError


def builtin_batch(tokenizer, n: int = 2) -> dict:
    """n EntityGrid-QA 'single' images (384..768 px) with one question each, preprocessed and collated."""
    from llava.eval.entitygrid import make_sample
    from llava.train.data import DataCollatorForSupervisedDataset, preprocess_llada

    items = []
    for i in range(n):
        image, _, questions = make_sample("train", 1000 + i, kind="single", questions_per_image=1)
        question, answer, _ = questions[0]
        conv = [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]
        item = preprocess_llada(conv, tokenizer, True, np.random.default_rng(i))
        item.update(image=image.convert("RGB"), index=i, epoch=0)
        items.append(item)
    return DataCollatorForSupervisedDataset(tokenizer.pad_token_id, extra_pad_range=(0, 8))(items)


def data_batch(dargs, tokenizer, max_length: int, n: int = 2) -> dict:
    from llava.train.data import DataCollatorForSupervisedDataset, LazySupervisedDataset

    ds = LazySupervisedDataset(dargs.data_path, tokenizer, dargs.image_folder, max_length, strict=True)
    items = [ds[i] for i in range(min(n, len(ds)))]
    return DataCollatorForSupervisedDataset(tokenizer.pad_token_id, max_length)(items)


def intended_parameters(setup) -> set[str]:
    """LoRA A/B of every resolved target + the non-LoRA trainables, from the configuration (not requires_grad)."""
    lora = {f"{t}.lora_{ab}.default.weight" for t in setup.lora_targets for ab in "AB"}
    return lora | set(setup.non_lora)


def summarise(names: Sequence[str]) -> list[str]:
    """Group names by module path with layer numbers folded: `...layers.{0,1,2}.self_attn.q_proj.lora_A...`."""
    groups: "OrderedDict[str, list[str]]" = OrderedDict()
    for name in names:
        parts = name.split(".")
        key_parts, index = [], None
        for p in parts:
            if p.isdigit() and index is None and key_parts and key_parts[-1] in ("layers", "blocks"):
                index = p
                key_parts.append("#")
            else:
                key_parts.append(p)
        groups.setdefault(".".join(key_parts), []).append(index or "")
    lines = []
    for key, idx in groups.items():
        nums = sorted({i for i in idx if i}, key=int)
        lines.append(key.replace("#", "{" + ",".join(nums) + "}") if nums else key)
    return lines


def check(argv: Optional[Sequence[str]] = None) -> tuple[int, str]:
    from llava.train.train import TrainStep, load_model_for_training, parse_args, validate_args

    margs, dargs, targs = parse_args(argv)
    method, options, spec, parts = validate_args(margs, dargs, targs, need_output=False)
    setup = load_model_for_training(margs, targs, method, options, spec, parts, torch.device("cpu"))
    model = setup.model
    batch = (data_batch(dargs, setup.tokenizer, targs.model_max_length) if dargs.data_path
             else builtin_batch(setup.tokenizer))
    gen = torch.Generator().manual_seed(targs.seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0.0, 1e-3, generator=gen)
    torch.manual_seed(targs.seed)
    model.train()
    loss, _ = TrainStep(model, method, options, targs.token_dropout)(batch, gen)
    loss.backward()

    got = [n for n, p in model.named_parameters() if p.grad is not None and bool(p.grad.abs().sum() > 0)]
    flagged = {n for n, p in model.named_parameters() if p.requires_grad}
    intended = intended_parameters(setup)
    missing = sorted(intended - set(got))
    unexpected = [n for n in got if n not in intended]
    wrong_flag = sorted(flagged ^ intended)
    numel = dict((n, p.numel()) for n, p in model.named_parameters())
    lines = [f"check_grads: --prune_method {method.name}, LoRA on {len(setup.lora_targets)} module(s), "
             f"non-LoRA trainables {len(setup.non_lora)} tensor(s), parts [{', '.join(parts) or 'none'}]; "
             f"loss {float(loss.detach()):.4f}",
             f"received a non-zero gradient: {len(got)} tensor(s), {sum(numel[n] for n in got):,} parameters"]
    lines += [f"  {line}" for line in summarise(got)]
    if setup.unused:
        lines.append("frozen on purpose (never reached by this objective): " + ", ".join(sorted(setup.unused)))
    ok = not missing and not unexpected and not wrong_flag
    if ok:
        frozen = len(numel) - len(got)
        lines.append(f"OK: exactly the intended {len(intended)} tensor(s) received gradients; the other {frozen} "
                     "received none")
    else:
        if missing:
            lines.append(f"FAIL: {len(missing)} intended tensor(s) received no gradient:")
            lines += [f"  {line}" for line in summarise(missing)]
        if unexpected:
            lines.append(f"FAIL: {len(unexpected)} tensor(s) outside the intended set received a gradient:")
            lines += [f"  {line}" for line in summarise(unexpected)]
        if wrong_flag:
            lines.append(f"FAIL: requires_grad differs from the intended set for: {', '.join(wrong_flag[:8])}")
    return (0 if ok else 1), "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="[%(name)s] %(message)s", stream=sys.stderr)
    try:
        code, report = check(argv)
    except LavidaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report)
    return code


if __name__ == "__main__":
    sys.exit(main())
