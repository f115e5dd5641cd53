"""EntityGrid-QA as an lmms-eval task: writes a task folder for `lmms-eval --include_path`.

    python -m llava.eval.lmms_task --data-root outputs/claim-seed0/data [--split test] --out outputs/lmms-task
    lmms-eval --model shirg_lavida --model_args pretrained=playground/models/lavida-tiny,prune_method=shirg \\
        --include_path outputs/lmms-task --tasks entitygrid_local --batch_size 4

Why a writer and not a committed yaml: lmms-eval loads a task's data with `datasets.load_dataset(dataset_path,
**dataset_kwargs)` and its yaml cannot name a folder relative to anything but the working directory, while
EntityGrid sets are generated wherever the user puts them (`python -m llava.eval.entitygrid`). So the writer
puts three files in `--out`: `entitygrid.jsonl` (the split's items with absolute image paths, the fields
lmms-eval's json loader can type: id, image, question, answers, qtype), `entitygrid.yaml` (the task: generate
until, 16 answer tokens as this project's harness decodes EntityGrid, greedy) and `utils.py`, a two-line shim
that imports the task functions below, so the prompt (question + the harness's short-answer suffix) and the
metrics (SQuAD-normalised exact match and token F1, the harness's) have one definition, here and in
`llava.eval.datasets` / `llava.eval.metrics`. lmms-eval is not needed to write the folder, only to run it.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from llava.errors import LavidaError
from llava.eval.datasets import DATASET_SPECS, load_dataset
from llava.eval.metrics import exact_match, token_f1

TASK_NAME = "entitygrid_local"
SPEC = DATASET_SPECS["entitygrid"]

_SHIM = ('"""lmms-eval task functions for EntityGrid-QA (written by python -m llava.eval.lmms_task)."""\n'
         "from llava.eval.lmms_task import doc_to_target, doc_to_text, doc_to_visual, process_results  # noqa: F401\n")


def doc_to_visual(doc: dict) -> list:
    """The item's image, decoded and validated as the harness decodes it (one RGB PIL image)."""
    from llava.mm_utils import load_image

    return [load_image(doc["image"])]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    """The question with the harness's short-answer instruction (the `shirg_lavida` model adds <image> and the
    chat template)."""
    return SPEC.prompt(doc["question"])


def doc_to_target(doc: dict) -> str:
    return doc["answers"][0]


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """Per-item scores of the first generation, as the harness scores EntityGrid."""
    pred = results[0] if results else ""
    return {"exact_match": exact_match(pred, doc["answers"]), "token_f1": token_f1(pred, doc["answers"])}


def task_yaml(data_file: Path) -> str:
    """The task config. `data_file` goes in as an absolute path (lmms-eval resolves it against its cwd)."""
    metrics = "".join(f"  - metric: {m}\n    aggregation: mean\n    higher_is_better: true\n"
                      for m in ("exact_match", "token_f1"))
    return (f"task: {TASK_NAME}\n"
            "dataset_path: json\n"
            "dataset_kwargs:\n"
            "  data_files:\n"
            f"    test: {json.dumps(str(data_file.resolve()))}\n"
            "test_split: test\n"
            "output_type: generate_until\n"
            "doc_to_visual: !function utils.doc_to_visual\n"
            "doc_to_text: !function utils.doc_to_text\n"
            "doc_to_target: !function utils.doc_to_target\n"
            "process_results: !function utils.process_results\n"
            "generation_kwargs:\n"
            f"  max_new_tokens: {SPEC.gen_length}\n"
            "  temperature: 0\n"
            "  do_sample: false\n"
            "metric_list:\n" + metrics)


def write_task(data_root: str | Path, out: str | Path, split: str = "test", limit: int | None = None) -> dict:
    """Write the task folder for `<data_root>/entitygrid/<split>.json`; returns {"items", "yaml"}. An absent
    split file or a malformed record is a LavidaError (from the harness's loader) before anything is written;
    items whose image is absent are left out, as the harness skips them."""
    dataset = load_dataset("entitygrid", data_root, limit, split)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data_file = out / "entitygrid.jsonl"
    lines = [json.dumps({"id": it.id, "image": str(Path(it.image).resolve()), "question": it.question,
                         "answers": list(it.answers), "qtype": str((it.meta or {}).get("qtype", ""))})
             for it in dataset.items]
    data_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out / "utils.py").write_text(_SHIM, encoding="utf-8")
    (out / "entitygrid.yaml").write_text(task_yaml(data_file), encoding="utf-8")
    return {"items": len(lines), "yaml": str(out / "entitygrid.yaml")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m llava.eval.lmms_task", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", required=True, help="folder holding entitygrid/<split>.json (the harness's layout)")
    p.add_argument("--split", default="test")
    p.add_argument("--out", required=True, help="task folder to write (pass it to lmms-eval --include_path)")
    p.add_argument("--limit", type=int, default=None, help="first N items only")
    args = p.parse_args(argv)
    try:
        stats = write_task(args.data_root, args.out, args.split, args.limit)
    except LavidaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {stats['items']} items and task {TASK_NAME} to {stats['yaml']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
