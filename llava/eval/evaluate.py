"""Evaluation harness: every system on every data set, quality and efficiency, resumable and shardable.

    python -m llava.eval.evaluate --systems pool,full,shirg,shirg:fovea=saliency \\
        --datasets chartqa,docvqa,vqav2,entitygrid --data-root DATA --out outputs/eval [--limit N]

Systems. `--systems` is a comma list of `[LABEL=]METHOD[:OPTION=VALUE]...[@ADAPTER]`:
- METHOD: a registered prune method (pool, full, shirg, random, ...);
- `:OPTION=VALUE`: a field of that method's options dataclass (`shirg:fovea=saliency`, `shirg:keep_ratio=0.8`,
  `random:budget=300`); an option of another method is an error naming the method;
- `@ADAPTER`: a LoRA adapter folder, loaded with `load_pretrained_model(ADAPTER, model_base=--model-path)`
  (everything after the first '@' is the path);
- `LABEL=`: the system's name in every output (default: the spec without the adapter, plus
  `@<adapter folder name>` when there is one), e.g. `shirg+lora=shirg@ckpt/lora-shirg`.
Systems sharing an adapter share one loaded model.

Generation. LaViDa's per-task settings: gen length from `DATASET_SPECS` (16 ChartQA / VQAv2 /
EntityGrid, 32 DocVQA; `--gen-length` overrides all), block length min(128, gen length),
`--steps` default = gen length (one token per step), greedy (temperature 0, as LaViDa's
lmms-eval wrapper forces), linear (None) schedule, low-confidence remasking, prefix cache on
(`--no-prefix-cache` recomputes the prompt each step: the paper's main-table setting). The
prompt is the `llada` template around `<image>\\n` + question + the task's answer-format suffix;
SHIRG's text relevance sees the question alone (the suffix is the same for every item).
`--batch-size B` samples B questions at once (`LlavaLLaDAForCausalLM.generate_batch`); answers
equal batch 1 (greedy), so B only changes speed.

Efficiency. Per system and data set, on the data set's FIRST usable item (file order), batch 1:
`--latency-warmup` untimed runs (default 3), then `--latency-runs` timed runs (default 50) at
`--latency-gen-length` answer slots (default 32) decoded in one block with `--latency-steps`
diffusion steps (default 30), with the run's prefix-cache setting.
Reported: the median over runs of each stage (vision = SigLIP + projector; selection = pooling
/ merge or scoring + selection; prefill; steps) and of the total (those + prompt embedding;
image file decoding and any-res preprocessing excluded, as LaViDa's `predict.py` timing does).
CUDA: events are not needed, every stage boundary synchronises; memory is
`torch.cuda.max_memory_allocated` after `reset_peak_memory_stats` (kind `cuda_max_allocated`).
CPU: wall clock (`perf_counter`), memory is the process's peak RSS (VmHWM): it is reset through
`/proc/self/clear_refs` (Linux >= 4.0) before the runs when possible (kind `cpu_peak_rss`, the
whole process: weights included); otherwise VmHWM cannot be reset and the column holds the
process-lifetime high-water mark (kind `cpu_peak_rss_lifetime`). `peak_mem_delta_mb` is the peak
minus the memory in use just before the runs (the working memory of one answer). `--latency-runs
0` skips efficiency.

Outputs in `--out`:
- `predictions.jsonl`: one line per system x item: system, method, options, adapter, dataset, id,
  question, answers, prediction, answer_ids (the generated token ids), scores (each metric in [0, 1]),
  lm_visual_tokens, prompt_tokens, stage_ms (per-stage ms; in a batch, prefill and steps are the
  batch's time / B), batch_size, meta. Items that cannot run get a line with `skipped` (missing_image / bad_image /
  empty_question) and `error` instead of a prediction, so the file also records what was skipped.
- `latency.jsonl`: one line per system x data set (the efficiency runs).
- `results.csv`: system x data set x metric: value, bootstrap 95 % CI lo / hi, n (all x100; ChartQA's
  overall relaxed accuracy is the mean of its human and augmented split scores, as the benchmark
  reports it, with a bootstrap stratified by split), plus
  LM visual tokens (mean), median latency and its stages, peak memory and its kind, and the
  missing / undecodable image counts. Rows with a `breakdown` (an item-meta key) and `bucket` break
  the primary metric down, each bucket with its own CI: ChartQA by split, VQAv2 by answer type,
  EntityGrid by `size_bucket` (native / mid / global), by `center_dist` (<0.33, 0.33-0.66, >=0.66) and
  by `qtype` (see `BREAKDOWNS`; any data set whose items carry those keys gets them).
- `quality.png`, `latency.png`, `memory.png`, and `report.md` (the markdown tables of `llava.eval.report`).

Resuming. Lines are appended whole, flushed and fsync'ed. A run restarted with the same `--out`
skips every (system, data set, id) already present (a partial last line left by a kill is
discarded); `results.csv` and the charts are recomputed from the files at the end, so
`--report-only` just does that. Settings that change answers (model, generation, seed, split)
must match the run recorded in `run.json`.

Data parallel. Under `torchrun --nproc_per_node K` (or `accelerate launch`), rank r takes every
K-th unit of the canonical order (system, data set, item) and every K-th latency job, writes
`predictions.rank{r}.jsonl` / `latency.rank{r}.jsonl`; after a gloo barrier rank 0 folds them
into `predictions.jsonl` / `latency.jsonl` and writes the report.

Bad input is one `error: ...` line on stderr and exit code 2: unknown system, option or data
set, a data root missing a file (named), a malformed record (file and index named), an absent
adapter folder, invalid lengths. Absent images (counted by the loader) and images that fail to
decode are warnings on stderr, recorded as skipped lines and counted in the CSV.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import io
import json
import logging
import math
import os
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from llava.errors import InputError, LavidaError, OneLineParser

log = logging.getLogger("llava.eval.evaluate")

DEFAULT_OUT = "outputs/eval"
PREDICTIONS = "predictions.jsonl"
LATENCY = "latency.jsonl"
RESULTS = "results.csv"
REPORT = "report.md"
RUN_FILE = "run.json"
CHARTS = ("quality.png", "latency.png", "memory.png")
# Item-meta breakdowns of a data set's primary metric in results.csv (column `breakdown`, value `bucket`):
# (meta key, buckets in report order or None for sorted values, value -> bucket). A breakdown appears for any
# data set whose items carry the key; items whose value is None (e.g. EntityGrid count questions have no
# single target, so no centre distance) are left out of it.
DIST_EDGES = (0.33, 0.66)
DIST_BUCKETS = (f"<{DIST_EDGES[0]:.2f}", f"{DIST_EDGES[0]:.2f}-{DIST_EDGES[1]:.2f}", f">={DIST_EDGES[1]:.2f}")


def dist_bucket(d: float) -> str:
    """EntityGrid `center_dist` (0 at the image centre, 1 in a corner) -> its bucket."""
    return DIST_BUCKETS[sum(float(d) >= e for e in DIST_EDGES)]


BREAKDOWNS: tuple[tuple[str, Optional[tuple[str, ...]], Any], ...] = (
    ("split", ("human", "augmented"), str),              # ChartQA
    ("answer_type", ("yes/no", "number", "other"), str),  # VQAv2
    ("size_bucket", ("native", "mid", "global"), str),    # EntityGrid: target side in the 384² global view
    ("center_dist", DIST_BUCKETS, dist_bucket),           # EntityGrid: target distance from the image centre
    ("qtype", ("label", "colour", "shape", "count", "position"), str),  # EntityGrid
)
# settings that change answers: a resumed run must use the same ones
ANSWER_SETTINGS = ("model_path", "weights", "gen_length", "block_length", "steps", "prefix_cache", "seed", "split")
LATENCY_STAGES = ("vision", "selection", "prefill", "steps")


# ================================================================================================
# Systems


LABEL_FORBIDDEN = set(",:=@")


@dataclass(frozen=True)
class System:
    """One column of the comparison: a prune method with its options and an optional LoRA adapter."""

    label: str
    method: str
    options: dict = field(default_factory=dict, hash=False, compare=False)
    adapter: Optional[str] = None

    def describe(self) -> dict:
        return {k: (v if isinstance(v, (int, float, str, bool)) or v is None else str(v))
                for k, v in self.options.items()}


def parse_system(spec: str) -> System:
    """`[LABEL=]METHOD[:OPTION=VALUE]...[@ADAPTER]` -> System.

    METHOD is a registered prune method; each `:OPTION=VALUE` is one field of its options dataclass, parsed
    and validated by it (an option of another method is an error naming the method); `@ADAPTER` (everything
    after the first '@', so the path may hold ':' or '=') is a LoRA adapter folder loaded with
    `load_pretrained_model(ADAPTER, model_base=--model-path)`. LABEL names the system in every output; by
    default it is the spec without the adapter, plus `@<adapter folder name>` when there is one. A label
    cannot hold any of `, : = @`."""
    from shirg_patches import get_method

    text = spec.strip()
    if not text:
        raise InputError("--systems has an empty entry")
    body, adapter = (text.split("@", 1) + [None])[:2]
    if adapter is not None:
        adapter = adapter.strip()
        if not adapter:
            raise InputError(f"system {text!r}: '@' must be followed by an adapter folder")
    label = None
    head = body.split("=", 1)[0]
    if "=" in body and ":" not in head:
        label, body = head.strip(), body.split("=", 1)[1]
        if not label or LABEL_FORBIDDEN & set(label):
            raise InputError(f"system {text!r}: a label must be non-empty and cannot hold any of , : = @")
    name, *segments = body.strip().split(":")
    try:
        method = get_method(name.strip())
    except InputError:
        from shirg_patches import REGISTRY

        raise InputError(f"system {text!r}: unknown method {name.strip()!r}; choose one of: "
                         f"{', '.join(sorted(REGISTRY))}") from None
    raw: dict[str, str] = {}
    for seg in segments:
        key, sep, value = seg.partition("=")
        key = key.strip()
        if not sep or not key:
            raise InputError(f"system {text!r}: expected OPTION=VALUE after ':', got {seg!r}")
        if key in raw:
            raise InputError(f"system {text!r}: option {key!r} given twice")
        raw[key] = value.strip()
    try:
        method.make_options(raw)  # a foreign or bad option: an error naming the method
    except InputError as e:
        raise InputError(f"system {text!r}: {e}") from None
    specs = {s.name: s for s in method.options.specs()}
    options = {k: v if specs[k].type is str else specs[k].parse(v) for k, v in raw.items()}
    if label is None:
        label = body.strip() + (f"@{Path(adapter).name}" if adapter else "")
    return System(label, method.name, options, adapter)


def split_systems(text: str) -> list[str]:
    """Split --systems at commas, except a comma inside an adapter path: after '@', the next piece joins the
    path when the joined path exists on disk and the path so far does not (a folder named `run,lr=1e-3`)."""
    entries: list[str] = []
    for piece in text.split(","):
        if entries and "@" in entries[-1]:
            adapter = entries[-1].split("@", 1)[1].strip()
            if not Path(adapter).exists() and Path(f"{adapter},{piece}".strip()).exists():
                entries[-1] += "," + piece
                continue
        entries.append(piece)
    return entries


def parse_systems(text: str) -> list[System]:
    systems = [parse_system(s) for s in split_systems(text) if s.strip()]
    if not systems:
        raise InputError("--systems is empty")
    labels = [s.label for s in systems]
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        raise InputError(f"--systems has two systems labelled {dupes[0]!r}; name one LABEL=METHOD...")
    return systems


def parse_datasets(text: str) -> list[str]:
    from llava.eval.datasets import DATASET_SPECS

    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise InputError("--datasets is empty")
    for n in names:
        if n not in DATASET_SPECS:
            raise InputError(f"unknown data set {n!r}; choose from {', '.join(DATASET_SPECS)}")
    if len(set(names)) != len(names):
        raise InputError("--datasets lists a data set twice")
    return names


# ================================================================================================
# Generation settings


@dataclass(frozen=True)
class GenSettings:
    gen_length: int
    block_length: int
    steps: int
    prefix_cache: bool

    def kwargs(self) -> dict:
        return dict(gen_length=self.gen_length, block_length=self.block_length, steps=self.steps,
                    prefix_cache=self.prefix_cache, temperature=0.0)


def gen_settings(args, dataset: str) -> GenSettings:
    """LaViDa's per-task defaults, overridable; validated before any model loads."""
    from llava.eval.datasets import DATASET_SPECS
    from llava.model.language_model.llada.generate import steps_per_block

    gen = args.gen_length or DATASET_SPECS[dataset].gen_length
    block = args.block_length or min(128, gen)
    steps = args.steps or gen
    try:
        steps_per_block(gen, block, steps)
    except InputError as e:
        raise InputError(f"{dataset} (gen length {gen}): {e}") from None
    return GenSettings(gen, block, steps, args.prefix_cache)


