"""Evaluation data sets read from their official local formats (no network): ChartQA, DocVQA, VQAv2,
EntityGrid-QA and any plain JSON list.

`load_dataset(name, data_root)` returns an `EvalDataset`: a list of `EvalItem`s plus the items skipped for a
missing image. `DATASET_SPECS` is the one definition of each task's prompt suffix and generation length.

Expected layout under `--data-root` (JSON is used when present, otherwise every `*.parquet` in the folder):

    <root>/chartqa/    test_human.json, test_augmented.json, png/<imgname>        (official "ChartQA Dataset/test/")
                       or *.parquet: columns type, question, answer, image        (lmms-eval export)
    <root>/docvqa/     val_v1.0.json (or val_v1.0_withQT.json), images relative to this folder (documents/...)
                       or *.parquet: columns questionId, question, answers, image  (validation-*.parquet preferred)
    <root>/vqav2/      v2_OpenEnded_mscoco_val2014_questions.json, v2_mscoco_val2014_annotations.json,
                       val2014/COCO_val2014_<image_id:012d>.jpg
                       or *.parquet: columns question_id, question, answers, image (+ answer_type, question_type)
    <root>/entitygrid/ <split>.json (default test.json): a plain JSON list, images relative to this folder
    json:              data_root is the JSON list file itself (or a folder holding <split>.json, default test.json)

Plain JSON list format: `[{"image": "images/x.png", "question": "...", "answers": ["..."], "id": "...",
"meta": {...}}, ...]`; "id" (default: the record's index) and "meta" are optional, "answers" may be one string.

Policies:
- A missing file (or folder) raises `DataError` naming the path; a malformed record raises `DataError` naming the
  file, the record index and the field. Unknown extra fields are ignored; duplicate ids are an error.
- An item whose image file does not exist (or whose parquet image has no bytes) is NOT returned: it is counted
  in `EvalDataset.missing_images` and listed in `EvalDataset.missing` as (id, image reference), and the harness
  reports that count. Corrupt-but-present images are not decoded here; `load_image` raises `ImageError` later.
- `limit` keeps the first `limit` records in file order (before skipping missing images, so a given limit always
  means the same questions). ChartQA splits it evenly over its two splits (human first gets the odd one).
- `EvalItem.image` is a path string for file-based sets, and for parquet a fresh, lazily decoded
  `PIL.Image` over the stored bytes at every access (only the header is parsed until `load_image` decodes it, and
  nothing decoded stays cached on the item). Parquet bytes are held in memory: about the compressed size of the
  images read, which `limit` bounds (reading stops once the limit is met).
"""
from __future__ import annotations

import io
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from PIL import Image

from llava.errors import DataError

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------------------
# Per-task settings (the one definition)

SHORT_ANSWER_SUFFIX = "\nAnswer the question using a single word or phrase."


@dataclass(frozen=True)
class DatasetSpec:
    """A task's prompt and decoding defaults, as in lmms-eval's default templates and LaViDa's eval settings.

    `prompt_suffix` is appended to the question verbatim (it starts with a newline). `gen_length` is the default
    number of answer tokens. `metric` is the key of the task in `llava.eval.metrics.METRICS`.
    """

    name: str
    prompt_suffix: str
    gen_length: int
    metric: str

    def prompt(self, question: str) -> str:
        """The text the model is asked (without the image token or chat template)."""
        return f"{question}{self.prompt_suffix}"


DATASET_SPECS: dict[str, DatasetSpec] = {
    "chartqa": DatasetSpec("chartqa", "\nAnswer the question with a single word.", 16, "chartqa"),
    "docvqa": DatasetSpec("docvqa", SHORT_ANSWER_SUFFIX, 32, "docvqa"),
    "vqav2": DatasetSpec("vqav2", SHORT_ANSWER_SUFFIX, 16, "vqav2"),
    "entitygrid": DatasetSpec("entitygrid", SHORT_ANSWER_SUFFIX, 16, "entitygrid"),
    "json": DatasetSpec("json", SHORT_ANSWER_SUFFIX, 16, "json"),
}

# ----------------------------------------------------------------------------------------------------------------
# Items and data sets


