"""Data-set loaders on tiny fixtures written in the official formats."""
import json
import sys

import pytest
from PIL import Image

from llava.errors import DataError, LavidaError
from llava.eval.datasets import (
    DATASET_SPECS,
    EvalItem,
    check_image,
    load_dataset,
    load_json_list,
)
from llava.eval.metrics import METRICS
from llava.mm_utils import load_image
from tests.llava.eval.fixtures import (
    ENTITYGRID_RECORDS,
    FIXTURE_ANSWERS,
    FIXTURE_SIZES,
    write_fixture_root,
    write_parquet_root,
)


@pytest.fixture
def root(tmp_path):
    return write_fixture_root(tmp_path / "data")


def _rewrite(path, fn):
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


# ------------------------------------------------------------------------------------------------- happy paths


@pytest.mark.parametrize("name", ["chartqa", "docvqa", "vqav2", "entitygrid"])
def test_every_loader_reads_the_fixture(root, name):
    ds = load_dataset(name, root)
    assert len(ds) == FIXTURE_SIZES[name] and ds.missing_images == 0
    assert {item.id: item.answers[0] for item in ds} == FIXTURE_ANSWERS[name]
    assert ds.spec is DATASET_SPECS[name] and ds.format == "json"
    for item in ds:
        assert isinstance(item.image, str) and check_image(item) is None
        assert item.question and all(isinstance(a, str) for a in item.answers)
    assert load_image(ds[0].image).mode == "RGB"


def test_chartqa_fields_and_splits(root):
    ds = load_dataset("chartqa", root)
    assert [i.id for i in ds] == ["human-0", "human-1", "human-2", "augmented-0", "augmented-1", "augmented-2"]
    first = ds[0]
    assert first.question == "What is the value of the tallest bar?" and first.answers == ["45"]
    assert first.meta == {"split": "human", "imgname": "chart_a.png"}
    assert first.image == str(root / "chartqa" / "png" / "chart_a.png")
    assert ds[4].meta["split"] == "augmented"
    # limit is split evenly over the two splits, the first taking the remainder
    assert [i.id for i in load_dataset("chartqa", root, limit=3)] == ["human-0", "human-1", "augmented-0"]
    assert len(load_dataset("chartqa", root, limit=0)) == 0


def test_docvqa_fields(root):
    item = load_dataset("docvqa", root)[0]
    assert item.id == "49153" and item.answers == ["1/8/93", "January 8, 1993"]
    assert item.image == str(root / "docvqa" / "documents" / "doc_1.png")
    assert item.meta == {"docId": 14465, "question_types": ["form"], "ucsf_document_id": "txpp0227",
                         "ucsf_document_page_no": "10", "data_split": "val"}
    # the _withQT file name is accepted too
    (root / "docvqa" / "val_v1.0.json").rename(root / "docvqa" / "val_v1.0_withQT.json")
    assert len(load_dataset("docvqa", root, limit=2)) == 2


def test_vqav2_fields(root):
    ds = load_dataset("vqav2", root)
    item = ds[1]
    assert item.id == "42001" and len(item.answers) == 10 and item.answers.count("two") == 1
    assert item.image == str(root / "vqav2" / "val2014" / "COCO_val2014_000000000042.jpg")
    assert item.meta == {"answer_type": "number", "question_type": "how many", "image_id": 42,
                         "multiple_choice_answer": "2"}
    assert [i.meta["answer_type"] for i in ds] == ["yes/no", "number", "other", "other"]
    assert METRICS["vqav2"].primary_fn("two", item.answers) == 1.0


def test_entitygrid_and_generic_json(root):
    ds = load_dataset("entitygrid", root)
    assert ds[0].meta == ENTITYGRID_RECORDS[0]["meta"] and ds[2].meta == {"qtype": "count", "size_bucket": "mid",
                                                                           "center_dist": None}
    path = root / "entitygrid" / "test.json"
    generic = load_dataset("json", path)
    assert generic.name == "json" and [i.id for i in generic] == [i.id for i in ds]
    assert len(load_dataset("json", root / "entitygrid")) == 4  # a folder: <split>.json, default test
    # "id" and "meta" are optional, "answers" may be one string, absolute image paths are kept
    absolute = str(root / "entitygrid" / "images" / "eg_1.png")
    path.write_text(json.dumps([{"image": "images/eg_0.png", "question": "q?", "answers": "red"},
                                {"image": absolute, "question": "q2?", "answers": ["2", "two"]}]))
    items = load_json_list(path).items
    assert [(i.id, i.answers, i.meta) for i in items] == [("0", ["red"], {}), ("1", ["2", "two"], {})]
    assert items[1].image == absolute


