"""llava.eval.lmms_task: the EntityGrid lmms-eval task folder is complete, self-contained and scores as the
harness scores."""
import importlib.util
import json
from pathlib import Path

import yaml
from PIL import Image

from llava.eval import lmms_task
from llava.eval.datasets import DATASET_SPECS

from .fixtures import FIXTURE_ANSWERS, FIXTURE_SIZES, write_fixture_root


class _TaskLoader(yaml.SafeLoader):
    """lmms-eval's yaml tag `!function module.name`, kept as its string."""


_TaskLoader.add_constructor("!function", lambda loader, node: f"!function {loader.construct_scalar(node)}")


def _load_shim(folder: Path):
    spec = importlib.util.spec_from_file_location("entitygrid_task_utils", folder / "utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_written_task_reads_its_own_data_and_scores_like_the_harness(tmp_path):
    root = write_fixture_root(tmp_path / "data")
    out = tmp_path / "task"
    assert lmms_task.main(["--data-root", str(root), "--out", str(out)]) == 0
    config = yaml.load((out / "entitygrid.yaml").read_text(), Loader=_TaskLoader)
    assert config["task"] == lmms_task.TASK_NAME and config["output_type"] == "generate_until"
    assert config["generation_kwargs"]["max_new_tokens"] == DATASET_SPECS["entitygrid"].gen_length
    data_file = Path(config["dataset_kwargs"]["data_files"]["test"])
    assert data_file.is_absolute() and data_file == (out / "entitygrid.jsonl").resolve()
    docs = [json.loads(line) for line in data_file.read_text().splitlines()]
    assert len(docs) == FIXTURE_SIZES["entitygrid"]
    shim = _load_shim(out)
    for key in ("doc_to_visual", "doc_to_text", "doc_to_target", "process_results"):
        assert config[key] == f"!function utils.{key}" and callable(getattr(shim, key))
    for doc in docs:
        (image,) = shim.doc_to_visual(doc)
        assert isinstance(image, Image.Image) and image.mode == "RGB"
        assert shim.doc_to_text(doc) == DATASET_SPECS["entitygrid"].prompt(doc["question"])
        right = FIXTURE_ANSWERS["entitygrid"][doc["id"]]
        assert shim.doc_to_target(doc) == right
        assert shim.process_results(doc, [f" {right.upper()}."]) == {"exact_match": 1.0, "token_f1": 1.0}
        assert shim.process_results(doc, ["no idea"])["exact_match"] == 0.0


def test_a_missing_split_is_an_error_and_writes_nothing(tmp_path, capsys):
    root = write_fixture_root(tmp_path / "data")
    out = tmp_path / "task"
    assert lmms_task.main(["--data-root", str(root), "--split", "val", "--out", str(out)]) == 2
    assert "val.json" in capsys.readouterr().err and not out.exists()