class EvalItem:
    """One question: `id`, `image`, `question`, `answers` (non-empty list of strings), `meta` (dict).

    Construct with `image=` a path (str or Path; stored as str), encoded image bytes, or a PIL image. Reading
    `.image` gives what `llava.mm_utils.load_image` accepts: the path string, or (for bytes) a new lazily decoded
    PIL image per access. `image_path` / `image_bytes` expose the stored source.
    """

    __slots__ = ("id", "question", "answers", "meta", "_source")

    def __init__(self, id: str, image: str | Path | bytes | Image.Image, question: str, answers: list[str],
                 meta: dict | None = None):
        self.id = str(id)
        self._source = str(image) if isinstance(image, Path) else image
        self.question = question
        self.answers = list(answers)
        self.meta = dict(meta or {})

    @property
    def image(self) -> str | Image.Image:
        src = self._source
        if isinstance(src, (bytes, bytearray)):
            return Image.open(io.BytesIO(src))
        return src

    @property
    def image_path(self) -> str | None:
        return self._source if isinstance(self._source, str) else None

    @property
    def image_bytes(self) -> bytes | None:
        return bytes(self._source) if isinstance(self._source, (bytes, bytearray)) else None

    def _key(self):
        src = self._source if not isinstance(self._source, Image.Image) else id(self._source)
        return (self.id, src, self.question, self.answers, self.meta)

    def __eq__(self, other):
        return isinstance(other, EvalItem) and self._key() == other._key()

    def __repr__(self):
        src = self._source if isinstance(self._source, str) else f"<{type(self._source).__name__}>"
        return f"EvalItem(id={self.id!r}, image={src!r}, question={self.question!r}, answers={self.answers!r})"


def check_image(item: EvalItem) -> str | None:
    """Why the item's image is unusable without decoding it (a path that is not an existing file, empty bytes),
    or None if it looks present. Decoding problems surface later as `ImageError` from `load_image`."""
    src = item._source
    if isinstance(src, str):
        path = Path(src)
        if not path.exists():
            return f"image file not found: {src}"
        if not path.is_file():
            return f"image path is not a file: {src}"
        return None
    if isinstance(src, (bytes, bytearray)):
        return None if len(src) else "image bytes are empty"
    if isinstance(src, Image.Image):
        return None
    return "no image"


@dataclass
class EvalDataset:
    """The usable items of a data set, in file order, and what was skipped.

    `missing` lists (item id, image reference) for every record skipped because its image is absent;
    `missing_images` is their count. `source` names the file(s) read and `format` is "json" or "parquet".
    Iterating, `len()` and indexing address the usable items only.
    """

    name: str
    items: list[EvalItem]
    missing: list[tuple[str, str]] = field(default_factory=list)
    source: str = ""
    format: str = "json"

    @property
    def spec(self) -> DatasetSpec:
        return DATASET_SPECS[self.name]

    @property
    def missing_images(self) -> int:
        return len(self.missing)

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[EvalItem]:
        return iter(self.items)

    def __getitem__(self, index: int) -> EvalItem:
        return self.items[index]


class _Collector:
    """Builds an EvalDataset: checks ids are unique, skips and counts items whose image is absent."""

    def __init__(self, name: str, source: str, fmt: str):
        self.name, self.source, self.format = name, source, fmt
        self.items: list[EvalItem] = []
        self.missing: list[tuple[str, str]] = []
        self._seen: dict[str, str] = {}
        self._exists: dict[str, bool] = {}

    def add(self, item: EvalItem, where: str) -> None:
        if item.id in self._seen:
            raise DataError(f"{where}: duplicate id {item.id!r} (first at {self._seen[item.id]})")
        self._seen[item.id] = where
        src = item._source
        if isinstance(src, str):
            if src not in self._exists:
                self._exists[src] = Path(src).is_file()
            ok = self._exists[src]
        else:
            ok = check_image(item) is None
        if ok:
            self.items.append(item)
        else:
            self.missing.append((item.id, src if isinstance(src, str) else "<parquet image without bytes>"))

    def done(self) -> EvalDataset:
        if self.missing:
            log.warning("%s: %d item(s) skipped, image missing (first: %s)", self.name, len(self.missing),
                        self.missing[0][1])
        return EvalDataset(self.name, self.items, self.missing, self.source, self.format)


