"""Markdown tables from an evaluation's results.csv (written by `llava.eval.evaluate`).

    python -m llava.eval.report OUTDIR_OR_CSV [--baseline pool] [--out FILE]

prints (or writes to FILE) these tables, systems in the CSV's row order:
- **Quality**: each data set's primary metric, x100, with its 95 % bootstrap CI and n;
- **Breakdowns**: one table per data set x item-meta breakdown present in the CSV (EntityGrid by target size in
  the global view, by distance from the image centre, by question type; ChartQA by split; VQAv2 by answer type);
- **Efficiency**: mean LM visual tokens, median whole-answer latency with its ratio to the baseline system
  (default `pool`) on the same data set, and peak memory (with its kind: CUDA max-allocated or CPU peak RSS).

`render_markdown(rows)` is the same as a function (rows as read by `read_results`), for callers that place the
tables elsewhere (e.g. between markers in a README). Reading and rendering need no torch.
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Optional, Sequence

from llava.errors import InputError, LavidaError, OneLineParser

BREAKDOWN_TITLES = {
    "size_bucket": "by target size in the 384² global view (native < 8 px <= mid < 14 px <= global)",
    "center_dist": "by target distance from the image centre (0 centre, 1 corner)",
    "qtype": "by question type",
    "split": "by split",
    "answer_type": "by answer type",
}


def read_results(path: str | Path) -> list[dict]:
    """Rows of results.csv (`path` is the CSV or the evaluation's output folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.csv"
    if not path.is_file():
        raise InputError(f"{path} does not exist; run python -m llava.eval.evaluate first")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    need = {"system", "dataset", "metric", "value", "ci_lo", "ci_hi", "n"}
    if rows and not need <= rows[0].keys():
        missing = sorted(need - rows[0].keys())
        raise InputError(f"{path} is not a results.csv of llava.eval.evaluate (missing {missing})")
    return rows


def _ordered(values) -> list:
    return list(dict.fromkeys(values))


def _num(text: str) -> Optional[float]:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def _cell(row: Optional[dict], n: bool = False) -> str:
    if row is None or _num(row["value"]) is None:
        return "–"
    lo, hi = _num(row["ci_lo"]), _num(row["ci_hi"])
    text = f"{float(row['value']):.1f}"
    if lo is not None and hi is not None:
        text += f" [{lo:.1f}, {hi:.1f}]"
    return text + (f" (n={row['n']})" if n else "")


def _table(header: Sequence[str], body: Sequence[Sequence[str]]) -> list[str]:
    rule = "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"
    lines = ["| " + " | ".join(header) + " |", rule]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return lines


def _primary_metric(rows: Sequence[dict], dataset: str) -> Optional[str]:
    """The data set's primary metric: the one its breakdowns use, else its first overall metric row."""
    for r in rows:
        if r["dataset"] == dataset and r.get("breakdown"):
            return r["metric"]
    for r in rows:
        if r["dataset"] == dataset and r["metric"] and not r.get("breakdown"):
            return r["metric"]
    return None


def render_markdown(rows: Sequence[dict], baseline: str = "pool") -> str:
    """The report's tables as one markdown string (see the module doc)."""
    if not rows:
        return "_No results._\n"
    rows = [{k: "" if v is None else str(v) for k, v in r.items()} for r in rows]
    systems = _ordered(r["system"] for r in rows)
    datasets = _ordered(r["dataset"] for r in rows)
    primary = {d: _primary_metric(rows, d) for d in datasets}
    overall = {(r["system"], r["dataset"], r["metric"]): r for r in rows if not r.get("breakdown")}
    first = {}
    for r in rows:
        first.setdefault((r["system"], r["dataset"]), r)
    out: list[str] = []

    out.append("**Quality** (x100, 95 % bootstrap CI over items)")
    out.append("")
    header = ["system"] + [f"{d} {primary[d]}" if primary[d] else d for d in datasets]
    body = [[s] + [_cell(overall.get((s, d, primary[d]))) for d in datasets] for s in systems]
    out += _table(header, body)
    ns = {d: _ordered(overall[(s, d, primary[d])]["n"] for s in systems if (s, d, primary[d]) in overall)
          for d in datasets}
    out.append("")
    out.append("Items scored: " + ", ".join(f"{d} {'/'.join(ns[d]) or 0}" for d in datasets) + ".")

    for d in datasets:
        keys = _ordered(r["breakdown"] for r in rows if r["dataset"] == d and r.get("breakdown"))
        for key in keys:
            sub = [r for r in rows if r["dataset"] == d and r.get("breakdown") == key]
            buckets = _ordered(r["bucket"] for r in sub)
            cells = {(r["system"], r["bucket"]): r for r in sub}
            out += ["", f"**{d} {primary[d]} {BREAKDOWN_TITLES.get(key, 'by ' + key)}**", ""]
            body = [[s] + [_cell(cells.get((s, b)), n=True) for b in buckets]
                    for s in systems if any((s, b) in cells for b in buckets)]
            out += _table(["system"] + [f"{key}={b}" for b in buckets], body)

    out += ["", f"**Efficiency** (LM visual tokens: mean over items; latency: median whole answer, ratio to "
                f"`{baseline}` on the same data set; peak memory during the latency runs)", ""]
    body = []
    for s in systems:
        for d in datasets:
            r = first.get((s, d))
            if r is None:
                continue
            lat, base = _num(r.get("latency_ms_median", "")), first.get((baseline, d))
            base_lat = _num(base.get("latency_ms_median", "")) if base else None
            ratio = f"{lat / base_lat:.2f}x" if lat is not None and base_lat else "–"
            mem = _num(r.get("peak_mem_mb", ""))
            body.append([s, d, r.get("lm_visual_tokens_mean") or "–", f"{lat:.1f}" if lat is not None else "–", ratio,
                         f"{mem:.0f} ({r.get('mem_kind', '')})" if mem is not None else "–"])
    out += _table(["system", "data set", "LM visual tokens", "latency ms", f"x {baseline}", "peak memory MB"], body)
    settings = _ordered(r.get("latency_setting", "") for r in first.values() if r.get("latency_setting"))
    if settings:
        out += ["", "Latency setting: " + "; ".join(sorted({", ".join(x.split(", ")[1:]) for x in settings})) + "."]
    skipped = [(r["system"], r["dataset"], r.get("missing_images") or "0", r.get("bad_images") or "0")
               for r in first.values()]
    skipped = [x for x in skipped if x[2] != "0" or x[3] != "0"]
    if skipped:
        out += ["", "Skipped items: " + "; ".join(f"{s} {d}: {m} missing, {b} undecodable image(s)"
                                                  for s, d, m, b in skipped) + "."]
    return "\n".join(out) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = OneLineParser(prog="python -m llava.eval.report", description=__doc__.split("\n\n")[0])
    p.add_argument("results", help="an evaluation output folder (holding results.csv) or the CSV itself")
    p.add_argument("--baseline", default="pool", help="system the latency ratios are relative to (default pool)")
    p.add_argument("--out", default=None, help="write the markdown here instead of printing it")
    args = p.parse_args(argv)
    try:
        text = render_markdown(read_results(args.results), args.baseline)
    except LavidaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.out:
        from llava.utils import atomic_file

        with atomic_file(args.out) as fh:
            fh.write(text.encode("utf-8"))
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
