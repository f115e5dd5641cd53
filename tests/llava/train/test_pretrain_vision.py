"""Stage 0 (SigLIP pretraining on entity crops): crops hold their entity at the intended scale, batches are pure
functions of (seed, step), a killed run resumes to the uninterrupted weights, and only the tower changes."""
import json
import math
import random

import pytest
import torch

from llava.eval import entitygrid as eg
from llava.model.builder import read_state_dict
from llava.train import pretrain_vision as pv
from tests.cli_helpers import call_main

ARGS = ["--max_steps", "4", "--batch_size", "3", "--save_steps", "2", "--logging_steps", "1", "--eval_crops", "4",
        "--n_images", "8", "--kinds", "single,grid",
        "--config_overrides", '{"vision_config": {"num_hidden_layers": 2}, "n_layers": 1}']


def entity(colour, shape, label, box):
    return {"colour": colour, "shape": shape, "label": label, "box": box, "size": box[2] - box[0]}


def test_entity_crops_hold_their_entity_at_the_intended_scale_inside_the_image():
    rng = random.Random(0)
    entities = [entity("red", "square", "K", [900, 500, 960, 560]), entity("blue", "circle", "7", [10, 10, 30, 30])]
    lo, hi = pv.CROP_ENTITY_SIDE
    scales = []
    for _ in range(400):
        (x0, y0, side, side_y), index = pv.draw_entity_crop(rng, 1000, 600, entities)
        x0e, y0e, x1e, y1e = entities[index]["box"]
        assert side == side_y and 0 <= x0 <= 1000 - side + 1e-6 and 0 <= y0 <= 600 - side + 1e-6
        assert x0 <= x0e and x1e <= x0 + side + 1e-6 and y0 <= y0e and y1e <= y0 + side + 1e-6  # whole
        scales.append(pv.CROP_PX * (x1e - x0e) / side)
    assert lo - 1e-6 <= min(scales) and max(scales) <= hi + 1e-6
    # log-uniform: about half the crops below the geometric mean of the range
    assert 150 < sum(s < math.sqrt(lo * hi) for s in scales) < 250


def test_a_crop_larger_than_the_image_shrinks_to_it():
    tiny = [entity("red", "square", "K", [0, 0, 200, 200])]  # needs a 2,240 px crop for 10 px: the image is 300
    (x0, y0, side, _), _ = pv.draw_entity_crop(random.Random(0), 300, 250, tiny)
    assert side <= 250 and x0 >= 0 and y0 >= 0 and x0 + side <= 300 + 1e-6


