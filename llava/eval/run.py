"""Ask one question about one image: `python -m llava.eval.run --image PATH --question TEXT`.

Prints the answer, how many visual tokens the LM saw, and per-stage wall times. Defaults to
the built-in small model (random weights until a trained one ships: its answers are noise,
the pipeline, token counts and timings are real) and the bundled demo image.

`--steps` is the total number of diffusion steps for the whole answer; it is split evenly
over the blocks (gen_length / block_length of them). Without it, one token is decoded per
step (steps = gen_length), LaViDa's eval default.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from llava.errors import InputError, LavidaError, OneLineParser
from llava.eval.datasets import SHORT_ANSWER_SUFFIX
from llava.eval.metrics import exact_match
from llava.mm_utils import inference_ids, load_image
from llava.model.builder import SMALL_MODEL_NAME, load_pretrained_model
from llava.model.language_model.llada.generate import (
    SCHEDULES,
    canonical_schedule,
    check_sampling,
    default_block_length,
    steps_per_block,
)
from llava.utils import StageTimer

PLAYGROUND = Path(__file__).resolve().parents[2] / "playground"
DEFAULT_IMAGE = PLAYGROUND / "images" / "demo.png"
DEFAULT_QUESTION = "What is the value of the tallest bar?"
# The built-in model trained here on EntityGrid-QA (`make train-tiny`); the random-weight one stays available as
# builtin:lavida-small (tests use it).
TRAINED_MODEL = PLAYGROUND / "models" / "lavida-tiny"


def default_model_path() -> str:
    return str(TRAINED_MODEL) if (TRAINED_MODEL / "config.json").is_file() else SMALL_MODEL_NAME
SEED_RANGE = (-(2**63), 2**63 - 1)  # int64, what torch's generators (and the prune methods') take


def build_parser() -> argparse.ArgumentParser:
    from shirg_patches import REGISTRY

    p = OneLineParser(prog="python -m llava.eval.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--image", default=str(DEFAULT_IMAGE), help="image file (default: bundled demo)")
    p.add_argument("--question", default=DEFAULT_QUESTION)
    p.add_argument("--model-path", default=default_model_path(),
                   help=f"local LaViDa folder or {SMALL_MODEL_NAME} (random weights); default: the trained built-in "
                        f"model in {TRAINED_MODEL.relative_to(PLAYGROUND.parent)} when present")
    p.add_argument("--short-answer", action="store_true",
                   help="append the short-answer instruction to the prompt, as the evaluation harness and the "
                        "trained built-in model do (SHIRG's text relevance still sees the question alone)")
    p.add_argument("--expected", default=None, help="the expected answer: the report says whether it matched")
    p.add_argument("--model-base", "--model_base", default=None,
                   help="base model when --model-path is a LoRA adapter folder (merged at load)")
    p.add_argument("--prune_method", "--prune-method", default="lavida", choices=None,
                   help=f"how visual tokens are produced: {', '.join(sorted(REGISTRY))} (default: lavida)")
    pool = p.add_mutually_exclusive_group()
    pool.add_argument("--pool", dest="pool", action="store_true", default=None, help="LaViDa 27->14 pooling on")
    pool.add_argument("--no-pool", dest="pool", action="store_false",
                      help="pooling off (3699 tokens for a square image)")
    g = p.add_argument_group("diffusion sampler")
    g.add_argument("--gen-length", type=int, default=32, help="answer slots L")
    g.add_argument("--block-length", type=int, default=None, help="default: min(128, gen-length), which must divide it")
    g.add_argument("--steps", type=int, default=None, help="total diffusion steps (default: gen-length)")
    g.add_argument("--schedule", default=None,
                   help=f"unmask-count schedule: none (the even split, default), {', '.join(SCHEDULES)}")
    g.add_argument("--shift", type=float, default=None, help="alpha of --schedule shift (default 3); only with it")
    g.add_argument("--remasking", default="low_confidence", help="low_confidence/random/entropy/margin")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false",
                   help="recompute the prompt every step")
    g.add_argument("--seed", type=int, default=0)
    add_method_option_flags(p)
    p.add_argument("--save_heatmap", "--save-heatmap", default=None, metavar="PNG",
                   help="write a picture of the kept tokens (methods that draw one: "
                        f"{', '.join(n for n, m in REGISTRY.items() if m.heatmap) or 'none'})")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return p


def option_flags() -> dict[str, tuple]:
    """flag -> (OptionSpec, [methods taking it]) over every registered method's options dataclass.
    A field shared by several methods (e.g. `budget`) is one flag."""
    from shirg_patches import REGISTRY

    flags: dict[str, tuple] = {}
    for name, method in REGISTRY.items():
        for spec in method.options.specs():
            flags.setdefault(spec.flag, (spec, []))[1].append(name)
    return flags


def add_method_option_flags(parser: argparse.ArgumentParser) -> None:
    """One argument group per method, built from its options dataclass; values are parsed and
    validated by the dataclass (so errors are one clear line, not argparse usage)."""
    seen = set()
    groups = {}
    for flag, (spec, methods) in option_flags().items():
        if flag in seen:
            continue
        seen.add(flag)
        owner = methods[0] if len(methods) == 1 else "pruning baselines"
        if owner not in groups:
            groups[owner] = parser.add_argument_group(f"--prune_method {owner}")
        choices = f" [{'|'.join(spec.choices)}]" if spec.choices else ""
        applies = f" (methods: {', '.join(methods)})" if len(methods) > 1 else ""
        dashed = flag.replace("_", "-")
        names = [f"--{flag}"] + ([f"--{dashed}"] if dashed != flag else [])
        default = ("" if spec.default is None else  # the help text says what leaving it out does
                   f"; default {spec.default:g}" if isinstance(spec.default, float) else f"; default {spec.default}")
        groups[owner].add_argument(*names, dest=f"opt_{flag}", default=None, metavar=spec.type.__name__.upper(),
                                   help=f"{spec.help}{choices}{default}{applies}")


def prune_options(args) -> dict:
    """The chosen method's options from the flags given; a flag of another method is an error."""
    from shirg_patches import get_method

    method = get_method(args.prune_method)
    mine = {spec.flag: spec for spec in method.options.specs()}
    opts = {}
    for flag, (spec, methods) in option_flags().items():
        value = getattr(args, f"opt_{flag}", None)
        if value is None:
            continue
        if flag not in mine:
            raise InputError(f"--{flag} only applies to --prune_method {' / '.join(methods)}")
        opts[mine[flag].name] = mine[flag].parse(value)
    method.make_options(opts)  # validate before the model loads, not after encoding the image
    if args.save_heatmap is not None:
        if method.heatmap is None:
            raise InputError(f"--save_heatmap is not supported by --prune_method {method.name}")
        from shirg_patches.heatmap import check_heatmap_path

        check_heatmap_path(args.save_heatmap)
    if args.pool and method.select is not None:
        raise InputError(f"--prune_method {method.name} never pools; drop --pool")
    return opts