def latency_settings(args) -> GenSettings:
    from llava.model.language_model.llada.generate import steps_per_block

    gen = args.latency_gen_length
    try:
        steps_per_block(gen, gen, args.latency_steps)
    except InputError as e:
        raise InputError(f"--latency-steps / --latency-gen-length: {e}") from None
    return GenSettings(gen, gen, args.latency_steps, args.prefix_cache)


# ================================================================================================
# Append-only JSONL records


def read_jsonl(path: Path, repair: bool = False) -> list[dict]:
    """Every complete record of a JSONL file written by this harness. A last line without its newline
    (a kill mid-write) is dropped -- and cut off the file when `repair`, so appends start clean; a bad line
    anywhere else is an error naming the file and line."""
    if not path.exists():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        log.warning("%s: discarding a partial last line (%d bytes) left by an interrupted run", path,
                    len(data) - end)
        if repair:
            with open(path, "r+b") as f:
                f.truncate(end)
                f.flush()
                os.fsync(f.fileno())
    records = []
    for n, line in enumerate(data[:end].splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            rec = None
        if not isinstance(rec, dict) or not {"system", "dataset"} <= rec.keys():
            raise InputError(f"{path} line {n} is not a record of this harness; move the file away or use a new --out")
        records.append(rec)
    return records


class RecordWriter:
    """Appends whole lines, flushed and fsync'ed one by one, so a kill loses at most the line in flight."""

    def __init__(self, path: Path):
        self.path = path
        read_jsonl(path, repair=True)
        self._fh = open(path, "ab")

    def write(self, record: dict) -> None:
        line = (json.dumps(record, ensure_ascii=False, default=str) + "\n").encode("utf-8")
        self._fh.write(line)
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        self._fh.close()


def shard_files(out: Path, stem: str) -> list[Path]:
    """`<stem>.jsonl` then `<stem>.rank*.jsonl` (rank order): every file holding records of one kind."""
    main = out / f"{stem}.jsonl"
    ranks = sorted(out.glob(f"{stem}.rank*.jsonl"), key=lambda p: _rank_of(p))
    return ([main] if main.exists() else []) + ranks


def _rank_of(path: Path) -> int:
    try:
        return int(path.name.split(".rank")[1].split(".")[0])
    except (IndexError, ValueError):
        return 1 << 30


def prediction_key(rec: dict) -> tuple:
    return (rec["system"], rec["dataset"], str(rec.get("id")))


def latency_key(rec: dict) -> tuple:
    return (rec["system"], rec["dataset"])


def load_records(out: Path, stem: str, key) -> dict[tuple, dict]:
    """Records of every file of one kind, first occurrence of a key kept (a duplicate can only come from
    a re-run racing a kill; both lines hold the same deterministic answer)."""
    merged: dict[tuple, dict] = {}
    for path in shard_files(out, stem):
        for rec in read_jsonl(path):
            merged.setdefault(key(rec), rec)
    return merged


def merge_shards(out: Path, stem: str, key) -> int:
    """Fold `<stem>.rank*.jsonl` into `<stem>.jsonl` (atomically), then delete them; returns the record count."""
    from llava.utils import atomic_file

    files = shard_files(out, stem)
    ranks = [p for p in files if p.name != f"{stem}.jsonl"]
    records = load_records(out, stem, key)
    if ranks:
        with atomic_file(out / f"{stem}.jsonl") as fh:
            for rec in records.values():
                fh.write((json.dumps(rec, ensure_ascii=False, default=str) + "\n").encode("utf-8"))
        for p in ranks:
            p.unlink()
    return len(records)


# ================================================================================================
# Distributed


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    initialised: bool = False

    def barrier(self) -> None:
        if self.initialised:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.initialised:
            import torch.distributed as dist

            dist.destroy_process_group()


def init_distributed(timeout_minutes: float) -> Dist:
    """torchrun / accelerate set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT; gloo carries the barrier
    (CPU or GPU). Without WORLD_SIZE > 1 this is a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        dist.init_process_group("gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    return Dist(rank, world, local, True)


# ================================================================================================
# Memory


def _status_kb(field_name: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class MemoryProbe:
    """Peak memory of a block of work, labelled with what it is (see the module doc)."""

    def __init__(self, device):
        self.device = device
        self.kind = ""
        self.baseline = 0.0

    def start(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device) / 2**20
            self.kind = "cuda_max_allocated"
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
            self.kind = "cpu_peak_rss"
        except OSError:
            self.kind = "cpu_peak_rss_lifetime"
        rss = _status_kb("VmRSS")
        if rss is None:
            import resource

            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
            self.kind = "cpu_peak_rss_lifetime"
        self.baseline = rss / 1024

    def stop(self) -> tuple[float, float, str]:
        """(peak MB, peak - baseline MB, kind)."""
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            hwm = _status_kb("VmHWM")
            if hwm is None:
                import resource

                hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            peak = hwm / 1024
        return round(peak, 1), round(max(peak - self.baseline, 0.0), 1), self.kind


# ================================================================================================
# Work


@dataclass
class Unit:
    """One (system, data set, item) in the canonical order; `item` is None for an item whose image is absent."""

    index: int
    system: System
    dataset: str
    id: str
    item: Any = None
    missing_ref: Optional[str] = None


def build_units(systems: Sequence[System], datasets: dict) -> list[Unit]:
    units = []
    for system in systems:
        for name, ds in datasets.items():
            for item in ds.items:
                units.append(Unit(len(units), system, name, item.id, item))
            for item_id, ref in ds.missing:
                units.append(Unit(len(units), system, name, str(item_id), None, ref))
    return units


def base_record(unit: Unit) -> dict:
    item = unit.item
    return {
        "system": unit.system.label, "method": unit.system.method, "options": unit.system.describe(),
        "adapter": unit.system.adapter, "dataset": unit.dataset, "id": unit.id,
        "question": item.question if item is not None else None,
        "answers": item.answers if item is not None else None,
        "meta": item.meta if item is not None else {},
    }


def skip_record(unit: Unit, reason: str, error: str) -> dict:
    return {**base_record(unit), "skipped": reason, "error": error}


class Evaluator:
    """Runs this rank's pending units and latency jobs, one model (base or adapter) at a time."""

    def __init__(self, args, systems, datasets, dist: Dist, device):
        self.args, self.systems, self.datasets, self.dist, self.device = args, systems, datasets, dist, device
        self.out = Path(args.out)
        suffix = f".rank{dist.rank}" if dist.world > 1 else ""
        self.pred_path = self.out / f"predictions{suffix}.jsonl"
        self.answered, self.answer_seconds = 0, 0.0  # throughput of this run's generation calls
        self.lat_path = self.out / f"latency{suffix}.jsonl"

    # ---- models ----------------------------------------------------------------------------------
    def load_model(self, adapter: Optional[str]):
        from llava.model.builder import load_pretrained_model

        if adapter is None:
            tokenizer, model, _, _ = load_pretrained_model(self.args.model_path, device=self.device)
        else:
            tokenizer, model, _, _ = load_pretrained_model(adapter, model_base=self.args.model_path,
                                                           device=self.device)
        return tokenizer, model

    # ---- the run ---------------------------------------------------------------------------------
    def run(self) -> None:
        from tqdm import tqdm

        done = set(load_records(self.out, "predictions", prediction_key))
        done_lat = set(load_records(self.out, "latency", latency_key))
        units = build_units(self.systems, self.datasets)
        mine = [u for u in units if u.index % self.dist.world == self.dist.rank
                and (u.system.label, u.dataset, u.id) not in done]
        jobs = [(s, d) for s in self.systems for d in self.datasets]
        lat_jobs = [] if self.args.latency_runs <= 0 else [
            j for i, j in enumerate(jobs) if i % self.dist.world == self.dist.rank
            and (j[0].label, j[1]) not in done_lat]
        if not mine and not lat_jobs:
            return
        writer = RecordWriter(self.pred_path)
        lat_writer = RecordWriter(self.lat_path) if lat_jobs else None
        progress = tqdm(total=len(mine), desc=f"eval rank {self.dist.rank}" if self.dist.world > 1 else "eval",
                        unit="item", disable=self.args.no_progress or None, file=sys.stderr,
                        position=self.dist.rank)
        try:
            adapters = list(dict.fromkeys(s.adapter for s in self.systems))
            for adapter in adapters:
                group = [s for s in self.systems if s.adapter == adapter]
                todo = [u for u in mine if u.system.adapter == adapter]
                lat_todo = [j for j in lat_jobs if j[0].adapter == adapter]
                if not todo and not lat_todo:
                    continue
                tokenizer, model = self.load_model(adapter)
                for system in group:
                    for dataset in self.datasets:
                        pending = [u for u in todo if u.system is system and u.dataset == dataset]
                        self.run_units(model, tokenizer, system, dataset, pending, writer, progress)
                for system, dataset in lat_todo:
                    rec = self.measure_latency(model, tokenizer, system, dataset)
                    if rec is not None:
                        lat_writer.write(rec)
                del model
        finally:
            progress.close()
            writer.close()
            if lat_writer is not None:
                lat_writer.close()

    def prepare(self, unit: Unit, tokenizer):
        """(image, input_ids, question_ids) for one unit, or a skip record."""
        from llava.errors import ImageError
        from llava.eval.datasets import DATASET_SPECS
        from llava.mm_utils import inference_ids, load_image
        from shirg_patches import get_method

        if unit.item is None:
            return skip_record(unit, "missing_image", f"image not found: {unit.missing_ref}")
        item = unit.item
        question = item.question.strip()
        if not question and not get_method(unit.system.method).accepts_empty_question:
            log.warning("%s %s: empty question, which %s cannot take; skipped", unit.dataset, unit.id,
                        unit.system.method)
            return skip_record(unit, "empty_question", f"--prune_method {unit.system.method} needs a question")
        try:
            image = load_image(item.image)
        except ImageError as e:
            log.warning("%s %s: image failed to decode (%s); skipped", unit.dataset, unit.id, e)
            return skip_record(unit, "bad_image", str(e))
        ids, qids = inference_ids(tokenizer, question, DATASET_SPECS[unit.dataset].prompt(question))
        return image, ids, qids

    def run_units(self, model, tokenizer, system, dataset, units, writer, progress) -> None:
        from llava.eval.metrics import METRICS
        from llava.utils import StageTimer

        if not units:
            return
        settings = gen_settings(self.args, dataset)
        spec = METRICS[dataset]
        batch: list[tuple[Unit, tuple]] = []

        def flush():
            if not batch:
                return
            timers = [StageTimer(self.device) for _ in batch]
            t0 = time.perf_counter()
            outs = model.generate_batch(
                [p[1] for _, p in batch], [[p[0]] for _, p in batch], prune_method=system.method,
                question_ids=[p[2] for _, p in batch], prune_options={**system.options, "seed": self.args.seed},
                timers=timers, **settings.kwargs())
            self.answer_seconds += time.perf_counter() - t0
            self.answered += len(batch)
            for (unit, _), out, timer in zip(batch, outs, timers):
                pred = decode_answer(tokenizer, out.tokens[0])
                rec = base_record(unit) | {
                    "prediction": pred,
                    "scores": spec.score(pred, unit.item.answers),
                    "lm_visual_tokens": sum(v.lm_token_count for v in out.visual),
                    "prompt_tokens": out.prompt_length,
                    "nfe": out.generation.nfe,
                    "answer_ids": out.tokens[0].tolist(),
                    "stage_ms": {k: round(v * 1e3, 3) for k, v in timer.seconds.items()},
                    "batch_size": len(batch),
                }
                writer.write(rec)
            progress.update(len(batch))
            batch.clear()

        for unit in units:
            prepared = self.prepare(unit, tokenizer)
            if isinstance(prepared, dict):
                writer.write(prepared)
                progress.update(1)
                continue
            batch.append((unit, prepared))
            if len(batch) >= self.args.batch_size:
                flush()
        flush()

    def measure_latency(self, model, tokenizer, system, dataset) -> Optional[dict]:
        """Median per-stage latency and peak memory of `--latency-runs` answers to the data set's first
        usable item (see the module doc)."""
        from llava.utils import StageTimer

        settings = latency_settings(self.args)
        for item in self.datasets[dataset].items:
            prepared = self.prepare(Unit(-1, system, dataset, item.id, item), tokenizer)
            if not isinstance(prepared, dict):
                break
        else:
            log.warning("%s %s: no usable item, latency not measured", system.label, dataset)
            return None
        image, ids, qids = prepared
        kwargs = dict(prune_method=system.method, question_ids=qids,
                      prune_options={**system.options, "seed": self.args.seed}, **settings.kwargs())
        for _ in range(self.args.latency_warmup):
            model.generate(ids, [image], **kwargs)
        probe = MemoryProbe(self.device)
        probe.start()
        runs: list[dict] = []
        tokens = None
        for _ in range(self.args.latency_runs):
            timer = StageTimer(self.device)
            out = model.generate(ids, [image], timer=timer, **kwargs)
            runs.append(stage_groups(timer.seconds))
            tokens = sum(v.lm_token_count for v in out.visual)
        peak, delta, kind = probe.stop()
        medians = {k: round(statistics.median(r[k] for r in runs) * 1e3, 3) for k in runs[0]}
        return {
            "system": system.label, "dataset": dataset, "item_id": item.id, "runs": len(runs),
            "warmup": self.args.latency_warmup, "gen_length": settings.gen_length, "steps": settings.steps,
            "prefix_cache": settings.prefix_cache, "device": str(self.device), "median_ms": medians,
            "peak_mem_mb": peak, "peak_mem_delta_mb": delta, "mem_kind": kind, "lm_visual_tokens": tokens,
        }


def stage_groups(seconds: dict) -> dict:
    """A run's StageTimer seconds grouped into the reported stages; total excludes preprocessing."""
    g = {
        "vision": seconds.get("vision", 0.0) + seconds.get("projector", 0.0),
        "selection": seconds.get("selection", 0.0) + seconds.get("merge", 0.0),
        "prefill": seconds.get("prefill", 0.0),
        "steps": seconds.get("steps", 0.0),
    }
    g["total"] = sum(v for k, v in seconds.items() if k != "preprocess")
    return g


def decode_answer(tokenizer, ids) -> str:
    """LaViDa's post-processing: decode skipping special tokens, strip leading '!' and whitespace."""
    return tokenizer.decode(ids.tolist(), skip_special_tokens=True).lstrip("!").strip()


# ================================================================================================
# Report

CSV_COLUMNS = (
    "system", "method", "adapter", "dataset", "metric", "breakdown", "bucket", "value", "ci_lo", "ci_hi", "n",
    "lm_visual_tokens_mean", "latency_ms_median", "vision_ms", "selection_ms", "prefill_ms", "steps_ms",
    "latency_runs", "latency_setting", "peak_mem_mb", "peak_mem_delta_mb", "mem_kind",
    "missing_images", "bad_images", "other_skipped",
)


def _fmt(x: Optional[float], digits: int = 4) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def report_rows(predictions: Iterable[dict], latency: Iterable[dict], system_order: Sequence[str] = ()) -> list[dict]:
    """results.csv rows from the records (pure: the same records give the same rows)."""
    from llava.eval.datasets import DATASET_SPECS
    from llava.eval.metrics import METRICS, bootstrap_ci, stratified_bootstrap_ci

    groups: dict[tuple, list[dict]] = defaultdict(list)
    for rec in predictions:
        groups[(rec["system"], rec["dataset"])].append(rec)
    lat = {(r["system"], r["dataset"]): r for r in latency}
    order = {s: i for i, s in enumerate(system_order)}
    ds_order = {d: i for i, d in enumerate(DATASET_SPECS)}
    keys = sorted(set(groups) | set(lat), key=lambda k: (order.get(k[0], len(order)), k[0],
                                                          ds_order.get(k[1], len(ds_order)), k[1]))
    rows = []
    for system, dataset in keys:
        recs = sorted(groups.get((system, dataset), []), key=lambda r: str(r.get("id")))
        scored = [r for r in recs if "scores" in r]
        skipped = [r.get("skipped") for r in recs if "skipped" in r]
        first = (scored or recs or [lat.get((system, dataset), {})])[0]
        common = {
            "system": system, "method": first.get("method", ""), "adapter": first.get("adapter") or "",
            "dataset": dataset,
            "lm_visual_tokens_mean": _fmt(statistics.fmean(r["lm_visual_tokens"] for r in scored), 1) if scored else "",
            "missing_images": skipped.count("missing_image"), "bad_images": skipped.count("bad_image"),
            "other_skipped": len(skipped) - skipped.count("missing_image") - skipped.count("bad_image"),
        }
        lr = lat.get((system, dataset))
        if lr:
            med = lr["median_ms"]
            common |= {
                "latency_ms_median": _fmt(med["total"], 2), **{f"{s}_ms": _fmt(med[s], 2) for s in LATENCY_STAGES},
                "latency_runs": lr["runs"],
                "latency_setting": f"item {lr['item_id']}, gen {lr['gen_length']}, {lr['steps']} steps, "
                                   f"{'cached' if lr['prefix_cache'] else 'uncached'}, batch 1, {lr['device']}",
                "peak_mem_mb": _fmt(lr["peak_mem_mb"], 1), "peak_mem_delta_mb": _fmt(lr["peak_mem_delta_mb"], 1),
                "mem_kind": lr["mem_kind"],
            }
        spec = METRICS.get(dataset)
        metric_rows = []
        if spec is not None and scored:
            for metric in spec.columns:
                values = [r["scores"][metric] for r in scored if metric in r["scores"]]
                if values:
                    metric_rows.append((metric, "", "", values))
            for key, buckets, to_bucket in BREAKDOWNS:
                by: dict[str, list[float]] = defaultdict(list)
                for r in scored:
                    g = (r.get("meta") or {}).get(key)
                    if g is not None and spec.primary in r["scores"]:
                        by[to_bucket(g)].append(r["scores"][spec.primary])
                rank = {b: i for i, b in enumerate(buckets or ())}
                for g in sorted(by, key=lambda b: (rank.get(b, len(rank)), b)):
                    metric_rows.append((spec.primary, key, g, by[g]))
        for metric, key, bucket, values in metric_rows:
            strata = _macro_groups(spec, scored, metric) if not key else None
            mean, lo, hi = stratified_bootstrap_ci(strata) if strata else bootstrap_ci(values)
            rows.append(common | {"metric": metric, "breakdown": key, "bucket": bucket, "value": _fmt(100 * mean),
                                  "ci_lo": _fmt(100 * lo), "ci_hi": _fmt(100 * hi), "n": len(values)})
        if spec is not None and scored:
            for name, fn in spec.corpus_columns.items():
                preds = {str(r["id"]): r["prediction"] for r in scored}
                refs = {str(r["id"]): r["answers"] for r in scored}
                score, _ = fn(preds, refs)
                rows.append(common | {"metric": name, "value": _fmt(100 * score), "n": len(preds)})
        if not metric_rows:
            rows.append(common | {"metric": "", "n": 0})
    return [{c: row.get(c, "") for c in CSV_COLUMNS} for row in rows]


def _macro_groups(spec, scored: Sequence[dict], metric: str) -> Optional[list[list[float]]]:
    """The per-group values of `metric` when the data set's overall score is a mean of group means
    (`MetricSpec.macro_over`, e.g. ChartQA's splits) and the items carry that key; else None (pooled mean)."""
    if spec.macro_over is None or metric != spec.primary:
        return None
    by: dict[str, list[float]] = defaultdict(list)
    for r in scored:
        g = (r.get("meta") or {}).get(spec.macro_over)
        if g is None or metric not in r["scores"]:
            return None
        by[str(g)].append(r["scores"][metric])
    return [by[g] for g in sorted(by)] if len(by) > 1 else None


def write_csv(path: Path, rows: list[dict]) -> None:
    from llava.utils import atomic_file

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    with atomic_file(path) as fh:
        fh.write(buf.getvalue().encode("utf-8"))


def write_charts(out: Path, rows: list[dict]) -> list[Path]:
    """quality.png (primary metric per data set, 95 % CI bars), latency.png (median stages, stacked),
    memory.png (peak memory delta). Matplotlib's object API on the Agg canvas: no pyplot global state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from llava.eval.metrics import METRICS
    from llava.utils import atomic_file

    primary = [r for r in rows if r["metric"] and METRICS.get(r["dataset"]) is not None
               and r["metric"] == METRICS[r["dataset"]].primary and not r["breakdown"] and r["value"] != ""]
    first_rows = {}
    for r in rows:
        first_rows.setdefault((r["system"], r["dataset"]), r)
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    systems = list(dict.fromkeys(r["system"] for r in rows))
    colours = [f"C{i % 10}" for i in range(len(systems))]
    written = []

    def save(fig, name):
        FigureCanvasAgg(fig)
        with atomic_file(out / name) as fh:
            fig.savefig(fh, format="png", dpi=100)
        written.append(out / name)

    def grouped(ax, values, errors=None, ylabel=""):
        width = 0.8 / max(len(systems), 1)
        for i, (s, c) in enumerate(zip(systems, colours)):
            xs = [j + (i - (len(systems) - 1) / 2) * width for j in range(len(datasets))]
            ys = [values.get((s, d), math.nan) for d in datasets]
            err = None
            if errors is not None:
                pairs = [errors.get((s, d), (0.0, 0.0)) for d in datasets]
                err = [[lo for lo, _ in pairs], [hi for _, hi in pairs]]
            ax.bar(xs, ys, width, yerr=err, capsize=3, label=s, color=c)
        ax.set_xticks(range(len(datasets)), datasets)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)

    n = max(len(systems), 1)
    fig = Figure(figsize=(max(6.0, 1.2 * len(datasets) * n ** 0.5 + 3), 4.0))
    ax = fig.add_subplot()
    vals = {(r["system"], r["dataset"]): float(r["value"]) for r in primary}
    errs = {(r["system"], r["dataset"]): (float(r["value"]) - float(r["ci_lo"]), float(r["ci_hi"]) - float(r["value"]))
            for r in primary}
    grouped(ax, vals, errs, "primary metric (x100), 95% bootstrap CI")
    ax.set_title("Quality: " + ", ".join(f"{d} {METRICS[d].primary}" for d in datasets if d in METRICS), fontsize=8)
    fig.tight_layout()
    save(fig, "quality.png")

    fig = Figure(figsize=(max(6.0, 2.5 * len(datasets)), 4.0))
    lat = {k: r for k, r in first_rows.items() if r["latency_ms_median"] != ""}
    axes = [fig.add_subplot(1, max(len(datasets), 1), i + 1) for i in range(max(len(datasets), 1))]
    for ax, d in zip(axes, datasets):
        bottom = [0.0] * len(systems)
        for stage, c in zip(LATENCY_STAGES, ("C0", "C1", "C2", "C3")):
            ys = [float(lat[(s, d)][f"{stage}_ms"]) if (s, d) in lat else 0.0 for s in systems]
            ax.bar(range(len(systems)), ys, bottom=bottom, label=stage, color=c)
            bottom = [b + y for b, y in zip(bottom, ys)]
        ax.set_xticks(range(len(systems)), systems, rotation=45, ha="right", fontsize=7)
        ax.set_title(d, fontsize=9)
        ax.set_ylabel("median ms")
    if axes:
        axes[0].legend(fontsize=7)
    kinds = sorted({r["latency_setting"].split(", ")[-1] for r in lat.values()}) if lat else ["not measured"]
    fig.suptitle(f"Latency per stage (median; {', '.join(kinds)})", fontsize=9)
    fig.tight_layout()
    save(fig, "latency.png")

    fig = Figure(figsize=(max(6.0, 1.2 * len(datasets) * n ** 0.5 + 3), 4.0))
    ax = fig.add_subplot()
    mem = {k: float(r["peak_mem_delta_mb"]) for k, r in first_rows.items() if r["peak_mem_delta_mb"] != ""}
    grouped(ax, mem, None, "peak memory - baseline (MB)")
    mem_kinds = sorted({r["mem_kind"] for r in first_rows.values() if r["mem_kind"]}) or ["not measured"]
    ax.set_title(f"Peak memory during the latency runs ({', '.join(mem_kinds)})", fontsize=8)
    fig.tight_layout()
    save(fig, "memory.png")
    return written


def write_report(out: Path, system_order: Sequence[str] = ()) -> list[dict]:
    """Merge shard files, then results.csv and the charts from the records on disk."""
    merge_shards(out, "predictions", prediction_key)
    merge_shards(out, "latency", latency_key)
    predictions = load_records(out, "predictions", prediction_key).values()
    latency = load_records(out, "latency", latency_key).values()
    if not system_order:
        system_order = read_run_file(out).get("systems", [])
    rows = report_rows(predictions, latency, system_order)
    write_csv(out / RESULTS, rows)
    write_charts(out, rows)
    write_markdown(out, rows)
    return rows


def write_markdown(out: Path, rows: list[dict]) -> None:
    """report.md: `llava.eval.report`'s tables of these rows."""
    from llava.eval.report import render_markdown
    from llava.utils import atomic_file

    with atomic_file(out / REPORT) as fh:
        fh.write(render_markdown(rows).encode("utf-8"))


# ================================================================================================
# run.json


def read_run_file(out: Path) -> dict:
    path = out / RUN_FILE
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InputError(f"{path} is not valid JSON; move it away or use a new --out") from None


def weights_fingerprint(folder: str | Path) -> str:
    """Name, size and a BLAKE2 digest of the first and last MiB of every weight file in a model or adapter
    folder: retraining into the same folder changes it, so a resumed run cannot silently reuse answers of the
    old weights (the path alone would match). Cheap on an 8B checkpoint (2 MiB read per shard)."""
    import hashlib

    folder = Path(folder)
    if not folder.is_dir():
        return str(folder)  # builtin:lavida-small: the name is the weights
    h = hashlib.blake2b(digest_size=12)
    for f in sorted(folder.glob("*")):
        if f.suffix not in (".safetensors", ".bin", ".pth") or not f.is_file():
            continue
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            fh.seek(max(0, size - (1 << 20)))
            h.update(fh.read(1 << 20))
    return h.hexdigest()


def check_and_write_run_file(out: Path, settings: dict, systems: Sequence[System], write: bool) -> list[str]:
    """Refuse to resume a run with different answer-changing settings; record the systems ever run
    (their order is the report's row order)."""
    from llava.utils import atomic_file

    old = read_run_file(out)
    prev = old.get("settings", {})
    changed = [k for k in ANSWER_SETTINGS if k in prev and prev[k] != settings.get(k)]
    if changed:
        k = changed[0]
        raise InputError(f"{out} holds a run with {k}={prev[k]!r}, this run has {k}={settings.get(k)!r}; "
                         "use a new --out (or the same settings) to resume")
    order = list(dict.fromkeys([*old.get("systems", []), *[s.label for s in systems]]))
    if write:
        with atomic_file(out / RUN_FILE) as fh:
            fh.write(json.dumps({"settings": settings, "systems": order}, indent=1).encode("utf-8"))
    return order


# ================================================================================================
# CLI


def build_parser() -> argparse.ArgumentParser:
    from llava.model.builder import SMALL_MODEL_NAME

    p = OneLineParser(prog="python -m llava.eval.evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--systems", default="pool,full,shirg",
                   help="comma list of [LABEL=]METHOD[:OPTION=VALUE]...[@ADAPTER] (see the module doc)")
    p.add_argument("--datasets", default="chartqa,docvqa,vqav2,entitygrid",
                   help="comma list of chartqa, docvqa, vqav2, entitygrid, json")
    p.add_argument("--data-root", default=None, help="folder with one sub-folder per data set (json: the file)")
    p.add_argument("--split", default=None, help="entitygrid / json split file <split>.json (default test)")
    p.add_argument("--limit", type=int, default=None, help="first N questions of each data set")
    p.add_argument("--model-path", default=SMALL_MODEL_NAME, help=f"local LaViDa folder or {SMALL_MODEL_NAME}")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT}); reused to resume")
    g = p.add_argument_group("generation (LaViDa's per-task defaults)")
    g.add_argument("--gen-length", type=int, default=None, help="answer slots for every data set (default per task)")
    g.add_argument("--block-length", type=int, default=None, help="default min(128, gen length)")
    g.add_argument("--steps", type=int, default=None, help="total diffusion steps (default gen length)")
    g.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false",
                   help="recompute the prompt every step (the paper's main-table setting)")
    g.add_argument("--seed", type=int, default=0, help="seed of any randomness in a selection (e.g. random)")
    g.add_argument("--batch-size", type=int, default=1, help="questions sampled together (answers equal batch 1)")
    e = p.add_argument_group("efficiency")
    e.add_argument("--latency-runs", type=int, default=50, help="timed runs per system x data set (0: skip)")
    e.add_argument("--latency-warmup", type=int, default=3, help="untimed runs before them")
    e.add_argument("--latency-steps", type=int, default=30, help="diffusion steps of a timed run")
    e.add_argument("--latency-gen-length", type=int, default=32, help="answer slots of a timed run (one block)")
    p.add_argument("--device", default=None,
                   help="cpu or cuda[:N] (default: cuda if available; cuda:LOCAL_RANK under torchrun)")
    p.add_argument("--report-only", action="store_true", help="only rebuild results.csv and charts from --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--dist-timeout-min", type=float, default=24 * 60,
                   help="how long ranks wait for each other at the final barrier")
    return p