def test_crop_batches_are_a_function_of_seed_and_step_and_name_the_centre_entity():
    a = pv.make_batch(0, 3, 10, ["grid"], 8, "train")
    b = pv.make_batch(0, 3, 10, ["grid"], 8, "train")
    assert a[0].shape == (10, 3, pv.CROP_PX, pv.CROP_PX) and a[1]["label"].shape == (10,)
    assert torch.equal(a[0], b[0]) and all(torch.equal(a[1][k], b[1][k]) for k in pv.ATTRIBUTES)
    assert not torch.equal(pv.make_batch(0, 4, 10, ["grid"], 8, "train")[0], a[0])
    # the crop's centre pixel is inside the centre entity's box, and a solid entity's colour
    solo = pv.make_batch(0, 0, 8, ["solo"], 4, "train")
    for pixels, colour in zip(solo[0], solo[1]["colour"]):
        rgb = ((pixels[:, pv.CROP_PX // 2, pv.CROP_PX // 2] * 0.5 + 0.5) * 255).round()
        expected = torch.tensor(eg.COLOURS[pv.ATTRIBUTES["colour"][colour]], dtype=torch.float32)
        text = [torch.tensor(c, dtype=torch.float32) for c in eg.TEXT_RGB.values()]
        assert (rgb - expected).abs().max() <= 40 or any((rgb - t).abs().max() <= 40 for t in text)


def test_losses_train_every_head():
    heads = pv.CropHeads(8)
    features = torch.randn(5, 4, 8, requires_grad=True)
    targets = {k: torch.randint(len(v), (5,)) for k, v in pv.ATTRIBUTES.items()}
    found = [[0, pv.NO_ENTITY, 1, pv.NO_ENTITY]] * 5  # two entity centres per crop
    entities = [entity("red", "square", "K", [0, 0, 9, 9]), entity("blue", "circle", "7", [0, 0, 9, 9])]
    per_token = [pv.token_targets(f, entities) for f in found]
    targets.update({k: torch.tensor([t[k] for t in per_token]) for k in pv.TOKEN_TARGETS})
    targets["density"] = torch.stack([pv.entity_density((0.0, 0.0, 18.0, 18.0), entities, 2)] * 5)
    assert targets["token_colour"][0].tolist() == [pv.ATTRIBUTES["colour"].index("red"), pv.NO_ENTITY,
                                                   pv.ATTRIBUTES["colour"].index("blue"), pv.NO_ENTITY]
    assert set(pv.losses(heads, features, targets)) == {*pv.ATTRIBUTES, "position", *pv.TOKEN_TARGETS}
    parts = pv.losses(heads, features, targets, density_weight=0.1)
    assert set(parts) == {*pv.ATTRIBUTES, "position", *pv.TOKEN_TARGETS, "density", "density_sum"}
    assert all(torch.isfinite(v) for v in parts.values())
    sum(parts.values()).backward()
    assert all(p.grad is not None for p in heads.parameters()) and features.grad.abs().sum() > 0
    with torch.no_grad():  # a map of zeros costs each crop its squared densities, summed over tokens and channels
        heads.density[1].weight.zero_()
        heads.density[1].bias.zero_()
    w = 0.1
    zero = pv.losses(heads, features, targets, density_weight=w)
    assert zero["density"].item() == pytest.approx(w * (targets["density"] ** 2).sum((1, 2)).mean().item())
    assert zero["density_sum"].item() == pytest.approx(w * (targets["density"].sum(1) ** 2).sum(1).mean().item())
    assert (heads(features)["density"] >= 0).all()


def test_killed_run_resumes_to_the_uninterrupted_weights_and_only_the_tower_trains(tmp_path, monkeypatch, capsys):
    assert call_main(pv.main, ["--output_dir", str(tmp_path / "whole"), *ARGS]) == 0
    whole = read_state_dict(tmp_path / "whole" / "final")

    real = pv.make_batch

    def dies_at_step_3(seed, step, *rest):
        if step == 3:
            raise KeyboardInterrupt("killed")
        return real(seed, step, *rest)

    monkeypatch.setattr(pv, "make_batch", dies_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        call_main(pv.main, ["--output_dir", str(tmp_path / "killed"), *ARGS])
    assert (tmp_path / "killed" / pv.STATE_FILE).exists() and not (tmp_path / "killed" / "final").exists()
    monkeypatch.setattr(pv, "make_batch", real)
    assert call_main(pv.main, ["--output_dir", str(tmp_path / "killed"), *ARGS]) == 0
    assert "resumed" in capsys.readouterr().err
    resumed = read_state_dict(tmp_path / "killed" / "final")
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert not (tmp_path / "killed" / pv.STATE_FILE).exists()
    # step 3 was logged before the kill but saved only to step 2: the resumed run logs it once, not twice
    log = (tmp_path / "killed" / pv.LOG_FILE).read_text().splitlines()
    assert [json.loads(line)["step"] for line in log] == [1, 2, 3, 4]

    # the LM and projector leave at their init: equal to a run of zero effective steps, i.e. the built model
    from llava.model.builder import build_small_model
    _, init = build_small_model(config_overrides={"vision_config": {"num_hidden_layers": 2}, "n_layers": 1})
    init = init.state_dict()
    tower = [k for k in whole if k.startswith("model.vision_tower.")]
    assert tower and any(not torch.equal(whole[k], init[k]) for k in tower)
    assert all(torch.equal(whole[k], init[k]) for k in whole if not k.startswith("model.vision_tower."))


def test_bad_flags_and_finished_stage_are_clear_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        pv.parse_args(["--output_dir", str(tmp_path), "--max_steps", "2", "--kinds", "grid,tiles"])
    assert f"--kinds: tiles not among {', '.join(eg.KINDS)}" in capsys.readouterr().err
    (tmp_path / "final").mkdir()
    assert call_main(pv.main, ["--output_dir", str(tmp_path), *ARGS]) == 2
    assert "this stage is done" in capsys.readouterr().err
    assert call_main(pv.main, ["--output_dir", str(tmp_path / "x"), *ARGS[:-1], "{not json"]) == 2
    assert "--config_overrides is not JSON" in capsys.readouterr().err
    for bad in (["--density_views", "2"], ["--density_weight", "-1"]):
        with pytest.raises(SystemExit):
            pv.parse_args(["--output_dir", str(tmp_path), "--max_steps", "2", *bad])
        assert "--density_views needs a --density_weight" in capsys.readouterr().err


def test_density_heads_train_on_crops_and_grid_views_and_are_scored_only_when_on(tmp_path):
    assert call_main(pv.main, ["--output_dir", str(tmp_path / "off"), *ARGS]) == 0
    off = json.loads((tmp_path / "off" / "val_accuracy.json").read_text())
    assert not any("count_" in k for k in off)
    args = ["--output_dir", str(tmp_path / "on"), *ARGS, "--density_weight", "0.1", "--density_views", "1"]
    assert call_main(pv.main, args) == 0
    on = json.loads((tmp_path / "on" / "val_accuracy.json").read_text())
    assert {"grid_view_count_colour_exact", "grid_view_count_shape_mae"} <= set(on)
    logged = json.loads((tmp_path / "on" / pv.LOG_FILE).read_text().splitlines()[-1])
    assert {"density", "density_sum", "view_density", "view_density_sum"} <= set(logged)
    # the density losses reach the tower: its weights differ from the run without them
    a, b = read_state_dict(tmp_path / "off" / "final"), read_state_dict(tmp_path / "on" / "final")
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("model.vision_tower."))


def test_centre_views_train_the_per_token_heads_on_grid_views_too(tmp_path, capsys):
    assert call_main(pv.main, ["--output_dir", str(tmp_path / "off"), *ARGS]) == 0
    assert call_main(pv.main, ["--output_dir", str(tmp_path / "on"), *ARGS, "--centre_views", "1"]) == 0
    logged = json.loads((tmp_path / "on" / pv.LOG_FILE).read_text().splitlines()[-1])
    assert {"view_centre", "view_token_colour", "view_token_shape"} <= set(logged) and "view_density" not in logged
    assert all(math.isfinite(logged[k]) for k in ("view_centre", "view_token_colour", "view_token_shape"))
    a, b = read_state_dict(tmp_path / "off" / "final"), read_state_dict(tmp_path / "on" / "final")
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("model.vision_tower."))
    with pytest.raises(SystemExit):
        pv.parse_args(["--output_dir", str(tmp_path), "--max_steps", "2", "--centre_views", "-1"])
    assert "--centre_views must be >= 0" in capsys.readouterr().err


def test_token_positions_are_patch_centres_in_raster_order():
    pos = pv.token_positions(4)  # 2x2: (-0.5, -0.5), (0.5, -0.5), (-0.5, 0.5), (0.5, 0.5)
    assert torch.equal(pos, torch.tensor([[-0.5, -0.5], [0.5, -0.5], [-0.5, 0.5], [0.5, 0.5]]))
    assert pv.token_positions(64)[9].tolist() == [-0.625, -0.625]  # row 1, column 1 of 8
    with pytest.raises(ValueError, match="not a square grid"):
        pv.token_positions(6)


def test_centre_entities_mark_the_patch_of_each_entity_centre_inside_the_crop():
    entities = [entity("red", "square", "K", [100, 100, 140, 140]),  # centre (120, 120)
                entity("blue", "circle", "7", [0, 0, 20, 20]),  # centre (10, 10): outside the crop
                entity("green", "hexagon", "A", [180, 150, 200, 170])]  # centre (190, 160)
    found = pv.centre_entities((80.0, 80.0, 160.0, 160.0), entities, 4)  # 4x4 patches of 40 px from (80, 80)
    assert {i: e for i, e in enumerate(found) if e != pv.NO_ENTITY} == {1 * 4 + 1: 0, 2 * 4 + 2: 2}
    targets = pv.token_targets(found, entities)
    assert [i for i, m in enumerate(targets["centre"]) if m] == [5, 10]
    assert targets["token_shape"][10] == pv.ATTRIBUTES["shape"].index("hexagon") and targets["token_shape"][0] < 0
    batch = pv.make_batch(0, 0, 6, ["grid"], 4, "train")[1]
    with_density = pv.make_batch(0, 0, 6, ["grid"], 4, "train", density=True)[1]
    assert "density" not in batch and with_density["density"].shape == (6, pv.CROP_GRID ** 2, len(pv.DENSITY_CHANNELS))
    assert all(torch.equal(batch[k], with_density[k]) for k in batch)  # the density targets change nothing else
    assert batch["centre"].shape == (6, pv.CROP_GRID ** 2) and (batch["centre"].sum(1) >= 1).all()  # own entity
    assert torch.equal(batch["token_colour"] != pv.NO_ENTITY, batch["centre"] > 0.5)


def test_grid_views_mark_entity_centres_on_the_stretched_global_view():
    pixels, targets = pv.grid_views(0, range(2))
    side = pv.SIGLIP_GRID
    assert pixels.shape == (2, 3, pv.SIGLIP_IMAGE_SIZE, pv.SIGLIP_IMAGE_SIZE)
    _, scene, _ = eg.make_sample("val", 0, 0, "grid", questions_per_image=0)
    w, h = scene["size"]
    expected = {int((e["box"][1] + e["box"][3]) / 2 / h * side) * side + int((e["box"][0] + e["box"][2]) / 2 / w * side)
                for e in scene["entities"]}
    assert {i for i, m in enumerate(targets["centre"][0].tolist()) if m} == expected


def test_entity_density_spreads_each_entity_over_the_patches_it_covers_by_area():
    entities = [entity("red", "square", "K", [100, 100, 140, 140]),  # 40 px: a quarter in each of 4 patches
                entity("blue", "circle", "7", [60, 60, 100, 100]),  # a quarter of it inside the crop
                entity("red", "hexagon", "A", [170, 130, 180, 150])]  # inside one patch
    density = pv.entity_density((80.0, 80.0, 160.0, 160.0), entities, 4).view(4, 4, -1)
    red, blue = pv.DENSITY_CHANNELS.index("red"), pv.DENSITY_CHANNELS.index("blue")
    square = len(pv.ATTRIBUTES["colour"]) + pv.ATTRIBUTES["shape"].index("square")
    hexagon = len(pv.ATTRIBUTES["colour"]) + pv.ATTRIBUTES["shape"].index("hexagon")
    assert density[:, :, red].sum().item() == pytest.approx(2.0)  # two red entities, whatever their sizes
    assert density[:, :, blue].sum().item() == pytest.approx(0.25)  # only the part inside the crop
    assert density[0, 0, blue].item() == pytest.approx(0.25)
    assert torch.allclose(density[0:2, 0:2, square], torch.tensor(0.25))  # patches of 40 px from (80, 80)
    assert density[1, 2, hexagon].item() == pytest.approx(1.0) and density[:, :, hexagon].sum() == pytest.approx(1.0)
    assert density.shape[-1] == len(pv.DENSITY_CHANNELS) == len(eg.COLOURS) + len(eg.SHAPES)


def test_density_counts_score_the_summed_map_against_the_true_counts():
    _, targets = pv.grid_views(0, range(2), density=True)
    _, scene, _ = eg.make_sample("val", 0, 0, "grid", questions_per_image=0)
    truth = targets["density"][0].sum(0)
    for i, colour in enumerate(eg.COLOURS):  # every entity lies inside the global view: whole counts
        assert truth[i].item() == pytest.approx(sum(e["colour"] == colour for e in scene["entities"]), abs=1e-4)
    perfect = pv.density_count_scores({"density": targets["density"]}, targets, "v_")
    assert perfect == {"v_count_colour_exact": 1.0, "v_count_colour_mae": 0.0,
                       "v_count_shape_exact": 1.0, "v_count_shape_mae": 0.0}
    off = pv.density_count_scores({"density": targets["density"] * 0}, targets)
    assert off["count_colour_mae"] == pytest.approx(truth[:len(eg.COLOURS)].mean().item() / 2
                                                    + targets["density"][1].sum(0)[:len(eg.COLOURS)].mean().item() / 2,
                                                    abs=1e-3)


def test_head_vocabularies_are_the_generators():
    assert pv.ATTRIBUTES["label"] == eg.LABELS and pv.ATTRIBUTES["colour"] == tuple(eg.COLOURS)
    assert pv.ATTRIBUTES["shape"] == eg.SHAPES
