"""llava.train.oracle_probe: the oracle's token map says what covers each cell, and the probe trains and scores
through the real LM, template and loss."""
import json

import pytest
import torch

from llava.constants import IGNORE_INDEX
from llava.eval import entitygrid as eg
from llava.model.builder import build_small_tokenizer
from llava.train import oracle_probe as probe

TINY = '{"d_model": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 2, "mlp_hidden_size": 64, "init_fn": "fan_in"}'


def test_cell_ids_mark_each_entity_and_its_centre_once():
    scene = {"size": [400, 200], "entities": [
        {"colour": "red", "shape": "circle", "label": "A", "box": [0, 0, 100, 100], "size": 100},
        {"colour": list(eg.COLOURS)[1], "shape": eg.SHAPES[1], "label": "B", "box": [300, 100, 400, 200],
         "size": 100}]}
    ids = probe.OracleTokens(8, grid=4).cell_ids(scene)  # cells of 100 px over the longer side
    colour = ids["colour"].view(4, 4)
    background = len(eg.COLOURS)
    assert colour[0, 0] == list(eg.COLOURS).index("red") and colour[1, 3] == 1
    assert int((colour != background).sum()) == 2  # each entity covers exactly one cell centre here
    assert int(ids["centre"].sum()) == 2 and ids["centre"].view(4, 4)[0, 0] == 1
    assert ids["row"].tolist()[:5] == [0, 0, 0, 0, 1] and ids["col"].tolist()[:5] == [0, 1, 2, 3, 0]


def test_answer_slot_holds_the_answer_word():
    tok = build_small_tokenizer()
    item = probe.draw_items("single", "val", 1, ("count", "position"), seed=0)[0]
    enc = probe.tokenize(item, tok, 0)
    length = int(enc["labels"].eq(IGNORE_INDEX).sum())
    assert tok.decode([int(enc["labels"][length])]).strip() == item[2]


def test_main_trains_and_reports_accuracy_next_to_the_majority(tmp_path, capsys):
    out = tmp_path / "probe.json"
    code = probe.main(["--steps", "2", "--eval_every", "1", "--n_images", "4", "--n_eval", "8", "--grid", "4",
                       "--batch", "2", "--config_overrides", TINY, "--out", str(out)])
    assert code == 0
    curve = json.loads(out.read_text())["curve"]
    assert [p["step"] for p in curve] == [1, 2] and all(torch.isfinite(torch.tensor(p["loss"])) for p in curve)
    for point in curve:
        assert sum(t["n"] for t in point["by_type"].values()) == 8
        assert sum(t["n"] for t in point["by_form"].values()) == 8
        assert set(point["by_form"]) <= {"count of colour", "count of shape", "position x", "position y"}
        assert all(0 <= t["accuracy"] <= 100 and t["majority"] > 0 for t in point["by_type"].values())
        # the overall priors are the per-group majorities weighted by n; answering by form is never worse
        overall = point["overall"]
        for name in ("type", "form"):
            groups = point[f"by_{name}"].values()
            assert overall[f"prior_{name}"] == pytest.approx(sum(t["majority"] * t["n"] for t in groups) / 8, abs=0.1)
        assert overall["prior_form"] >= overall["prior_type"] and overall["n"] == 8
        assert overall["accuracy"] == pytest.approx(
            sum(t["accuracy"] * t["n"] for t in point["by_type"].values()) / 8, abs=0.1)


def test_bad_flags_are_errors(capsys):
    assert probe.main(["--qtypes", "colour,bogus"]) == 2
    assert "bogus" in capsys.readouterr().err
    assert probe.main(["--config_overrides", "{not json"]) == 2
    assert probe.main(["--min_lr_rate", "1.5"]) == 2 and "--min_lr_rate" in capsys.readouterr().err


def test_lr_follows_the_trainers_warmup_and_cosine(tmp_path):
    out = tmp_path / "probe.json"
    assert probe.main(["--steps", "4", "--eval_every", "1", "--n_images", "4", "--n_eval", "4", "--grid", "4",
                       "--batch", "2", "--lr", "1e-3", "--warmup_steps", "2", "--min_lr_rate", "0.5",
                       "--config_overrides", TINY, "--out", str(out)]) == 0
    lrs = [p["lr"] for p in json.loads(out.read_text())["curve"]]
    assert lrs[0] == 5e-4 and lrs[1] == 1e-3 and lrs[-1] == 5e-4 and lrs[1] > lrs[2] > lrs[3]


