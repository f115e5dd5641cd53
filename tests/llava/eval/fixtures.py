"""Tiny evaluation data sets in the official local formats, for loader and harness tests.

`write_fixture_root(tmp_path)` writes, under the given folder, the layout `llava.eval.datasets.load_dataset`
expects (chartqa/, docvqa/, vqav2/, entitygrid/) with a few small images, and returns the folder.
`write_parquet_root(tmp_path)` writes the same questions as lmms-eval-style parquet files (needs pyarrow).
`FIXTURE_SIZES` is the number of items per data set; `FIXTURE_ANSWERS[name][id]` the first answer of each item,
so a harness test can feed perfect (or wrong) predictions. Everything is fast (< 0.2 s).
"""
from __future__ import annotations

import io
import json
from pathlib import Path

from PIL import Image, ImageDraw

# ----------------------------------------------------------------------------------------------------------------
# Records (shared by the JSON and parquet writers)

CHARTQA_HUMAN = [
    {"imgname": "chart_a.png", "query": "What is the value of the tallest bar?", "label": "45"},
    {"imgname": "chart_a.png", "query": "Which colour is the shortest bar?", "label": "Blue", "extra": 1},
    {"imgname": "chart_b.png", "query": "What percentage of people said yes?", "label": "12.5"},
]
CHARTQA_AUGMENTED = [
    {"imgname": "chart_b.png", "query": "In which year was the value highest?", "label": "2019"},
    {"imgname": "chart_c.png", "query": "What is the value for Norway?", "label": "0"},
    {"imgname": "chart_c.png", "query": "Is the line increasing?", "label": "Yes"},
]
DOCVQA_RECORDS = [
    {"questionId": 49153, "question": "What is the date on the form?", "question_types": ["form"],
     "image": "documents/doc_1.png", "docId": 14465, "ucsf_document_id": "txpp0227",
     "ucsf_document_page_no": "10", "answers": ["1/8/93", "January 8, 1993"], "data_split": "val"},
    {"questionId": 24580, "question": "Who is the sender?", "question_types": ["layout"],
     "image": "documents/doc_1.png", "docId": 14465, "ucsf_document_id": "txpp0227",
     "ucsf_document_page_no": "10", "answers": ["R. Smith"], "data_split": "val"},
    {"questionId": 57349, "question": "What is the total?", "question_types": ["table/list"],
     "image": "documents/doc_2.png", "docId": 8200, "ucsf_document_id": "mxcj0037",
     "ucsf_document_page_no": "2", "answers": ["$ 1,250.00", "1,250.00"], "data_split": "val"},
    {"questionId": 57350, "question": "What is the title?", "question_types": ["layout"],
     "image": "documents/doc_2.png", "docId": 8200, "ucsf_document_id": "mxcj0037",
     "ucsf_document_page_no": "2", "answers": ["ANNUAL REPORT"], "data_split": "val"},
]


def _vqa_answers(*words: str) -> list[dict]:
    assert len(words) == 10
    return [{"answer": w, "answer_confidence": "yes", "answer_id": i + 1} for i, w in enumerate(words)]


