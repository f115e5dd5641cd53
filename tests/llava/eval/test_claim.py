"""`make results` glue: the system list parses in the harness, README blocks are replaced in place."""
from pathlib import Path

import pytest

from llava.errors import InputError
from llava.eval.claim import (
    KEEP_RATIO_ABLATION,
    SCORE_ABLATION,
    answer_prior,
    claim_systems,
    prior_line,
    replace_between_markers,
)
from llava.eval.evaluate import parse_systems
from shirg_patches import REGISTRY


def test_claim_systems_cover_the_registry_and_ablations_and_parse():
    specs = claim_systems(Path("/ckpt/lora"))
    systems = parse_systems(",".join(specs))
    labels = [s.label for s in systems]
    assert set(REGISTRY) - {"lavida"} <= set(labels)
    assert "shirg+lora" in labels and "shirg:fovea=saliency" in labels
    assert len(labels) == len(set(labels))
    ablation = [s for s in systems if s.label.startswith("shirg+lora/")]
    assert len(ablation) == len(KEEP_RATIO_ABLATION) + len(SCORE_ABLATION)
    assert all(str(s.adapter) == "/ckpt/lora" for s in ablation)
    quick = [s.label for s in parse_systems(",".join(claim_systems(Path("/x"), quick=True)))]
    assert quick == ["pool", "full", "shirg", "shirg+lora"]


def test_replace_between_markers_in_place_and_append():
    text = "intro\n<!-- claim:seed0:begin -->\nold\n<!-- claim:seed0:end -->\noutro\n"
    new = replace_between_markers(text, "claim:seed0", "| a |\n")
    assert new == "intro\n<!-- claim:seed0:begin -->\n| a |\n<!-- claim:seed0:end -->\noutro\n"
    assert replace_between_markers(new, "claim:seed0", "| a |") == new  # idempotent
    appended = replace_between_markers("intro\n", "claim:seed1", "t")
    assert appended == "intro\n\n<!-- claim:seed1:begin -->\nt\n<!-- claim:seed1:end -->\n"
    with pytest.raises(InputError, match="only one of the markers"):
        replace_between_markers("<!-- claim:seed0:begin -->\n", "claim:seed0", "t")


@pytest.mark.parametrize("module, argv", [
    ("llava.eval.evaluate", ["--batch-size", "abc"]),
    ("llava.eval.claim", ["--images", "abc"]),
    ("llava.eval.report", []),
])
def test_every_eval_cli_reports_a_bad_flag_in_one_line(module, argv, capsys):
    import importlib

    with pytest.raises(SystemExit) as e:
        importlib.import_module(module).main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ")


def test_answer_prior_takes_each_question_forms_most_frequent_answer():
    def item(qtype, answer, **meta):
        return {"meta": {"qtype": qtype, **meta}, "answers": [answer]}

    items = [item("count", "0", count_of={"colour": "red"}), item("count", "0", count_of={"colour": "blue"}),
             item("count", "2", count_of={"shape": "circle"}), item("position", "left", axis="x"),
             item("position", "right", axis="x"), item("position", "above", axis="y"), item("label", "K")]
    prior = answer_prior(items)
    assert prior["count"] == 100.0  # "0" for the colour form, "2" for the shape form
    assert prior["position"] == pytest.approx(200 / 3)  # one of the two x answers, and "above"
    assert prior["overall"] == pytest.approx(600 / 7)
    assert "overall 85.7 %; count 100.0, label 100.0, position 66.7." in prior_line(items)
