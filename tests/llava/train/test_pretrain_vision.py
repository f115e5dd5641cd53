"""Stage 0 (dense SigLIP pretraining): patch targets land on the right tokens, batches are pure functions of
(seed, step), a killed run resumes to the uninterrupted weights, and only the tower changes."""
import random

import pytest
import torch

from llava.eval import entitygrid as eg
from llava.model.builder import read_state_dict
from llava.train import pretrain_vision as pv
from tests.cli_helpers import call_main

ARGS = ["--max_steps", "4", "--batch_size", "2", "--save_steps", "2", "--logging_steps", "1", "--eval_views", "2",
        "--n_images", "8", "--kinds", "single,solo",
        "--config_overrides", '{"vision_config": {"num_hidden_layers": 2}, "n_layers": 1}']


def entity(colour, shape, label, box):
    return {"colour": colour, "shape": shape, "label": label, "box": box, "size": box[2] - box[0]}


def targets(entities, size=(384, 384), view=None):
    """Patch targets [27, 27] per head of a rendered scene (identity view: patch (r, c) = pixels [14c, 14c+14))."""
    scene = {"size": list(size), "entities": entities}
    _, t = pv.make_view(eg.render_scene(scene), scene, view or (0.0, 0.0, *map(float, size)), 27, 14)
    return {k: v.view(27, 27) for k, v in t.items()}


def test_a_patch_belongs_to_the_entity_painting_it():
    t = targets([entity("red", "square", "K", [14, 28, 56, 70])])  # columns 1..3, rows 2..4
    red = pv.HEAD_CLASSES["colour"].index("red")
    assert t["colour"][2:5, 1:4].eq(red).all() and t["colour"].ne(0).sum() == 9
    assert t["shape"][3, 2] == pv.HEAD_CLASSES["shape"].index("square") and t["shape"][0, 0] == 0
    # a diamond's box corners are background, its centre is the diamond
    d = targets([entity("blue", "diamond", "7", [0, 0, 140, 140])])["colour"]
    assert d[0, 0] == 0 and d[5, 5] == pv.HEAD_CLASSES["colour"].index("blue") and d[0, 4] != 0


def test_labels_only_where_the_text_is_and_small_entities_own_their_patch():
    t = targets([entity("red", "circle", "K", [0, 0, 140, 140]), entity("green", "square", "7", [200, 200, 206, 206])])
    label = t["label"]
    # the text box: the central half of the side, [35, 105) px of the 140 px box -> cells 2..7
    assert label[2:8, 2:8].eq(pv.HEAD_CLASSES["label"].index("K")).all()
    assert label[1, 4] == pv.IGNORE and label[8, 4] == pv.IGNORE and label[20, 20] == 0
    # a 6 px square inside patch (14, 14) owns it, with its label (its text box is inside that patch)
    assert t["colour"][14, 14] == pv.HEAD_CLASSES["colour"].index("green")
    assert label[14, 14] == pv.HEAD_CLASSES["label"].index("7")


def test_views_scale_the_targets():
    big = entity("red", "square", "K", [0, 0, 100, 100])
    # a 768-px view of a 768-px image halves everything: 100 px -> 50 view px -> columns 0..3 (0..49 px)
    half = targets([big], (768, 768))["colour"]
    assert half[0, :4].ne(0).all() and half[0, 4] == 0
    # a view that misses the entity has no target
    assert targets([big], (768, 768), (300.0, 300.0, 384.0, 384.0))["colour"].eq(0).all()


def test_views_stay_inside_the_image_within_the_aspect_range():
    rng = random.Random(0)
    whole = 0
    for _ in range(400):
        x0, y0, w, h = pv.draw_view(rng, 1200, 800)
        assert 0 <= x0 and 0 <= y0 and x0 + w <= 1200 + 1e-6 and y0 + h <= 800 + 1e-6
        whole += (w, h) == (1200, 800)
        if (w, h) != (1200, 800):
            assert w >= 384 / pv.MAX_VIEW_ASPECT ** 0.5 - 1e-6 or h == 800
    assert 60 < whole < 140  # GLOBAL_VIEW_P = 0.25 of 400


def test_batches_are_a_function_of_seed_and_step():
    a = pv.make_batch(0, 3, 2, ["single"], 8, "train", 27, 14)
    b = pv.make_batch(0, 3, 2, ["single"], 8, "train", 27, 14)
    c = pv.make_batch(0, 4, 2, ["single"], 8, "train", 27, 14)
    assert a[0].shape == (2, 3, 384, 384) and a[1]["label"].shape == (2, 729)
    assert torch.equal(a[0], b[0]) and all(torch.equal(a[1][k], b[1][k]) for k in pv.HEAD_CLASSES)
    assert not torch.equal(a[0], c[0])
    assert (a[1]["colour"] > 0).any()  # single images have 1-3 large entities: some patches are labelled


def test_every_owner_weighs_the_same():
    owner = torch.tensor([[0, 0, 1, 1, 1, 2], [3, 3, 3, 3, 0, 0]])
    w = pv.entity_weights(owner)
    assert torch.allclose(w[0], torch.tensor([1 / 2, 1 / 2, 1 / 3, 1 / 3, 1 / 3, 1.0]))
    assert torch.allclose(w[1], torch.tensor([1 / 4] * 4 + [1 / 2] * 2))


def test_losses_without_any_entity_patch_are_finite():
    features = torch.randn(1, 4, 8, requires_grad=True)
    targets = {k: torch.zeros(1, 4, dtype=torch.long) for k in (*pv.HEAD_CLASSES, "owner")}
    parts = pv.losses(pv.PatchHeads(8), features, targets)
    assert all(torch.isfinite(v) for v in parts.values()) and parts["label"].item() == 0.0
    assert parts["shape_entity"].item() == 0.0
    sum(parts.values()).backward()


def test_entity_pooling_averages_each_entitys_patches():
    features = torch.arange(12.0).view(2, 3, 2)  # view 0: patches [0,1], [2,3], [4,5]; view 1: [6,7] ...
    owner = torch.tensor([[1, 1, 0], [2, 0, 2]])
    target = torch.tensor([[4, 4, 0], [2, 0, 2]])
    pooled, labels = pv.pool_by_owner(features, owner, owner > 0, target)
    assert torch.equal(pooled, torch.tensor([[1.0, 2.0], [8.0, 9.0]])) and labels.tolist() == [4, 2]


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
    assert "--kinds: tiles not among grid, single, solo" in capsys.readouterr().err
    (tmp_path / "final").mkdir()
    assert call_main(pv.main, ["--output_dir", str(tmp_path), *ARGS]) == 2
    assert "this stage is done" in capsys.readouterr().err
    assert call_main(pv.main, ["--output_dir", str(tmp_path / "x"), *ARGS[:-1], "{not json"]) == 2
    assert "--config_overrides is not JSON" in capsys.readouterr().err


def test_head_vocabularies_are_the_generators():
    assert pv.HEAD_CLASSES["label"][1:] == eg.LABELS and pv.HEAD_CLASSES["colour"][1:] == tuple(eg.COLOURS)