VQAV2_QUESTIONS = [
    {"image_id": 42, "question": "Is there a dog?", "question_id": 42000},
    {"image_id": 42, "question": "How many cats are there?", "question_id": 42001},
    {"image_id": 73, "question": "What color is the bus?", "question_id": 73000},
    {"image_id": 73, "question": "What is on the table?", "question_id": 73001},
]
VQAV2_ANNOTATIONS = [
    {"question_id": 42000, "image_id": 42, "answer_type": "yes/no", "question_type": "is there a",
     "multiple_choice_answer": "yes", "answers": _vqa_answers(*["yes"] * 9, "no")},
    {"question_id": 42001, "image_id": 42, "answer_type": "number", "question_type": "how many",
     "multiple_choice_answer": "2", "answers": _vqa_answers(*["2"] * 8, "two", "3")},
    {"question_id": 73000, "image_id": 73, "answer_type": "other", "question_type": "what color is the",
     "multiple_choice_answer": "red", "answers": _vqa_answers(*["red"] * 6, "red and white", "orange", "red", "red")},
    {"question_id": 73001, "image_id": 73, "answer_type": "other", "question_type": "what is on the",
     "multiple_choice_answer": "cake", "answers": _vqa_answers(*["cake"] * 7, "food", "plate", "birthday cake")},
]
ENTITYGRID_RECORDS = [
    {"id": "eg-0", "image": "images/eg_0.png", "question": "What is the label on the red circle?",
     "answers": ["7"], "meta": {"qtype": "label", "size_px": 40, "size_bucket": "native", "center_dist": 0.12}},
    {"id": "eg-1", "image": "images/eg_0.png", "question": "What colour is the shape labelled A?",
     "answers": ["blue"], "meta": {"qtype": "colour", "size_px": 60, "size_bucket": "global", "center_dist": 0.5}},
    {"id": "eg-2", "image": "images/eg_1.png", "question": "How many triangles are there?",
     "answers": ["2"], "meta": {"qtype": "count", "size_bucket": "mid", "center_dist": None}},
    {"id": "eg-3", "image": "images/eg_1.png", "question": "Is the green square left or right of the red circle?",
     "answers": ["left"], "meta": {"qtype": "position", "size_bucket": "mid", "center_dist": 0.8},
     "unknown_field": [1, 2]},
]

FIXTURE_SIZES = {"chartqa": 6, "docvqa": 4, "vqav2": 4, "entitygrid": 4}
FIXTURE_ANSWERS = {
    "chartqa": {f"human-{i}": r["label"] for i, r in enumerate(CHARTQA_HUMAN)}
    | {f"augmented-{i}": r["label"] for i, r in enumerate(CHARTQA_AUGMENTED)},
    "docvqa": {str(r["questionId"]): r["answers"][0] for r in DOCVQA_RECORDS},
    "vqav2": {str(a["question_id"]): a["multiple_choice_answer"] for a in VQAV2_ANNOTATIONS},
    "entitygrid": {r["id"]: r["answers"][0] for r in ENTITYGRID_RECORDS},
}

# Image name -> (size, background); content is a few rectangles and a line of text.
IMAGES = {
    "chartqa/png/chart_a.png": ((400, 300), (255, 255, 255)),
    "chartqa/png/chart_b.png": ((480, 320), (250, 250, 240)),
    "chartqa/png/chart_c.png": ((360, 270), (240, 245, 255)),
    "docvqa/documents/doc_1.png": ((600, 800), (255, 255, 255)),
    "docvqa/documents/doc_2.png": ((620, 880), (252, 252, 252)),
    "vqav2/val2014/COCO_val2014_000000000042.jpg": ((320, 240), (120, 160, 90)),
    "vqav2/val2014/COCO_val2014_000000000073.jpg": ((300, 224), (90, 110, 170)),
    "entitygrid/images/eg_0.png": ((480, 360), (245, 245, 245)),
    "entitygrid/images/eg_1.png": ((360, 480), (245, 245, 245)),
}


