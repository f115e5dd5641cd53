"""`make bench`: vision + selection wall time per prune method, measured side by side.

For each model (the built-in small one, and a random-weight model with the real SigLIP-so400m
tower and the real 1152->4096->4096 projector) every method encodes the same image in
interleaved rounds, so drift and warm-up hit all methods alike; the table gives medians and
ratios to `pool`. "vision+sel" is everything before the LM: SigLIP, projector, and the
method's own step (pool+merge, or scoring+selection). TopV selects inside the LM during
prefill; here its scoring runs on the pre-LM features (its documented fallback), so its row
measures the same Sinkhorn work without an LM. Image preprocessing is excluded.

This is a benchmark, not a test: numbers depend on the machine. The CPU ratios are read
against `python -m llava.eval.costmodel` for the GPU picture.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from typing import Optional, Sequence

import torch

from llava.mm_utils import load_image
from llava.utils import StageTimer
from llava.eval.run import DEFAULT_IMAGE, DEFAULT_QUESTION

DEFAULT_METHODS = ("pool", "full", "shirg", "random", "stride", "saint", "topv", "visionzip", "divprune")


def so400m_bench_model():
    """Real SigLIP-so400m dims + real projector; a 1-layer LM of width 4096 (only its embedding
    table is used before the LM, for SHIRG's question similarity)."""
    from llava.model.builder import build_small_tokenizer
    from llava.model.language_model.llava_llada import LlavaLLaDAConfig, LlavaLLaDAForCausalLM
    from llava.model.builder import small_model_config

    tok = build_small_tokenizer()
    raw = small_model_config(tok)
    raw.update(d_model=4096, n_layers=1, n_heads=32, n_kv_heads=32, mlp_hidden_size=1024, mm_hidden_size=1152)
    raw.pop("vision_config")
    raw["mm_vision_tower"] = "google/siglip-so400m-patch14-384"
    torch.manual_seed(0)
    model = LlavaLLaDAForCausalLM(LlavaLLaDAConfig.from_dict(raw)).eval()
    return tok, model


def bench_model(name, tokenizer, model, image, question, methods, repeats, warmup=1):
    from shirg_patches import get_method

    qids = tokenizer(question, add_special_tokens=False).input_ids
    times = {m: [] for m in methods}
    sel = {m: [] for m in methods}
    vis = {m: [] for m in methods}
    counts = {}
    with torch.no_grad():
        for r in range(warmup + repeats):
            for m in methods:
                timer = StageTimer()
                v = model.encode_image(image, m, qids, {"seed": 0}, timer=timer)
                if get_method(m).lm_layer is not None:  # TopV: score on pre-LM features
                    with timer("selection"):
                        get_method(m).select(v.lm_context)
                total = sum(t for stage, t in timer.seconds.items() if stage != "preprocess")
                counts[m] = v.lm_token_count
                if r >= warmup:
                    times[m].append(total)
                    sel[m].append(timer.seconds.get("selection", 0.0) + timer.seconds.get("merge", 0.0))
                    vis[m].append(timer.seconds.get("vision", 0.0) + timer.seconds.get("projector", 0.0))
    med = {m: statistics.median(times[m]) for m in methods}
    base = med.get("pool", next(iter(med.values())))
    lines = [f"\n== {name}: image {image.size[0]}x{image.size[1]}, {repeats} rounds (median), fp32, "
             f"{torch.get_num_threads()} threads ==",
             f"{'method':<10}{'LM tokens':>10}{'vision+sel ms':>15}{'ratio':>8}{'select ms':>11}{'select/vision':>15}"]
    for m in methods:
        s_med, v_med = statistics.median(sel[m]), statistics.median(vis[m])
        lines.append(f"{m:<10}{counts[m]:>10}{med[m] * 1e3:>15.1f}{med[m] / base:>7.2f}x"
                     f"{s_med * 1e3:>11.2f}{(s_med / v_med if v_med else 0):>14.1%}")
    return "\n".join(lines), {m: med[m] / base for m in methods}


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llava.eval.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--image", default=str(DEFAULT_IMAGE))
    p.add_argument("--question", default=DEFAULT_QUESTION)
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    p.add_argument("--repeats", type=int, default=5, help="rounds on the small model")
    p.add_argument("--large-repeats", type=int, default=2, help="rounds on the so400m-size model (~1.5 min each)")
    p.add_argument("--skip-large", action="store_true", help="only the built-in small model")
    args = p.parse_args(argv)
    from llava.model.builder import build_small_model
    from shirg_patches import REGISTRY

    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in REGISTRY]
    if unknown:
        print(f"error: unknown method(s) {', '.join(unknown)}; have {', '.join(sorted(REGISTRY))}", file=sys.stderr)
        return 2
    image = load_image(args.image)
    tok, model = build_small_model()
    text, _ = bench_model("built-in small model (SigLIP 64-d, 3 layers)", tok, model, image, args.question,
                          methods, args.repeats)
    print(text, flush=True)
    if not args.skip_large:
        tok, model = so400m_bench_model()
        text, _ = bench_model("random-weight SigLIP-so400m (26 layers, 1152-d) + 1152->4096 projector", tok, model,
                              image, args.question, methods, args.large_repeats, warmup=0)
        print(text, flush=True)
    print("\nTargets (shirg-design.md): SHIRG <= 1.00x pool (1,753 SigLIP tokens vs 3,645); selection <= 2% of vision.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