# ----------------------------------------------------------------------------------------------------------------
# Record helpers


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise DataError(f"file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text") from None


def _text(value: Any) -> str | None:
    """A string field's value; integers and floats are accepted and converted; anything else -> None."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and math.isfinite(value):
        return repr(value)
    return None


def _record(rec: Any, where: str) -> dict:
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected an object, got {type(rec).__name__}")
    return rec


def _get_text(rec: dict, key: str, where: str) -> str:
    if key not in rec or rec[key] is None:
        raise DataError(f"{where}: missing field '{key}'")
    value = _text(rec[key])
    if value is None:
        raise DataError(f"{where}: field '{key}' must be a string, got {type(rec[key]).__name__}")
    return value


def _get_answers(rec: dict, key: str, where: str, allow_string: bool = False) -> list[str]:
    """A non-empty list of strings; entries may be {"answer": ...} objects (VQAv2 style)."""
    if key not in rec or rec[key] is None:
        raise DataError(f"{where}: missing field '{key}'")
    value = rec[key]
    if allow_string and _text(value) is not None:
        return [_text(value)]
    if not isinstance(value, (list, tuple)):
        raise DataError(f"{where}: field '{key}' must be a list of strings, got {type(value).__name__}")
    out = []
    for j, a in enumerate(value):
        if isinstance(a, dict) and "answer" in a:
            a = a["answer"]
        t = _text(a)
        if t is None:
            raise DataError(f"{where}: field '{key}'[{j}] must be a string, got {type(a).__name__}")
        out.append(t)
    if not out:
        raise DataError(f"{where}: field '{key}' is empty")
    return out


def _image_bytes(rec: dict, key: str, where: str) -> bytes:
    """Encoded bytes of a parquet image cell: a {"bytes": ..., "path": ...} struct (Hugging Face `Image`
    feature) or raw bytes. Absent bytes give b"" (counted as a missing image)."""
    if key not in rec:
        raise DataError(f"{where}: missing field '{key}'")
    value = rec[key]
    if isinstance(value, dict):
        value = value.get("bytes")
    if value is None:
        return b""
    if not isinstance(value, (bytes, bytearray)):
        raise DataError(f"{where}: field '{key}' must hold image bytes, got {type(value).__name__}")
    return bytes(value)


def _resolve(folder: Path, ref: str) -> str:
    p = Path(ref)
    return str(p if p.is_absolute() else folder / p)


def _quotas(limit: int | None, k: int) -> list[int | None]:
    """Split `limit` over k parts, the earlier parts taking the remainder: 5 over 2 -> [3, 2]."""
    if limit is None:
        return [None] * k
    return [limit // k + (1 if i < limit % k else 0) for i in range(k)]


def _check_limit(limit: int | None) -> None:
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 0):
        raise DataError(f"limit must be a non-negative integer, got {limit!r}")


# ----------------------------------------------------------------------------------------------------------------
# Parquet


def _parquet_rows(path: Path, required: Iterable[str]) -> Iterator[dict]:
    """Rows of one parquet file as dicts, read in small batches (so a limit stops the reading early)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(
            f"reading {path} needs pyarrow: pip install pyarrow (or pip install -e '.[eval]')"
        ) from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own ArrowInvalid / OSError family
        raise DataError(f"{path}: not a readable parquet file ({e})") from None
    names = set(pf.schema_arrow.names)
    absent = [c for c in required if c not in names]
    if absent:
        raise DataError(f"{path}: missing column '{absent[0]}'")
    for batch in pf.iter_batches(batch_size=32):
        yield from batch.to_pylist()


def _parquet_files(folder: Path, prefer: tuple[str, ...] = ()) -> list[Path]:
    files = sorted(folder.glob("*.parquet"))
    for prefix in prefer:
        chosen = [f for f in files if f.name.startswith(prefix)]
        if chosen:
            return chosen
    return files


# ----------------------------------------------------------------------------------------------------------------
# ChartQA