def resolve_device(args, dist: Dist):
    import torch

    name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"unknown --device {name!r}; use cpu or cuda[:N]") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError("--device cuda was asked for but CUDA is not available; use --device cpu")
        if device.index is None:
            device = torch.device("cuda", dist.local_rank if dist.world > 1 else 0)
    return device


def validate(args) -> tuple[list[System], list[str]]:
    """Everything checkable before data and models load."""
    from shirg_patches import get_method

    for name in ("limit",):
        value = getattr(args, name)
        if value is not None and value < 0:
            raise InputError(f"--{name} must be >= 0, got {value}")
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.latency_runs < 0 or args.latency_warmup < 0:
        raise InputError("--latency-runs and --latency-warmup must be >= 0")
    systems = parse_systems(args.systems)
    datasets = parse_datasets(args.datasets)
    for s in systems:
        if not args.prefix_cache and get_method(s.method).prefill_hook is not None:
            raise InputError(f"system {s.label!r} prunes inside the LM, which needs the prefix cache; "
                             "drop --no-prefix-cache or the system")
        if s.adapter is not None and not Path(s.adapter).exists():
            raise InputError(f"system {s.label!r}: adapter folder {s.adapter!r} does not exist")
    for d in datasets:
        gen_settings(args, d)
    if args.latency_runs:
        latency_settings(args)
    if args.data_root is None:
        raise InputError("--data-root is required (the folder holding chartqa/, docvqa/, ...)")
    return systems, datasets