def run(args) -> dict:
    from shirg_patches import REGISTRY, get_method

    method = get_method(args.prune_method)
    question = check_question_text(args.question).strip()
    if not question and not method.accepts_empty_question:
        takers = [n for n, m in REGISTRY.items() if m.accepts_empty_question]
        raise InputError(f"--question is empty (only --prune_method {' / '.join(takers)} accepts that)")
    opts = prune_options(args)
    # validates --gen-length, --block-length (or its default), --steps and the sampler's options before the model loads
    steps_per_block(args.gen_length, args.block_length, args.steps)
    block_length = args.block_length if args.block_length is not None else default_block_length(args.gen_length)
    schedule_kwargs = {"shift": args.shift} if args.shift is not None else None
    check_sampling(args.temperature, args.remasking, args.schedule, schedule_kwargs)
    schedule = canonical_schedule(args.schedule)
    if not SEED_RANGE[0] <= args.seed <= SEED_RANGE[1]:
        raise InputError(f"--seed {args.seed} is out of range; use an integer in [{SEED_RANGE[0]}, {SEED_RANGE[1]}]")
    device = parse_device(args.device)
    timer = StageTimer(device)
    with timer("preprocess"):
        image = load_image(args.image)
    tokenizer, model, _, _ = load_pretrained_model(args.model_path, args.model_base, device=device)
    input_ids, question_ids = inference_ids(
        tokenizer, question, f"{question}{SHORT_ANSWER_SUFFIX}" if args.short_answer else question)
    out = model.generate(
        input_ids, [image], prune_method=method.name, question_ids=question_ids,
        prune_options={**opts, "seed": args.seed},
        pool=args.pool, timer=timer, gen_length=args.gen_length, block_length=block_length, steps=args.steps,
        temperature=args.temperature, remasking=args.remasking, schedule=schedule,
        schedule_kwargs=schedule_kwargs, prefix_cache=args.prefix_cache,
        generator=torch.Generator(device=device).manual_seed(args.seed),  # the sampler draws on the model's device
    )
    answer = tokenizer.decode(out.tokens[0].tolist(), skip_special_tokens=True).lstrip("!").strip()
    visual = out.visual[0]
    if args.save_heatmap:
        with timer("heatmap"):
            method.heatmap(args.save_heatmap, image, visual)
    notes = plain_values(visual.info)
    if str(args.model_path) == SMALL_MODEL_NAME:
        notes["model"] = "built-in small model with random weights: the answer is noise, counts and timings are real"
    expected = {} if args.expected is None else {
        "expected": args.expected, "correct": bool(exact_match(answer, args.expected))}
    return {
        "answer": answer,
        **expected,
        "visual_tokens": visual.lm_token_count,
        "prompt_tokens": out.prompt_length,
        "prune_method": method.name,
        "candidates": visual.candidates,
        "notes": notes,
        "nfe": out.generation.nfe,
        "timings_ms": {k: round(v * 1000, 2) for k, v in timer.seconds.items()},
        "steps": len(out.generation.step_seconds),
        "image_size": list(image.size),
    }


