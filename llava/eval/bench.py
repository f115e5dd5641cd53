"""`make bench`: vision + selection wall time per prune method, measured side by side.

"vision+sel" is everything before the LM: SigLIP, projector, and the method's own step
(pool + merge, or scoring + selection); image preprocessing is excluded. Methods run in
interleaved rounds, so drift and warm-up hit all of them alike; the table gives medians and
ratios to `pool`.

Two models:
- the built-in small model: every method runs its whole encode path each round;
- a random-weight model with the real SigLIP-so400m tower (26 layers, 1152-d) and the real
  1152->4096->4096 projector. There `pool`, `full` and `shirg` run their whole encode path
  each round. The baselines prune exactly the tokens `full` encodes, so their SigLIP+projector
  cost IS `full`'s; their rows add their own selection time (measured each round on the
  real-size candidates captured once) to `full`'s vision time of the same round, instead of
  re-running a ~1 min 5-view encode per baseline.

A third table times whole answers (encode + prefill + 16 diffusion steps) on the small model
with and without the prefix K/V cache, for pool, full and shirg; a fourth gives their answers/s at
batch 1, 4 and 8 (`generate_batch`, the evaluation harness's batched path).

TopV selects inside the LM during prefill; here it scores the pre-LM features (its documented
fallback), i.e. the same Sinkhorn work without an LM. This is a benchmark, not a test:
numbers depend on the machine. Read the CPU ratios against `python -m llava.eval.costmodel`.

`--load` runs only a separate memory benchmark instead: a ~0.85 GB model is saved sharded
(`--max-shard-size`, default 200MB) and as one file, and each is loaded in a fresh process
whose peak RSS growth is compared with the weights' size on disk. `make bench` runs all three modes.

`--train` runs only the training benchmark: on the small model, training steps (forward + backward + AdamW, the
trainer's own engine, bundled data, micro-batch 2) for full LaViDa-style training (pool), the SHIRG LoRA stage
and LoRA with the LM in 4-bit, each in a fresh process: samples/s and peak RSS growth over the process before
the model was built; then the cost model's per-GPU training memory at the real LaViDa-8B dims.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from typing import Optional, Sequence

import torch

from llava.eval.run import DEFAULT_IMAGE, DEFAULT_QUESTION
from llava.mm_utils import inference_ids, load_image
from llava.utils import StageTimer


def method_groups() -> tuple[list[str], list[str]]:
    """(methods that encode their own tokens each round, budgeted baselines over `full`'s candidates),
    read from the registry: LaViDa's own methods and methods with their own views vs the rest."""
    from shirg_patches import REGISTRY

    encoded = [n for n, m in REGISTRY.items() if not m.budgeted and (m.pool is not None or m.encode is not None)]
    return encoded, [n for n, m in REGISTRY.items() if m.budgeted]


def so400m_bench_model():
    """Real SigLIP-so400m dims + real projector; a 1-layer LM of width 4096 (only its embedding
    table is used before the LM, for SHIRG's question similarity)."""
    from llava.model.builder import build_small_tokenizer, small_model_config
    from llava.model.language_model.llava_llada import LlavaLLaDAConfig, LlavaLLaDAForCausalLM

    tok = build_small_tokenizer()
    raw = small_model_config(tok)
    raw.update(d_model=4096, n_layers=1, n_heads=32, n_kv_heads=32, mlp_hidden_size=1024, mm_hidden_size=1152)
    raw.pop("vision_config")
    raw["mm_vision_tower"] = "google/siglip-so400m-patch14-384"
    raw["mm_vision_attn_implementation"] = "eager"  # what a real LaViDa checkpoint runs with
    torch.manual_seed(0)
    return tok, LlavaLLaDAForCausalLM(LlavaLLaDAConfig.from_dict(raw)).eval()


@dataclasses.dataclass
class Samples:
    total: list = dataclasses.field(default_factory=list)
    select: list = dataclasses.field(default_factory=list)
    vision: list = dataclasses.field(default_factory=list)
    tokens: int = 0


def encode_once(model, image, method, qids) -> tuple[float, float, float, int]:
    """(vision+sel, selection, vision+projector) seconds and LM token count for one encode."""
    from shirg_patches import get_method

    timer = StageTimer()
    v = model.encode_image(image, method, qids, {"seed": 0}, timer=timer)
    if v.context is not None:  # selection deferred into the LM: score the pre-LM features
        with timer("selection"):
            get_method(method).select(v.context)
    s = timer.seconds
    select = s.get("selection", 0.0) + s.get("merge", 0.0)
    vision = s.get("vision", 0.0) + s.get("projector", 0.0)
    return vision + select, select, vision, v.lm_token_count


def capture_candidates(model, image, qids):
    """The `full` candidates with everything any baseline reads (attention, keys, question): a
    method that defers its selection into the LM returns exactly that context before the LM."""
    from shirg_patches import REGISTRY

    deferred = next(m for m in REGISTRY.values() if m.prefill_hook is not None)
    probe = dataclasses.replace(deferred, needs_attention=True, needs_keys=True)
    return model.encode_image(image, probe, qids, {"seed": 0}).context


def time_selection(ctx, method) -> tuple[float, int]:
    from shirg_patches import get_method

    ctx = dataclasses.replace(ctx, options=get_method(method).make_options({"budget": ctx.budget}))
    start = time.perf_counter()
    get_method(method).select(ctx)
    return time.perf_counter() - start, ctx.budget


def bench(model, tokenizer, image, question, methods, repeats, warmup, shared_vision) -> dict[str, Samples]:
    """Interleaved rounds; with `shared_vision` baselines reuse `full`'s vision time of the round."""
    qids = tokenizer(question, add_special_tokens=False).input_ids
    samples = {m: Samples() for m in methods}
    baselines = method_groups()[1]
    encoded = [m for m in methods if not (shared_vision and m in baselines)]
    ctx = capture_candidates(model, image, qids) if shared_vision else None
    with torch.no_grad():
        for r in range(warmup + repeats):
            round_vision = {}
            for m in encoded:
                total, select, vision, tokens = encode_once(model, image, m, qids)
                round_vision[m] = vision
                if r >= warmup:
                    s = samples[m]
                    s.total.append(total), s.select.append(select), s.vision.append(vision)
                    s.tokens = tokens
            for m in methods:
                if m in encoded:
                    continue
                select, tokens = time_selection(ctx, m)
                if r >= warmup:
                    s = samples[m]
                    vision = round_vision["full"]
                    s.total.append(vision + select), s.select.append(select), s.vision.append(vision)
                    s.tokens = tokens
    return samples


def format_table(title: str, samples: dict[str, Samples]) -> str:
    med = {m: statistics.median(s.total) for m, s in samples.items()}
    base = med.get("pool", next(iter(med.values())))
    header = f"{'method':<10}{'LM tokens':>10}{'vision+sel ms':>15}{'ratio':>8}{'select ms':>11}{'select/vision':>15}"
    lines = [title, header]
    for m, s in samples.items():
        sel, vis = statistics.median(s.select), statistics.median(s.vision)
        lines.append(f"{m:<10}{s.tokens:>10}{med[m] * 1e3:>15.1f}{med[m] / base:>7.2f}x"
                     f"{sel * 1e3:>11.2f}{(sel / vis if vis else 0.0):>14.1%}")
    return "\n".join(lines)


def bench_answers(model, tokenizer, image, question, methods, repeats, gen_length=32, steps=16) -> str:
    """Whole-answer latency (encode + prefill + steps) with and without the prefix cache."""
    ids, qids = inference_ids(tokenizer, question)
    times = {(m, c): [] for m in methods for c in (True, False)}
    for r in range(repeats + 1):
        for m in methods:
            for cached in (True, False):
                start = time.perf_counter()
                model.generate(ids, [image], prune_method=m, question_ids=qids, gen_length=gen_length,
                               block_length=gen_length, steps=steps, prefix_cache=cached)
                if r:  # round 0 is warm-up
                    times[(m, cached)].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med[(methods[0], True)]
    lines = [f"{'method':<10}{'cached ms':>11}{'ratio':>8}{'uncached ms':>13}{'ratio':>8}{'cache speed-up':>16}"]
    for m in methods:
        c, u = med[(m, True)], med[(m, False)]
        lines.append(f"{m:<10}{c * 1e3:>11.1f}{c / base:>7.2f}x{u * 1e3:>13.1f}{u / base:>7.2f}x{u / c:>15.2f}x")
    return "\n".join(lines)


def bench_throughput(model, tokenizer, image, question, methods, repeats, batches=(1, 4, 8), gen_length=32,
                     steps=16) -> str:
    """Answers per second at each batch size (`generate_batch`, prefix cache on): B copies of one question
    answered together, median of `repeats` rounds after a warm-up round, interleaved across methods."""
    ids, qids = inference_ids(tokenizer, question)
    times = {(m, b): [] for m in methods for b in batches}
    for r in range(repeats + 1):
        for m in methods:
            for b in batches:
                start = time.perf_counter()
                model.generate_batch([ids] * b, [[image]] * b, prune_method=m, question_ids=[qids] * b,
                                     gen_length=gen_length, block_length=gen_length, steps=steps)
                if r:
                    times[(m, b)].append(time.perf_counter() - start)
    rate = {k: k[1] / statistics.median(v) for k, v in times.items()}
    lines = [f"{'method':<10}" + "".join(f"{f'batch {b} ans/s':>17}" for b in batches)
             + f"{f'x batch {batches[0]} at {batches[-1]}':>18}"]
    for m in methods:
        lines.append(f"{m:<10}" + "".join(f"{rate[(m, b)]:>17.2f}" for b in batches)
                     + f"{rate[(m, batches[-1])] / rate[(m, batches[0])]:>17.2f}x")
    return "\n".join(lines)


def load_bench_model():
    """~0.85 GB of fp32 weights: a 10-layer 1024-d LLaDA and a 12-layer 768-d SigLIP (random)."""
    from llava.model.builder import build_small_tokenizer, small_model_config
    from llava.model.language_model.llava_llada import LlavaLLaDAConfig, LlavaLLaDAForCausalLM

    tok = build_small_tokenizer()
    raw = small_model_config(tok)
    raw.update(d_model=1024, n_layers=10, n_heads=16, n_kv_heads=16, mlp_hidden_size=2816, mm_hidden_size=768)
    raw["vision_config"].update(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
    torch.manual_seed(0)
    return tok, LlavaLLaDAForCausalLM(LlavaLLaDAConfig.from_dict(raw)).eval()


def _rss_bytes(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))
    except (OSError, StopIteration):
        return None


def load_child(folder: str) -> None:
    """Runs in a fresh interpreter: load `folder`, print RSS before/after as JSON.

    The peak is VmHWM where /proc exists: ru_maxrss survives fork+exec on Linux, so a child of
    the parent that just built the model would report the parent's size."""
    import json
    import resource

    from llava.constants import SIGLIP_IMAGE_SIZE
    from llava.model.builder import load_pretrained_model, load_tokenizer, siglip_image_processor

    load_tokenizer(folder)  # import and warm up everything but the weights
    siglip_image_processor(SIGLIP_IMAGE_SIZE)
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    baseline = _rss_bytes("VmRSS") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    start = time.perf_counter()
    load_pretrained_model(folder)
    seconds = time.perf_counter() - start
    peak = _rss_bytes("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    print(json.dumps({"baseline": baseline, "peak": peak, "seconds": seconds}))


def bench_load(shard_sizes: Sequence[str]) -> str:
    """Save the mid-size model with each shard size, load each in a fresh process; peak RSS
    growth during loading over the weights' size on disk (goal <= 1.3x: one copy, not two)."""
    import json
    import subprocess
    import tempfile
    from pathlib import Path

    from llava.model.builder import save_pretrained

    tok, model = load_bench_model()
    rows = [f"{'max shard':>10}{'files':>7}{'on disk MB':>12}{'baseline MB':>13}{'peak MB':>10}"
            f"{'growth MB':>11}{'ratio':>8}{'load s':>8}"]
    with tempfile.TemporaryDirectory(prefix="lavida-load-bench-") as tmp:
        for size in shard_sizes:
            folder = save_pretrained(model, tok, Path(tmp) / f"ckpt-{size}", max_shard_size=size)
            files = list(folder.glob("*.safetensors"))
            disk = sum(f.stat().st_size for f in files)
            child = subprocess.run([sys.executable, "-m", "llava.eval.bench", "--load-child", str(folder)],
                                   capture_output=True, text=True)
            if child.returncode:
                raise RuntimeError(f"loading {folder} in a child process failed:\n{child.stderr[-2000:]}")
            r = json.loads(child.stdout.strip().splitlines()[-1])
            growth = r["peak"] - r["baseline"]
            rows.append(f"{size:>10}{len(files):>7}{disk / 1e6:>12.0f}{r['baseline'] / 1e6:>13.0f}"
                        f"{r['peak'] / 1e6:>10.0f}{growth / 1e6:>11.0f}{growth / disk:>7.2f}x{r['seconds']:>8.1f}")
    return "\n".join(rows)


TRAIN_MODES = {
    # name: (trainer flags, what it is)
    "full": (["--prune_method", "pool"], "full (pool)"),
    "lora": (["--prune_method", "shirg", "--lora_enable", "True"], "LoRA (shirg)"),
    "lora4": (["--prune_method", "shirg", "--lora_enable", "True", "--bits", "4"], "LoRA+4bit (shirg)"),
}


def train_child(mode: str, steps: int, batch: int) -> None:
    """One mode in this (fresh) process: 1 warm-up + `steps` timed optimizer steps; prints a JSON line."""
    import json
    import resource

    from llava.train.data import DataCollatorForSupervisedDataset, LazySupervisedDataset
    from llava.train.train import (
        Dist,
        TorchEngine,
        TrainStep,
        count_parameters,
        load_model_for_training,
        make_optimizer,
        micro_seed,
        parse_args,
        validate_args,
    )

    data = "playground/data/train.json"
    margs, dargs, targs = parse_args(["--data_path", data, "--image_folder", "playground/data", "--output_dir",
                                      "unused", "--per_device_train_batch_size", str(batch),
                                      "--learning_rate", "1e-4", *TRAIN_MODES[mode][0]])
    method, options, spec, parts = validate_args(margs, dargs, targs)
    scale = 1 if sys.platform == "darwin" else 1024
    baseline = _rss_bytes("VmRSS") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    setup = load_model_for_training(margs, targs, method, options, spec, parts, torch.device("cpu"))
    dataset = LazySupervisedDataset(data, setup.tokenizer, "playground/data", targs.model_max_length)
    collate = DataCollatorForSupervisedDataset(setup.tokenizer.pad_token_id, targs.model_max_length)
    optimizer, scheduler, _ = make_optimizer(setup.model, targs, steps + 1)
    engine = TorchEngine(TrainStep(setup.model, method, options, targs.token_dropout), optimizer, scheduler, targs,
                         Dist(), 1)
    seconds = []
    for step in range(steps + 1):
        batch_items = collate([dataset[(step * batch + i) % len(dataset)] for i in range(batch)])
        start = time.perf_counter()
        engine.micro_step(batch_items, torch.Generator().manual_seed(micro_seed(0, step, 0)), last=True)
        engine.optimizer_step()
        seconds.append(time.perf_counter() - start)
    peak = _rss_bytes("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    trainable, total = count_parameters(setup.model)
    print(json.dumps({"seconds": statistics.median(seconds[1:]), "batch": batch, "growth": peak - baseline,
                      "trainable": trainable, "total": total}))


def bench_train(steps: int, batch: int) -> str:
    import json
    import subprocess

    rows = [f"{'mode':<19}{'trainable':>12}{'of':>12}{'step s':>9}{'samples/s':>11}{'peak RSS growth MB':>20}"]
    for mode, (_, label) in TRAIN_MODES.items():
        child = subprocess.run([sys.executable, "-m", "llava.eval.bench", "--train-child", mode, "--train-steps",
                                str(steps), "--train-batch", str(batch)], capture_output=True, text=True)
        if child.returncode:
            raise RuntimeError(f"training benchmark {mode} failed:\n{child.stderr[-2000:]}")
        r = json.loads(child.stdout.strip().splitlines()[-1])
        rows.append(f"{label:<19}{r['trainable']:>12,}{r['total']:>12,}{r['seconds']:>9.2f}"
                    f"{r['batch'] / r['seconds']:>11.2f}{r['growth'] / 1e6:>20.0f}")
    return "\n".join(rows)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llava.eval.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--image", default=str(DEFAULT_IMAGE))
    p.add_argument("--question", default=DEFAULT_QUESTION)
    p.add_argument("--methods", default=None, help="comma list (default: every registered method but lavida)")
    p.add_argument("--repeats", type=int, default=5, help="rounds on the small model")
    p.add_argument("--large-repeats", type=int, default=2, help="rounds on the so400m-size model (~2.5 min each)")
    p.add_argument("--skip-large", action="store_true", help="only the built-in small model")
    p.add_argument("--load", action="store_true",
                   help="only the checkpoint-loading memory benchmark (peak RSS vs weights on disk)")
    p.add_argument("--max-shard-size", default="200MB", help="shard size of the --load checkpoint")
    p.add_argument("--load-child", help=argparse.SUPPRESS)
    p.add_argument("--train", action="store_true",
                   help="only the training benchmark (small model: full, LoRA, LoRA+4bit; 8B-dim memory model)")
    p.add_argument("--train-steps", type=int, default=3, help="timed training steps per mode (after 1 warm-up)")
    p.add_argument("--train-batch", type=int, default=2, help="micro-batch of the training benchmark")
    p.add_argument("--train-child", choices=sorted(TRAIN_MODES), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.load_child:
        load_child(args.load_child)
        return 0
    if args.train_child:
        train_child(args.train_child, args.train_steps, args.train_batch)
        return 0
    if args.train:
        from llava.eval.costmodel import ModelDims, format_train_memory, train_memory_rows

        threads = torch.get_num_threads()
        print(f"\n== training steps on the built-in small model: fp32, {threads} threads, micro-batch "
              f"{args.train_batch}, median of {args.train_steps} steps after 1 warm-up, fresh process per row ==")
        print(bench_train(args.train_steps, args.train_batch), flush=True)
        print(f"\n== cost model ==\n{format_train_memory(train_memory_rows(ModelDims()))}")
        return 0
    if args.load:
        from llava.errors import InputError
        from llava.model.builder import parse_size

        try:
            parse_size(args.max_shard_size)  # fail before building and saving ~1 GB
        except InputError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        table = bench_load([args.max_shard_size, "100GB"])  # sharded, then one file
        print(f"\n== checkpoint loading, ~0.85 GB fp32 model, fresh process per row ==\n{table}")
        print("\nTarget: ratio <= 1.3x (about one copy of the weights in RAM, not two).")
        return 0
    from llava.model.builder import build_small_model
    from shirg_patches import REGISTRY

    encoded, baselines = method_groups()
    methods = [m for m in args.methods.split(",") if m] if args.methods else encoded + baselines
    unknown = [m for m in methods if m not in REGISTRY]
    if unknown:
        print(f"error: unknown method(s) {', '.join(unknown)}; have {', '.join(sorted(REGISTRY))}", file=sys.stderr)
        return 2
    if "pool" not in methods:
        methods.insert(0, "pool")  # the reference row
    image = load_image(args.image)
    threads = torch.get_num_threads()
    head = f"image {image.size[0]}x{image.size[1]}, fp32, {threads} threads, median of"

    tok, model = build_small_model()
    samples = bench(model, tok, image, args.question, methods, args.repeats, warmup=1, shared_vision=False)
    print(format_table(f"\n== built-in small model (SigLIP 64-d, 3 layers): {head} {args.repeats} rounds ==", samples))
    answer_methods = [m for m in encoded if m in methods]
    print(f"\n== built-in small model, whole answer (gen length 32, 16 steps): {head} {args.repeats} rounds ==")
    print(bench_answers(model, tok, image, args.question, answer_methods, args.repeats), flush=True)
    print(f"\n== built-in small model, answers/s by batch size (generate_batch, cached): {head} {args.repeats} "
          "rounds ==")
    print(bench_throughput(model, tok, image, args.question, answer_methods, args.repeats), flush=True)
    if not args.skip_large:
        large = methods if "full" in methods else methods + ["full"]
        tok, model = so400m_bench_model()
        samples = bench(model, tok, image, args.question, large, args.large_repeats, warmup=0, shared_vision=True)
        print(format_table(
            f"\n== random-weight SigLIP-so400m + 1152->4096->4096 projector: {head} {args.large_repeats} rounds;"
            f"\n   baselines = full's vision of the round + their own selection on the real-size candidates ==",
            samples))
    print("\nTargets: SHIRG <= 1.00x pool (1,753 SigLIP tokens vs 3,645); selection <= 2% of vision.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