def test_specs_table():
    assert DATASET_SPECS["chartqa"].prompt("Q?") == "Q?\nAnswer the question with a single word."
    assert DATASET_SPECS["docvqa"].prompt_suffix == "\nAnswer the question using a single word or phrase."
    assert DATASET_SPECS["vqav2"].prompt_suffix == DATASET_SPECS["docvqa"].prompt_suffix
    assert {n: s.gen_length for n, s in DATASET_SPECS.items()} == {
        "chartqa": 16, "docvqa": 32, "vqav2": 16, "entitygrid": 16, "json": 16}
    assert all(s.metric in METRICS for s in DATASET_SPECS.values())


def test_eval_item_image_sources(tmp_path):
    png = tmp_path / "x.png"
    Image.new("RGB", (40, 30), "red").save(png)
    by_path = EvalItem("a", png, "q", ["x"])
    assert by_path.image == str(png) and by_path.image_path == str(png) and by_path.image_bytes is None
    by_bytes = EvalItem("b", png.read_bytes(), "q", ["x"])
    first, second = by_bytes.image, by_bytes.image
    assert isinstance(first, Image.Image) and first is not second  # fresh per access, nothing cached
    assert load_image(first).size == (40, 30)
    assert check_image(EvalItem("c", b"", "q", ["x"])) == "image bytes are empty"
    assert "not found" in check_image(EvalItem("d", tmp_path / "nope.png", "q", ["x"]))
    assert "not a file" in check_image(EvalItem("e", tmp_path, "q", ["x"]))


# ------------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "name, remove, named",
    [
        ("chartqa", "chartqa/test_augmented.json", "test_augmented.json"),
        ("chartqa", "chartqa/test_human.json", "test_human.json"),
        ("docvqa", "docvqa/val_v1.0.json", "val_v1.0.json"),
        ("vqav2", "vqav2/v2_mscoco_val2014_annotations.json", "v2_mscoco_val2014_annotations.json"),
        ("vqav2", "vqav2/v2_OpenEnded_mscoco_val2014_questions.json", "v2_OpenEnded_mscoco_val2014_questions.json"),
        ("entitygrid", "entitygrid/test.json", "test.json"),
    ],
)
def test_missing_file_is_named(root, name, remove, named):
    (root / remove).unlink()
    with pytest.raises(DataError, match=named):
        load_dataset(name, root)


def test_missing_root_folder_or_unknown_name(root, tmp_path):
    with pytest.raises(DataError, match="data root not found"):
        load_dataset("chartqa", tmp_path / "nowhere")
    with pytest.raises(DataError, match=r"data set folder not found: .*textvqa|unknown data set 'textvqa'"):
        load_dataset("textvqa", root)
    (root / "vqav2").rename(root / "other")
    with pytest.raises(DataError, match="vqav2"):
        load_dataset("vqav2", root)
    assert issubclass(DataError, LavidaError)
    with pytest.raises(DataError, match="limit"):
        load_dataset("chartqa", root, limit=-1)