def check_question_text(question: str) -> str:
    """The question as text. Python decodes argv with `surrogateescape`, so bytes that are not UTF-8 arrive as
    lone surrogates, which no tokenizer can encode: refuse them here, naming the first bad byte."""
    try:
        question.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(question[e.start])
        what = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"character U+{code:04X}"
        raise InputError(f"--question is not valid UTF-8 text ({what} at position {e.start})") from None
    return question


def parse_device(name: str) -> torch.device:
    """`--device` as a torch device this CLI can run on: cpu, or cuda[:N] with that GPU present."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise InputError(f"unknown --device {name!r}; use cpu or cuda[:N]") from None
    if device.type not in ("cpu", "cuda"):
        raise InputError(f"unsupported --device {name!r} (a {device.type} device); use cpu or cuda[:N]")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError("--device cuda was asked for but CUDA is not available; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA device(s)")
    return device


def plain_values(notes: dict) -> dict:
    """The entries worth showing to a user: plain values, not tensors or private keys."""
    return {k: v for k, v in notes.items() if isinstance(v, (str, int, float)) and not k.startswith("_")}


def format_report(r: dict) -> str:
    lines = [f"answer: {r['answer']!r}"
             + (f"  (expected {r['expected']!r}: {'correct' if r['correct'] else 'wrong'})" if "expected" in r else ""),
             f"visual tokens: {r['visual_tokens']}  (method {r['prune_method']}, candidates {r['candidates']}, "
             f"prompt {r['prompt_tokens']} tokens, image {r['image_size'][0]}x{r['image_size'][1]})"]
    for k, v in r["notes"].items():
        lines.append(f"  {k}: {v}")
    lines.append(f"timings (ms), {r['steps']} diffusion steps, NFE {r['nfe']}:")
    for stage, ms in r["timings_ms"].items():
        extra = f"  ({ms / max(r['steps'], 1):.2f} per step)" if stage == "steps" else ""
        lines.append(f"  {stage:<11}{ms:>10.2f}{extra}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a bad flag (2, already printed as one line)
        return e.code if isinstance(e.code, int) else 2
    # WARNING, not INFO: the pooling decision is already in the report's notes, and an error
    # must be the only line on stderr
    logging.basicConfig(level=logging.WARNING, format="[%(name)s] %(message)s", stream=sys.stderr)
    try:
        report = run(args)
    except LavidaError as e:
        # one line even when the message quotes a multi-line library error
        print("error: " + " / ".join(line.strip() for line in str(e).splitlines() if line.strip()), file=sys.stderr)
        return 2
    print(json.dumps(report) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