CHARTQA_SPLITS = (("human", "test_human.json"), ("augmented", "test_augmented.json"))


def load_chartqa_json(folder: str | Path, limit: int | None = None) -> EvalDataset:
    """ChartQA official test folder: test_human.json and test_augmented.json (lists of {imgname, query, label}),
    images in png/. Ids are "<split>-<index in that split's file>"; meta: split ("human"/"augmented"), imgname."""
    _check_limit(limit)
    folder = Path(folder)
    for _, fname in CHARTQA_SPLITS:
        if not (folder / fname).is_file():
            raise DataError(f"file not found: {folder / fname}")
    out = _Collector("chartqa", ", ".join(str(folder / f) for _, f in CHARTQA_SPLITS), "json")
    for (split, fname), quota in zip(CHARTQA_SPLITS, _quotas(limit, len(CHARTQA_SPLITS))):
        data = _read_json(folder / fname)
        if not isinstance(data, list):
            raise DataError(f"{folder / fname}: expected a JSON list of records")
        for i, rec in enumerate(data[:quota] if quota is not None else data):
            where = f"{folder / fname}: record {i}"
            rec = _record(rec, where)
            imgname = _get_text(rec, "imgname", where)
            item = EvalItem(
                f"{split}-{i}",
                _resolve(folder / "png", imgname),
                _get_text(rec, "query", where),
                [_get_text(rec, "label", where)],
                {"split": split, "imgname": imgname},
            )
            out.add(item, where)
    return out.done()


def load_chartqa_parquet(files: Iterable[str | Path], limit: int | None = None) -> EvalDataset:
    """lmms-eval's ChartQA parquet: columns type ("human_test"/"augmented_test"), question, answer, image.
    Ids are "<split>-<index among that split's rows>" (the same ids as the JSON loader when the rows keep the
    official order)."""
    _check_limit(limit)
    files = [Path(f) for f in files]
    quotas = dict(zip([s for s, _ in CHARTQA_SPLITS], _quotas(limit, len(CHARTQA_SPLITS))))
    counts: dict[str, int] = {}
    out = _Collector("chartqa", ", ".join(map(str, files)), "parquet")
    for path in files:
        for r, rec in enumerate(_parquet_rows(path, ("type", "question", "answer", "image"))):
            where = f"{path}: row {r}"
            kind = _get_text(rec, "type", where)
            split = kind[: -len("_test")] if kind.endswith("_test") else kind
            n = counts.get(split, 0)
            quota = quotas.get(split, 0 if limit is not None else None)
            if quota is not None and n >= quota:
                if limit is not None and all(counts.get(s, 0) >= q for s, q in quotas.items()):
                    return out.done()
                continue
            counts[split] = n + 1
            item = EvalItem(
                f"{split}-{n}",
                _image_bytes(rec, "image", where),
                _get_text(rec, "question", where),
                _get_answers(rec, "answer", where, allow_string=True),
                {"split": split},
            )
            out.add(item, where)
    return out.done()


# ----------------------------------------------------------------------------------------------------------------
# DocVQA

DOCVQA_FILES = ("val_v1.0.json", "val_v1.0_withQT.json")
_DOCVQA_META = ("docId", "question_types", "ucsf_document_id", "ucsf_document_page_no", "data_split")


def _docvqa_meta(rec: dict) -> dict:
    return {k: rec[k] for k in _DOCVQA_META if k in rec and rec[k] is not None}


def load_docvqa_json(path: str | Path, limit: int | None = None) -> EvalDataset:
    """DocVQA Task 1 JSON ({"data": [{questionId, question, image, answers, docId, ...}]}); `image` is relative
    to the JSON's folder. Ids are str(questionId); meta keeps docId, question_types and the ucsf fields."""
    _check_limit(limit)
    path = Path(path)
    doc = _read_json(path)
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise DataError(f"{path}: missing field 'data' (a list of question records)")
    records = doc["data"] if limit is None else doc["data"][:limit]
    out = _Collector("docvqa", str(path), "json")
    for i, rec in enumerate(records):
        where = f"{path}: record {i}"
        rec = _record(rec, where)
        item = EvalItem(
            _get_text(rec, "questionId", where),
            _resolve(path.parent, _get_text(rec, "image", where)),
            _get_text(rec, "question", where),
            _get_answers(rec, "answers", where),
            _docvqa_meta(rec),
        )
        out.add(item, where)
    return out.done()