def test_malformed_records_name_index_and_field(root):
    human = root / "chartqa" / "test_human.json"
    _rewrite(human, lambda d: d[1].pop("query"))
    with pytest.raises(DataError, match=r"test_human.json: record 1: missing field 'query'"):
        load_dataset("chartqa", root)

    doc = root / "docvqa" / "val_v1.0.json"
    _rewrite(doc, lambda d: d["data"][2].update(answers="oops"))
    with pytest.raises(DataError, match=r"record 2: field 'answers' must be a list"):
        load_dataset("docvqa", root)
    _rewrite(doc, lambda d: d["data"][2].update(answers=[]))
    with pytest.raises(DataError, match=r"record 2: field 'answers' is empty"):
        load_dataset("docvqa", root)
    _rewrite(doc, lambda d: d.pop("data"))
    with pytest.raises(DataError, match="missing field 'data'"):
        load_dataset("docvqa", root)

    ann = root / "vqav2" / "v2_mscoco_val2014_annotations.json"
    _rewrite(ann, lambda d: d["annotations"].pop(2))
    with pytest.raises(DataError, match=r"questions.json: record 2: no annotation for question_id 73000"):
        load_dataset("vqav2", root)

    eg = root / "entitygrid" / "test.json"
    _rewrite(eg, lambda d: d[3].update(image=None))
    with pytest.raises(DataError, match=r"record 3: missing field 'image'"):
        load_dataset("entitygrid", root)
    _rewrite(eg, lambda d: d.__setitem__(3, "not an object"))
    with pytest.raises(DataError, match=r"record 3: expected an object"):
        load_dataset("entitygrid", root)
    _rewrite(eg, lambda d: d[0].update(id="eg-1", image="images/eg_0.png"))
    with pytest.raises(DataError, match=r"record 1: duplicate id 'eg-1' \(first at .*record 0\)"):
        load_dataset("entitygrid", root)
    eg.write_text("[{")
    with pytest.raises(DataError, match=r"test.json: not valid JSON"):
        load_dataset("entitygrid", root)


def test_missing_images_are_skipped_and_counted(root):
    (root / "chartqa" / "png" / "chart_c.png").unlink()
    ds = load_dataset("chartqa", root)
    assert len(ds) == 4 and ds.missing_images == 2
    assert [m[0] for m in ds.missing] == ["augmented-1", "augmented-2"]
    assert ds.missing[0][1].endswith("chart_c.png")
    (root / "vqav2" / "val2014" / "COCO_val2014_000000000073.jpg").unlink()
    ds = load_dataset("vqav2", root, limit=3)  # limit counts records, missing ones included
    assert [i.id for i in ds] == ["42000", "42001"] and ds.missing_images == 1


# ------------------------------------------------------------------------------------------------- parquet


@pytest.fixture
def parquet_root(tmp_path):
    pytest.importorskip("pyarrow")
    return write_parquet_root(tmp_path / "pq")


@pytest.mark.parametrize("name", ["chartqa", "docvqa", "vqav2"])
def test_parquet_loaders_match_json(root, parquet_root, name):
    from_json = load_dataset(name, root)
    from_pq = load_dataset(name, parquet_root)
    assert from_pq.format == "parquet" and from_pq.missing_images == 0
    assert [(i.id, i.question, i.answers) for i in from_pq] == [(i.id, i.question, i.answers) for i in from_json]
    for a, b in zip(from_pq, from_json):
        assert isinstance(a.image, Image.Image)
        assert load_image(a.image).size == load_image(b.image).size
    if name == "vqav2":
        assert [i.meta["answer_type"] for i in from_pq] == [i.meta["answer_type"] for i in from_json]
    if name == "chartqa":
        assert [i.meta["split"] for i in from_pq] == [i.meta["split"] for i in from_json]


def test_parquet_limit_missing_bytes_and_missing_column(parquet_root):
    import pyarrow as pa
    import pyarrow.parquet as pq

    assert [i.id for i in load_dataset("chartqa", parquet_root, limit=3)] == ["human-0", "human-1", "augmented-0"]
    assert len(load_dataset("docvqa", parquet_root, limit=2)) == 2

    path = parquet_root / "docvqa" / "validation-00000-of-00001.parquet"
    rows = pq.read_table(path).to_pylist()
    rows[1]["image"] = {"bytes": None, "path": None}
    pq.write_table(pa.Table.from_pylist(rows), path)
    ds = load_dataset("docvqa", parquet_root)
    assert len(ds) == 3 and ds.missing == [("24580", "<parquet image without bytes>")]

    pq.write_table(pa.Table.from_pylist([{k: v for k, v in r.items() if k != "answers"} for r in rows]), path)
    with pytest.raises(DataError, match=r"validation-00000-of-00001.parquet: missing column 'answers'"):
        load_dataset("docvqa", parquet_root)


def test_parquet_without_pyarrow_says_how_to_install(tmp_path, monkeypatch):
    folder = tmp_path / "docvqa"
    folder.mkdir()
    (folder / "validation-0.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(DataError, match="pip install pyarrow"):
        load_dataset("docvqa", tmp_path)