def _image(size: tuple[int, int], background: tuple[int, int, int], seed: int) -> Image.Image:
    image = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(image)
    w, h = size
    for k in range(4):
        x0 = (seed * 37 + k * w // 4) % (w - 40)
        draw.rectangle([x0, h // 3 + k * 7, x0 + 30, h - 20], fill=((60 * k + seed * 50) % 256, 90, 200 - 40 * k))
    draw.text((10, 10), f"fixture {seed}", fill=(0, 0, 0))
    return image


def _encode(image: Image.Image, suffix: str) -> bytes:
    buf = io.BytesIO()
    jpeg = suffix in (".jpg", ".jpeg")
    image.save(buf, format="JPEG" if jpeg else "PNG", **({"quality": 85} if suffix == ".jpg" else {}))
    return buf.getvalue()


def image_bytes(relpath: str) -> bytes:
    """The encoded bytes of fixture image `relpath` (e.g. "chartqa/png/chart_a.png"), deterministic."""
    size, background = IMAGES[relpath]
    return _encode(_image(size, background, sorted(IMAGES).index(relpath)), Path(relpath).suffix)


def _dump(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1), encoding="utf-8")


def write_fixture_root(root: str | Path) -> Path:
    """Write the JSON-format fixture data root under `root` and return it."""
    root = Path(root)
    for rel in IMAGES:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(image_bytes(rel))
    _dump(root / "chartqa" / "test_human.json", CHARTQA_HUMAN)
    _dump(root / "chartqa" / "test_augmented.json", CHARTQA_AUGMENTED)
    _dump(root / "docvqa" / "val_v1.0.json", {"dataset_name": "docvqa", "dataset_version": "1.0",
                                              "dataset_split": "val", "data": DOCVQA_RECORDS})
    _dump(root / "vqav2" / "v2_OpenEnded_mscoco_val2014_questions.json",
          {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": "val2014",
           "questions": VQAV2_QUESTIONS})
    _dump(root / "vqav2" / "v2_mscoco_val2014_annotations.json",
          {"info": {}, "data_type": "mscoco", "data_subtype": "val2014", "annotations": VQAV2_ANNOTATIONS})
    _dump(root / "entitygrid" / "test.json", ENTITYGRID_RECORDS)
    return root


def write_parquet_root(root: str | Path) -> Path:
    """Write lmms-eval-style parquet exports of the ChartQA, DocVQA and VQAv2 fixtures under `root` (needs
    pyarrow): chartqa/test-00000-of-00001.parquet, docvqa/validation-00000-of-00001.parquet,
    vqav2/validation-00000-of-00001.parquet. Images are {"bytes", "path"} structs."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = Path(root)

    def img(rel: str) -> dict:
        return {"bytes": image_bytes(rel), "path": Path(rel).name}

    chart_rows = [
        {"type": f"{split}_test", "question": r["query"], "answer": r["label"],
         "image": img(f"chartqa/png/{r['imgname']}")}
        for split, recs in (("human", CHARTQA_HUMAN), ("augmented", CHARTQA_AUGMENTED))
        for r in recs
    ]
    doc_rows = [
        {k: v for k, v in r.items() if k != "image"} | {"image": img(f"docvqa/{r['image']}")} for r in DOCVQA_RECORDS
    ]
    questions = {q["question_id"]: q for q in VQAV2_QUESTIONS}
    vqa_rows = [
        a | {"question": questions[a["question_id"]]["question"],
             "image": img(f"vqav2/val2014/COCO_val2014_{a['image_id']:012d}.jpg")}
        for a in VQAV2_ANNOTATIONS
    ]
    for sub, name, rows in (
        ("chartqa", "test-00000-of-00001.parquet", chart_rows),
        ("docvqa", "validation-00000-of-00001.parquet", doc_rows),
        ("vqav2", "validation-00000-of-00001.parquet", vqa_rows),
    ):
        (root / sub).mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), root / sub / name)
    return root


def main(argv=None) -> int:
    """`python -m tests.llava.eval.fixtures OUT [--parquet]`: write the fixture data root(s) under OUT."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m tests.llava.eval.fixtures", description=main.__doc__)
    p.add_argument("out", help="folder to write (chartqa/, docvqa/, vqav2/, entitygrid/)")
    p.add_argument("--parquet", action="store_true", help="write the lmms-eval-style parquet files instead")
    args = p.parse_args(argv)
    root = write_parquet_root(args.out) if args.parquet else write_fixture_root(args.out)
    print(f"wrote fixture data root {root} ({', '.join(f'{k} {v}' for k, v in FIXTURE_SIZES.items())} items)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