def load_docvqa_parquet(files: Iterable[str | Path], limit: int | None = None) -> EvalDataset:
    """lmms-eval's DocVQA parquet: columns questionId, question, answers, image (+ docId, question_types, ...)."""
    _check_limit(limit)
    files = [Path(f) for f in files]
    out = _Collector("docvqa", ", ".join(map(str, files)), "parquet")
    seen = 0
    for path in files:
        for r, rec in enumerate(_parquet_rows(path, ("questionId", "question", "answers", "image"))):
            if limit is not None and seen >= limit:
                return out.done()
            seen += 1
            where = f"{path}: row {r}"
            item = EvalItem(
                _get_text(rec, "questionId", where),
                _image_bytes(rec, "image", where),
                _get_text(rec, "question", where),
                _get_answers(rec, "answers", where),
                _docvqa_meta(rec),
            )
            out.add(item, where)
    return out.done()


# ----------------------------------------------------------------------------------------------------------------
# VQAv2

VQAV2_QUESTIONS = "v2_OpenEnded_mscoco_val2014_questions.json"
VQAV2_ANNOTATIONS = "v2_mscoco_val2014_annotations.json"
VQAV2_IMAGE = "val2014/COCO_val2014_{:012d}.jpg"


def _vqav2_meta(rec: dict) -> dict:
    keys = ("answer_type", "question_type", "image_id", "multiple_choice_answer")
    return {k: rec[k] for k in keys if k in rec and rec[k] is not None}


def load_vqav2_json(folder: str | Path, limit: int | None = None) -> EvalDataset:
    """VQAv2 val2014: the questions and annotations JSON files, joined on question_id, and
    val2014/COCO_val2014_<image_id:012d>.jpg. Ids are str(question_id); answers are the 10 human answers;
    meta: answer_type, question_type, image_id, multiple_choice_answer."""
    _check_limit(limit)
    folder = Path(folder)
    qpath, apath = folder / VQAV2_QUESTIONS, folder / VQAV2_ANNOTATIONS
    for p in (qpath, apath):
        if not p.is_file():
            raise DataError(f"file not found: {p}")
    qdoc = _read_json(qpath)
    if not isinstance(qdoc, dict) or not isinstance(qdoc.get("questions"), list):
        raise DataError(f"{qpath}: missing field 'questions' (a list)")
    adoc = _read_json(apath)
    if not isinstance(adoc, dict) or not isinstance(adoc.get("annotations"), list):
        raise DataError(f"{apath}: missing field 'annotations' (a list)")
    annotations: dict[str, tuple[int, dict]] = {}
    for j, ann in enumerate(adoc["annotations"]):
        where = f"{apath}: record {j}"
        annotations[_get_text(_record(ann, where), "question_id", where)] = (j, ann)
    questions = qdoc["questions"] if limit is None else qdoc["questions"][:limit]
    out = _Collector("vqav2", f"{qpath}, {apath}", "json")
    for i, q in enumerate(questions):
        where = f"{qpath}: record {i}"
        q = _record(q, where)
        qid = _get_text(q, "question_id", where)
        image_id = q.get("image_id")
        if not isinstance(image_id, int) or isinstance(image_id, bool):
            raise DataError(f"{where}: field 'image_id' must be an integer" if "image_id" in q
                            else f"{where}: missing field 'image_id'")
        if qid not in annotations:
            raise DataError(f"{where}: no annotation for question_id {qid} in {apath}")
        j, ann = annotations[qid]
        item = EvalItem(
            qid,
            str(folder / VQAV2_IMAGE.format(image_id)),
            _get_text(q, "question", where),
            _get_answers(ann, "answers", f"{apath}: record {j}"),
            _vqav2_meta(ann) | {"image_id": image_id},
        )
        out.add(item, where)
    return out.done()