def run(args) -> int:
    from llava.eval.datasets import load_dataset

    out = Path(args.out)
    if args.report_only:
        if not out.is_dir():
            raise InputError(f"--out {str(out)!r} does not exist; nothing to report")
        rows = write_report(out)
        print(f"wrote {out / RESULTS} ({len(rows)} rows) and {', '.join(CHARTS)} from {out}")
        return 0
    systems, names = validate(args)
    dist = init_distributed(args.dist_timeout_min)
    try:
        device = resolve_device(args, dist)
        datasets = {n: load_dataset(n, args.data_root, args.limit, args.split) for n in names}
        out.mkdir(parents=True, exist_ok=True)
        weights = [weights_fingerprint(args.model_path)]
        weights += sorted({weights_fingerprint(s.adapter) for s in systems if s.adapter})
        settings = {"model_path": str(args.model_path), "weights": ",".join(weights), "gen_length": args.gen_length,
                    "block_length": args.block_length, "steps": args.steps, "prefix_cache": args.prefix_cache,
                    "seed": args.seed, "split": args.split, "limit": args.limit, "data_root": str(args.data_root)}
        order = check_and_write_run_file(out, settings, systems, write=dist.rank == 0)
        dist.barrier()  # run.json written, partial lines of earlier runs repaired by their owners below
        evaluator = Evaluator(args, systems, datasets, dist, device)
        evaluator.run()
        if evaluator.answered:
            print(f"rank {dist.rank}: {evaluator.answered} answers in {evaluator.answer_seconds:.1f} s of generation "
                  f"({evaluator.answered / evaluator.answer_seconds:.2f} answers/s, batch {args.batch_size}, "
                  "image decoding excluded)", file=sys.stderr)
        dist.barrier()
        if dist.rank == 0:
            rows = write_report(out, order)
            n = sum(len(d) + d.missing_images for d in datasets.values()) * len(systems)
            print(f"{n} system x item records in {out / PREDICTIONS}; wrote {out / RESULTS} ({len(rows)} rows) "
                  f"and {', '.join(CHARTS)}")
    finally:
        dist.close()
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="warning: [%(name)s] %(message)s", stream=sys.stderr)
    try:
        return run(args)
    except LavidaError as e:
        if int(os.environ.get("RANK", "0") or 0) == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
