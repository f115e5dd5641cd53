"""SHIRG's claim, measured on the trained built-in model: `make results` (`python -m llava.eval.claim`).

    python -m llava.eval.claim [--seed 0] [--images 75] [--out outputs/claim] [--readme README.md | --no-readme]

1. writes the EntityGrid-QA test split (`--images` grid images x 4 questions; 75 -> 300 items) with the seeded
   generator; `--seed` other than 0 gives images no model has seen in any form (the robustness check);
2. evaluates every system below with `llava.eval.evaluate` on the trained model (`--model-path`, default the
   committed `playground/models/lavida-tiny`), greedy, prefix cache on, short answers (`--gen-length 4`: every
   EntityGrid answer is one word), batched;
3. renders results.csv with `llava.eval.report` and writes the tables into README between the markers
   `<!-- claim:seed<S>:begin -->` and `<!-- claim:seed<S>:end -->` (no number is typed by hand), with the
   constant-answer prior of the same items under them (`answer_prior`): what a model reaches without looking,
   the floor every per-type score has to be read against.

Systems: every registered prune method but `lavida` (the flag-driven alias of pool / full), each at its
defaults; SHIRG also with the saliency fovea and with its LoRA adapter (`--adapter`, the SHIRG training stage);
then the keep-ratio ablation (0.40, 0.766, 0.80; 0.707 is the default row) and the score ablation (attn, sim,
v2; v1 is the default row), both on SHIRG + LoRA, the form of the method the claim is about.
`--quick` keeps pool, full, shirg and shirg+lora (for new-seed checks).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

from llava.errors import InputError, LavidaError, OneLineParser

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = ROOT / "playground" / "models" / "lavida-tiny"
DEFAULT_ADAPTER = ROOT / "playground" / "models" / "lavida-tiny-shirg-lora"
KEEP_RATIO_ABLATION = (0.40, 0.766, 0.80)
SCORE_ABLATION = ("attn", "sim", "v2")
ANSWER_SLOTS = 4


def claim_systems(adapter: Path, quick: bool = False, lm_layers: Optional[int] = None) -> list[str]:
    """The `--systems` specs of llava.eval.evaluate, in table order. TopV prunes after an early LM layer
    (default 2 of LLaDA's 32); on an LM of `lm_layers` <= 3 layers that is moved to the last layer that still
    leaves one layer after it, and the table says so in the system's options."""
    from shirg_patches import REGISTRY
    from shirg_patches.baselines.topv import TopVOptions

    lora = f"@{adapter}"
    if quick:
        return ["pool", "full", "shirg", f"shirg+lora=shirg{lora}"]
    systems = [name for name in REGISTRY if name != "lavida"]
    if lm_layers is not None and "topv" in systems and TopVOptions().layer >= lm_layers - 1:
        systems[systems.index("topv")] = f"topv=topv:layer={max(lm_layers - 2, 0)}"
    at = systems.index("shirg") + 1
    systems[at:at] = ["shirg:fovea=saliency", f"shirg+lora=shirg{lora}"]
    systems += [f"shirg+lora/keep{r}=shirg:keep_ratio={r}{lora}" for r in KEEP_RATIO_ABLATION]
    systems += [f"shirg+lora/score-{s}=shirg:score={s}{lora}" for s in SCORE_ABLATION]
    return systems


def answer_prior(items: Sequence[dict]) -> dict[str, float]:
    """Accuracy (%) of a model that reads the question but not the image: each question form answered with its
    most frequent answer, per qtype and "overall". A form is the qtype, refined by what the wording gives away:
    the axis of a position question (left/right vs above/below) and whether a count is by colour or by shape."""
    from collections import Counter, defaultdict

    answers: dict[tuple, Counter] = defaultdict(Counter)
    for it in items:
        meta = it["meta"]
        detail = meta.get("axis") or ",".join(sorted(meta.get("count_of") or {}))
        answers[(meta["qtype"], detail)][it["answers"][0]] += 1
    hits, totals = Counter(), Counter()
    for (qtype, _), counts in answers.items():
        hits[qtype] += counts.most_common(1)[0][1]
        totals[qtype] += sum(counts.values())
    prior = {q: 100 * hits[q] / totals[q] for q in totals}
    prior["overall"] = 100 * sum(hits.values()) / max(1, sum(totals.values()))
    return prior


def prior_line(items: Sequence[dict]) -> str:
    prior = answer_prior(items)
    types = ", ".join(f"{q} {prior[q]:.1f}" for q in sorted(prior) if q != "overall")
    return (f"Constant-answer prior on these items (each question form answered with its most frequent answer, "
            f"no image; position per axis, count by colour or shape): overall {prior['overall']:.1f} %; {types}.\n")


def replace_between_markers(text: str, key: str, body: str) -> str:
    """`text` with the block between `<!-- key:begin -->` and `<!-- key:end -->` replaced by `body` (the markers
    are appended at the end when absent)."""
    begin, end = f"<!-- {key}:begin -->", f"<!-- {key}:end -->"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text and text.index(begin) < text.index(end):
        head, rest = text.split(begin, 1)
        return head + block + rest.split(end, 1)[1]
    if begin in text or end in text:
        raise InputError(f"README has only one of the markers {begin} / {end}; fix it by hand")
    return text.rstrip("\n") + "\n\n" + block + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = OneLineParser(prog="python -m llava.eval.claim", description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0, help="EntityGrid test-split seed (0: the reference split)")
    p.add_argument("--images", type=int, default=75, help="test images (4 questions each; default 75 -> 300 items)")
    p.add_argument("--model-path", default=str(DEFAULT_MODEL))
    p.add_argument("--adapter", default=str(DEFAULT_ADAPTER), help="SHIRG LoRA adapter folder")
    p.add_argument("--out", default=None, help="output folder (default outputs/claim-seed<S>)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--nproc", type=int, default=2, help="evaluation processes (torchrun, gloo; default 2 = the cores)")
    p.add_argument("--latency-runs", type=int, default=5, help="timed runs per system (llava.eval.evaluate)")
    p.add_argument("--quick", action="store_true", help="only pool, full, shirg, shirg+lora")
    p.add_argument("--readme", default=str(ROOT / "README.md"), help="README to write the tables into")
    p.add_argument("--no-readme", action="store_true", help="print the tables instead of writing README")
    args = p.parse_args(argv)
    try:
        if args.images < 1:
            raise InputError("--images must be >= 1")
        for what, path in (("--model-path", args.model_path), ("--adapter", args.adapter)):
            if not Path(path).is_dir():
                raise InputError(f"{what} {path} is not a folder; run `make train-tiny` to create it")
        return run(args)
    except LavidaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def run(args) -> int:
    from llava.eval import entitygrid, evaluate
    from llava.eval.report import read_results, render_markdown
    from llava.model.builder import read_config
    from llava.utils import atomic_file, free_port

    out = Path(args.out or ROOT / "outputs" / f"claim-seed{args.seed}")
    data_root = out / "data"
    split = data_root / "entitygrid" / "test.json"
    if not split.is_file():
        stats = entitygrid.generate(data_root / "entitygrid", "test", args.images, seed=args.seed)
        print(f"EntityGrid test split, seed {args.seed}: {stats['items']} items on {stats['images']} images")
    systems = claim_systems(Path(args.adapter), args.quick, int(read_config(args.model_path)["n_layers"]))
    eval_args = [
        "--systems", ",".join(systems), "--datasets", "entitygrid", "--data-root", str(data_root),
        "--model-path", args.model_path, "--out", str(out / "eval"), "--gen-length", str(ANSWER_SLOTS),
        "--batch-size", str(args.batch_size), "--latency-runs", str(args.latency_runs), "--latency-warmup", "1",
        "--seed", "0",
    ]
    if args.nproc > 1:
        # the harness's data parallelism: rank r takes every nproc-th (system, item); one thread per rank
        # uses this machine's cores better than one process with several threads
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc),
               "--master_port", str(free_port()), "-m", "llava.eval.evaluate", *eval_args]
        code = subprocess.run(cmd, env=env).returncode
    else:
        code = evaluate.main(eval_args)
    if code:
        return code
    tables = render_markdown(read_results(out / "eval")) + "\n" + prior_line(
        json.loads(split.read_text(encoding="utf-8")))
    header = (f"EntityGrid-QA test split, seed {args.seed}: {args.images} images x 4 questions; model "
              f"`{Path(args.model_path).name}`, SHIRG LoRA `{Path(args.adapter).name}`; generated by "
              f"`python -m llava.eval.claim --seed {args.seed}{' --quick' if args.quick else ''}`.\n\n")
    if args.no_readme:
        sys.stdout.write(header + tables)
        return 0
    readme = Path(args.readme)
    text = replace_between_markers(readme.read_text(encoding="utf-8"), f"claim:seed{args.seed}", header + tables)
    with atomic_file(readme) as fh:
        fh.write(text.encode("utf-8"))
    print(f"wrote the tables into {readme} (markers claim:seed{args.seed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