def load_vqav2_parquet(files: Iterable[str | Path], limit: int | None = None) -> EvalDataset:
    """lmms-eval's VQAv2 parquet: columns question_id, question, answers (list of {answer, ...} or strings),
    image (+ answer_type, question_type, image_id, multiple_choice_answer)."""
    _check_limit(limit)
    files = [Path(f) for f in files]
    out = _Collector("vqav2", ", ".join(map(str, files)), "parquet")
    seen = 0
    for path in files:
        for r, rec in enumerate(_parquet_rows(path, ("question_id", "question", "answers", "image"))):
            if limit is not None and seen >= limit:
                return out.done()
            seen += 1
            where = f"{path}: row {r}"
            item = EvalItem(
                _get_text(rec, "question_id", where),
                _image_bytes(rec, "image", where),
                _get_text(rec, "question", where),
                _get_answers(rec, "answers", where),
                _vqav2_meta(rec),
            )
            out.add(item, where)
    return out.done()


# ----------------------------------------------------------------------------------------------------------------
# Plain JSON list (EntityGrid-QA and generic)


def load_json_list(path: str | Path, name: str = "json", limit: int | None = None) -> EvalDataset:
    """A JSON list of {"image", "question", "answers", optional "id", optional "meta"}; `image` relative to the
    file's folder (absolute paths are kept). Ids default to the record's index; "answers" may be one string."""
    _check_limit(limit)
    path = Path(path)
    data = _read_json(path)
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records")
    out = _Collector(name, str(path), "json")
    for i, rec in enumerate(data if limit is None else data[:limit]):
        where = f"{path}: record {i}"
        rec = _record(rec, where)
        meta = rec.get("meta") or {}
        if not isinstance(meta, dict):
            raise DataError(f"{where}: field 'meta' must be an object, got {type(meta).__name__}")
        item = EvalItem(
            _get_text(rec, "id", where) if rec.get("id") is not None else str(i),
            _resolve(path.parent, _get_text(rec, "image", where)),
            _get_text(rec, "question", where),
            _get_answers(rec, "answers", where, allow_string=True),
            meta,
        )
        out.add(item, where)
    return out.done()


# ----------------------------------------------------------------------------------------------------------------
# Entry point


def load_dataset(name: str, data_root: str | Path, limit: int | None = None, split: str | None = None) -> EvalDataset:
    """Load data set `name` (one of DATASET_SPECS) from its folder under `data_root` (layout in the module doc).

    `split` applies to entitygrid and json (the `<split>.json` file, default "test"); the official sets load
    their evaluation split (ChartQA test, DocVQA val, VQAv2 val2014).
    """
    if name not in DATASET_SPECS:
        raise DataError(f"unknown data set {name!r}; choose from {', '.join(DATASET_SPECS)}")
    _check_limit(limit)
    root = Path(data_root)
    if not root.exists():
        raise DataError(f"data root not found: {root}")
    if name == "json":
        path = root if root.is_file() else root / f"{split or 'test'}.json"
        return load_json_list(path, "json", limit)
    folder = root / name
    if not folder.is_dir():
        raise DataError(f"data set folder not found: {folder}")
    if name == "entitygrid":
        return load_json_list(folder / f"{split or 'test'}.json", "entitygrid", limit)
    if name == "chartqa":
        if any((folder / f).is_file() for _, f in CHARTQA_SPLITS) or not _parquet_files(folder):
            return load_chartqa_json(folder, limit)
        return load_chartqa_parquet(_parquet_files(folder, ("test",)), limit)
    if name == "docvqa":
        for fname in DOCVQA_FILES:
            if (folder / fname).is_file():
                return load_docvqa_json(folder / fname, limit)
        files = _parquet_files(folder, ("validation", "val"))
        if not files:
            raise DataError(f"file not found: {folder / DOCVQA_FILES[0]} (nor {DOCVQA_FILES[1]}, nor *.parquet)")
        return load_docvqa_parquet(files, limit)
    # vqav2
    if (folder / VQAV2_QUESTIONS).is_file() or (folder / VQAV2_ANNOTATIONS).is_file() or not _parquet_files(folder):
        return load_vqav2_json(folder, limit)
    return load_vqav2_parquet(_parquet_files(folder, ("validation", "val")), limit)