def test_curriculum_runs_its_stages_in_order_and_scores_the_last_stages_questions(tmp_path, capsys):
    out = tmp_path / "probe.json"
    assert probe.main(["--curriculum", "solo:colour,shape:2", "single:count:1", "--eval_every", "10",
                       "--n_images", "4", "--n_eval", "4", "--grid", "4", "--batch", "2",
                       "--config_overrides", TINY, "--out", str(out)]) == 0
    curve = json.loads(out.read_text())["curve"]
    assert [(p["step"], p["stage"]) for p in curve] == [(2, "solo:colour,shape"), (3, "single:count")]
    assert all(set(p["by_type"]) == {"count"} for p in curve)
    assert probe.main(["--curriculum", "solo:colour"]) == 2 and "KIND:QTYPES:STEPS" in capsys.readouterr().err
    assert probe.main(["--curriculum", "solo:bogus:5"]) == 2 and "bogus" in capsys.readouterr().err


def test_linear_position_code_is_ordered_and_an_unknown_code_is_an_error():
    scene = {"size": [400, 400], "entities": []}
    oracle = probe.OracleTokens(8, grid=4, position_code="linear")
    tokens = oracle(scene).detach().view(4, 4, 8)
    step_right = tokens[:, 1:] - tokens[:, :-1]  # background everywhere: only the column term changes
    torch.testing.assert_close(step_right, (2 / 3 * oracle.col_dir.detach()).expand_as(step_right))
    torch.testing.assert_close(tokens[0, 0] - tokens[3, 3], -2 * (oracle.row_dir + oracle.col_dir).detach())
    with pytest.raises(ValueError, match="position code"):
        probe.OracleTokens(8, position_code="sinusoid")


def test_centre_paint_keeps_an_entity_smaller_than_a_cell():
    tiny = {"colour": "red", "shape": "circle", "label": "A", "box": [10, 10, 30, 30], "size": 20}  # misses (50, 50)
    scene = {"size": [400, 400], "entities": [tiny]}
    background = len(eg.COLOURS)
    cover = probe.OracleTokens(8, grid=4).cell_ids(scene)
    assert int((cover["colour"] != background).sum()) == 0 and int(cover["centre"].sum()) == 1
    painted = probe.OracleTokens(8, grid=4, paint="centre").cell_ids(scene)
    assert painted["colour"].tolist()[0] == list(eg.COLOURS).index("red")
    assert painted["shape"].tolist()[0] == eg.SHAPES.index("circle")
    assert int((painted["colour"] != background).sum()) == 1
    with pytest.raises(ValueError, match="paint"):
        probe.OracleTokens(8, grid=4, paint="bogus")


def test_density_paint_splits_each_entity_over_its_cells_so_the_map_sums_to_the_counts():
    blue = list(eg.COLOURS)[1]
    scene = {"size": [400, 400], "entities": [
        {"colour": "red", "shape": "circle", "label": "A", "box": [50, 0, 150, 100], "size": 100},  # half in 2 cells
        {"colour": "red", "shape": eg.SHAPES[1], "label": "B", "box": [210, 210, 220, 220], "size": 10},  # in 1
        {"colour": blue, "shape": "circle", "label": "C", "box": [300, 300, 400, 400], "size": 100}]}
    oracle = probe.OracleTokens(8, grid=4, paint="density")
    mass = oracle.cell_mass(scene)
    red, circle = list(eg.COLOURS).index("red"), eg.SHAPES.index("circle")
    torch.testing.assert_close(mass["colour_mass"][:2, red], torch.tensor([0.5, 0.5]))
    assert mass["colour_mass"][10, red] == 1.0 and mass["colour_mass"][15, 1] == 1.0
    assert mass["colour_mass"].sum(0).tolist()[:2] == [2.0, 1.0] and mass["shape_mass"][:, circle].sum() == 2.0
    # on top of what covers the cell: cell 0 holds half of the red circle (whose box covers its centre)
    covered = probe.OracleTokens(8, grid=4, paint="cover")
    covered.load_state_dict({k: v for k, v in oracle.state_dict().items() if "density" not in k})
    half = 0.5 * (oracle.colour_density.weight[red] + oracle.shape_density.weight[circle])
    torch.testing.assert_close(oracle(scene)[0].detach(), (covered(scene)[0] + half).detach())
