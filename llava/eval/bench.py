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
with and without the prefix K/V cache, for pool, full and shirg.

TopV selects inside the LM during prefill; here it scores the pre-LM features (its documented
fallback), i.e. the same Sinkhorn work without an LM. This is a benchmark, not a test:
numbers depend on the machine. Read the CPU ratios against `python -m llava.eval.costmodel`.
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
from llava.mm_utils import load_image
from llava.utils import StageTimer

ENCODED_METHODS = ("pool", "full", "shirg")
BASELINES = ("random", "stride", "saint", "topv", "visionzip", "divprune")


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
    if get_method(method).lm_layer is not None:  # TopV: score the pre-LM features
        with timer("selection"):
            get_method(method).select(v.lm_context)
    s = timer.seconds
    select = s.get("selection", 0.0) + s.get("merge", 0.0)
    vision = s.get("vision", 0.0) + s.get("projector", 0.0)
    return vision + select, select, vision, v.lm_token_count


def capture_candidates(model, image, qids):
    """The `full` candidates with everything any baseline reads (attention, keys, question)."""
    from shirg_patches import get_method

    probe = dataclasses.replace(get_method("topv"), needs_attention=True, needs_keys=True)
    return model.encode_image(image, probe, qids, {"seed": 0}).lm_context


def time_selection(ctx, method) -> tuple[float, int]:
    from shirg_patches import get_method

    ctx = dataclasses.replace(ctx, options={})
    start = time.perf_counter()
    get_method(method).select(ctx)
    return time.perf_counter() - start, ctx.budget


def bench(model, tokenizer, image, question, methods, repeats, warmup, shared_vision) -> dict[str, Samples]:
    """Interleaved rounds; with `shared_vision` baselines reuse `full`'s vision time of the round."""
    qids = tokenizer(question, add_special_tokens=False).input_ids
    samples = {m: Samples() for m in methods}
    encoded = [m for m in methods if not (shared_vision and m in BASELINES)]
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
    lines = [title, f"{'method':<10}{'LM tokens':>10}{'vision+sel ms':>15}{'ratio':>8}{'select ms':>11}{'select/vision':>15}"]
    for m, s in samples.items():
        sel, vis = statistics.median(s.select), statistics.median(s.vision)
        lines.append(f"{m:<10}{s.tokens:>10}{med[m] * 1e3:>15.1f}{med[m] / base:>7.2f}x"
                     f"{sel * 1e3:>11.2f}{(sel / vis if vis else 0.0):>14.1%}")
    return "\n".join(lines)


def bench_answers(model, tokenizer, image, question, methods, repeats, gen_length=32, steps=16) -> str:
    """Whole-answer latency (encode + prefill + steps) with and without the prefix cache."""
    from llava.conversation import build_prompt
    from llava.mm_utils import tokenizer_image_token

    ids = tokenizer_image_token(build_prompt(question), tokenizer)
    qids = tokenizer(question, add_special_tokens=False).input_ids
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


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llava.eval.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--image", default=str(DEFAULT_IMAGE))
    p.add_argument("--question", default=DEFAULT_QUESTION)
    p.add_argument("--methods", default=",".join(ENCODED_METHODS + BASELINES))
    p.add_argument("--repeats", type=int, default=5, help="rounds on the small model")
    p.add_argument("--large-repeats", type=int, default=2, help="rounds on the so400m-size model (~2.5 min each)")
    p.add_argument("--skip-large", action="store_true", help="only the built-in small model")
    args = p.parse_args(argv)
    from llava.model.builder import build_small_model
    from shirg_patches import REGISTRY

    methods = [m for m in args.methods.split(",") if m]
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
    answer_methods = [m for m in ("pool", "full", "shirg") if m in methods]
    print(f"\n== built-in small model, whole answer (gen length 32, 16 steps): {head} {args.repeats} rounds ==")
    print(bench_answers(model, tok, image, args.question, answer_methods, args.repeats), flush=True)
    if not args.skip_large:
        large = methods if "full" in methods else methods + ["full"]
        tok, model = so400m_bench_model()
        samples = bench(model, tok, image, args.question, large, args.large_repeats, warmup=0, shared_vision=True)
        print(format_table(
            f"\n== random-weight SigLIP-so400m + 1152->4096->4096 projector: {head} {args.large_repeats} rounds;"
            f"\n   baselines = full's vision of the round + their own selection on the real-size candidates ==",
            samples))
    print("\nTargets (shirg-design.md): SHIRG <= 1.00x pool (1,753 SigLIP tokens vs 3,645); selection <= 2% of vision.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
