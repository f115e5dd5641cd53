"""EntityGrid-QA generator: determinism, correctness of answers against the drawn scene, geometry, format."""
import json
import re

import numpy as np
import pytest

from llava.eval import entitygrid as eg
from llava.eval.datasets import load_dataset
from llava.mm_utils import load_image


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """24 test images (96 items) under <root>/entitygrid, as the evaluation layout expects."""
    root = tmp_path_factory.mktemp("egroot")
    stats = eg.generate(root / "entitygrid", "test", 24)
    return root, stats


def _scenes(root):
    return json.loads((root / "entitygrid" / "test_scenes.json").read_text())


def test_deterministic_by_seed_and_distinct_across_splits_and_seeds():
    img_a, scene_a, q_a = eg.make_sample("test", 5)
    img_b, scene_b, q_b = eg.make_sample("test", 5)
    assert scene_a == scene_b and q_a == q_b and img_a.tobytes() == img_b.tobytes()
    assert eg.make_sample("train", 5)[1] != scene_a
    assert eg.make_sample("val", 5)[1] != scene_a
    assert eg.make_sample("test", 5, seed=1)[1] != scene_a
    assert eg.make_sample("test", 6)[1] != scene_a
    with pytest.raises(ValueError, match="unknown split"):
        eg.make_sample("dev", 0)


def test_seed_offset_generates_the_same_images_in_chunks(tmp_path):
    eg.generate(tmp_path, "val", 2, seed_offset=3)
    items = json.loads((tmp_path / "val.json").read_text())
    assert [i["image"] for i in items[::4]] == ["images/val-grid-s0-000003.png", "images/val-grid-s0-000004.png"]
    _, scene, questions = eg.make_sample("val", 4)
    assert json.loads((tmp_path / "val_scenes.json").read_text())["images/val-grid-s0-000004.png"] == scene
    assert [i["question"] for i in items[4:]] == [q for q, _, _ in questions]


def test_written_split_loads_through_the_generic_loader(written):
    root, stats = written
    assert stats["images"] == 24 and stats["items"] == 96  # 4 questions per image
    ds = load_dataset("entitygrid", root)
    assert len(ds) == 96 and ds.missing_images == 0 and len({i.id for i in ds}) == 96
    assert {i.meta["qtype"] for i in ds} == set(eg.QTYPES)
    for item in ds:
        assert len(item.answers) == 1 and item.answers[0] in eg.ANSWER_VOCAB
        assert item.meta["kind"] == "grid"
    image = load_image(ds[0].image)
    w, h = ds[0].meta["image_size"]
    assert image.mode == "RGB" and image.size == (w, h)
    assert 768 <= w <= 1536 and 768 <= h <= 1536


def _derive(question: str, entities: list) -> str:
    """The answer to a question re-derived from its text and the scene's entities (not from item meta)."""
    def one(**match):
        found = [e for e in entities if all(e[k] == v for k, v in match.items())]
        assert len(found) == 1, (question, match, found)
        return found[0]

    if m := re.fullmatch(r"What is the label on the (\w+) (\w+)\?", question):
        return one(colour=m[1], shape=m[2])["label"]
    if m := re.fullmatch(r"What colour is the shape labelled (\w)\?", question):
        return one(label=m[1])["colour"]
    if m := re.fullmatch(r"What shape is labelled (\w)\?", question):
        return one(label=m[1])["shape"]
    if m := re.fullmatch(r"What shape is (\w+)\?", question):
        return one(colour=m[1])["shape"]  # asked only of a colour exactly one entity has
    if m := re.fullmatch(r"How many (\w+)s are there\?", question):
        return str(sum(e["shape"] == m[1] for e in entities))
    if m := re.fullmatch(r"How many (\w+) shapes are there\?", question):
        return str(sum(e["colour"] == m[1] for e in entities))
    if m := re.fullmatch(r"Is the (\w+) (\w+) (left or right of|above or below) the (\w+) (\w+)\?", question):
        a, b = one(colour=m[1], shape=m[2]), one(colour=m[4], shape=m[5])
        lo, hi = (0, 2) if m[3].startswith("left") else (1, 3)
        assert a["box"][hi] <= b["box"][lo] or b["box"][hi] <= a["box"][lo], "extents overlap: ambiguous"
        first = a["box"][hi] <= b["box"][lo]
        return ("left" if first else "right") if lo == 0 else ("above" if first else "below")
    raise AssertionError(f"unexpected question form: {question}")


def test_answers_match_the_recorded_entities(written):
    root, _ = written
    scenes = _scenes(root)
    items = json.loads((root / "entitygrid" / "test.json").read_text())
    for item in items:
        entities = scenes[item["image"]]["entities"]
        assert item["answers"] == [_derive(item["question"], entities)], item["question"]
        meta = item["meta"]
        assert meta["n_entities"] == len(entities)
        if meta["target"] is not None:
            assert meta["target"] in entities
        if meta["qtype"] == "position":
            assert meta["reference"] in entities and meta["axis"] in ("x", "y")


def test_shape_of_colour_is_opt_in_and_names_a_colour_one_entity_has():
    asked = 0
    for i in range(20):
        scene, questions = eg.make_scene_questions("test", i, 0, "grid", 2, ("shape_of_colour",))
        for question, answer, meta in questions:
            asked += 1
            assert answer == _derive(question, scene["entities"]) and meta["target"] in scene["entities"]
            assert meta["size_bucket"] in ("native", "mid", "global")
        _, default = eg.make_scene_questions("test", i, 0, "grid")
        assert all(meta["qtype"] != "shape_of_colour" for _, _, meta in default)  # the evaluation splits never ask it
    assert asked >= 15  # most grids have a colour only one entity wears


def test_scene_geometry_and_uniqueness(written):
    root, _ = written
    for scene in _scenes(root).values():
        w, h = scene["size"]
        ents = scene["entities"]
        assert 12 <= len(ents) <= 24
        assert len({(e["colour"], e["shape"]) for e in ents}) == len(ents)
        assert len({e["label"] for e in ents}) == len(ents)
        for i, e in enumerate(ents):
            x0, y0, x1, y1 = e["box"]
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
            assert x1 - x0 == y1 - y0 == e["size"] >= eg.MIN_SIDE
            assert e["size"] <= max(2 * eg.MIN_SIDE, 0.09 * max(w, h)) + 1
            for o in ents[i + 1:]:
                assert x1 <= o["box"][0] or o["box"][2] <= x0 or y1 <= o["box"][1] or o["box"][3] <= y0


def test_shapes_and_labels_are_drawn_in_their_boxes(written):
    root, _ = written
    for name, scene in list(_scenes(root).items())[:6]:
        pixels = np.asarray(load_image(root / "entitygrid" / name))
        for e in scene["entities"]:
            x0, y0, x1, y1 = e["box"]
            patch = pixels[y0:y1, x0:x1].reshape(-1, 3)
            fill = np.all(patch == eg.COLOURS[e["colour"]], axis=1).sum()
            text = np.all(patch == eg.text_colour(e["colour"]), axis=1).sum()
            assert fill > 0.2 * patch.shape[0], (name, e)
            assert text >= 6, (name, e)  # label strokes actually drawn
            # and nothing of that fill colour right outside the box (the box is tight around the shape)
            ring = pixels[max(0, y0 - 2):y1 + 2, max(0, x0 - 2):x1 + 2].reshape(-1, 3)
            assert np.all(ring == eg.COLOURS[e["colour"]], axis=1).sum() == fill


def test_sizes_span_global_readable_to_native_only(written):
    root, _ = written
    items = json.loads((root / "entitygrid" / "test.json").read_text())
    sized = [i["meta"] for i in items if i["meta"]["size_px"] is not None]
    g = [m["size_global_px"] for m in sized]
    assert min(g) < eg.BUCKET_NATIVE_BELOW and max(g) > 20
    assert {m["size_bucket"] for m in sized} == {"native", "mid", "global"}
    for m in sized:
        w, h = m["image_size"]
        assert m["size_global_px"] == pytest.approx(m["size_px"] * 384 / max(w, h), abs=0.01)
        if m["box"] is not None:
            assert 0.0 <= m["center_dist"] <= 1.0


def test_single_kind_has_few_large_entities(tmp_path):
    stats = eg.generate(tmp_path, "train", 12, kind="single")
    scenes = json.loads((tmp_path / "train_scenes.json").read_text())
    items = json.loads((tmp_path / "train.json").read_text())
    assert stats["images"] == 12 and len(items) == 48
    for scene in scenes.values():
        w, h = scene["size"]
        assert 384 <= w <= 768 and 384 <= h <= 768 and 1 <= len(scene["entities"]) <= 3
        assert all(e["size"] >= 0.15 * min(w, h) - 1 for e in scene["entities"])
    for item in items:
        assert item["answers"] == [_derive(item["question"], scenes[item["image"]]["entities"])]
        if item["meta"]["size_bucket"] is not None:
            assert item["meta"]["size_bucket"] == "global"


@pytest.mark.parametrize("kind, image_sides, n_entities, side_bounds", [
    ("sparse", (768, 1536), (4, 8), lambda w, h: (eg.MIN_SIDE, max(2 * eg.MIN_SIDE, 0.09 * max(w, h)))),
    ("medium", (384, 768), (3, 6), lambda w, h: (0.07 * min(w, h), 0.15 * min(w, h))),
])
def test_bridge_kinds_have_their_image_sizes_entity_counts_and_sides(tmp_path, kind, image_sides, n_entities,
                                                                     side_bounds):
    eg.generate(tmp_path, "train", 12, kind=kind)
    scenes = json.loads((tmp_path / "train_scenes.json").read_text())
    items = json.loads((tmp_path / "train.json").read_text())
    for scene in scenes.values():
        w, h = scene["size"]
        lo, hi = side_bounds(w, h)
        assert image_sides[0] <= w <= image_sides[1] and image_sides[0] <= h <= image_sides[1]
        assert n_entities[0] <= len(scene["entities"]) <= n_entities[1]
        assert all(lo - 1 <= e["size"] <= hi + 1 for e in scene["entities"])
    assert {it["meta"]["qtype"] for it in items} >= {"count", "position"}
    for item in items:
        assert item["answers"] == [_derive(item["question"], scenes[item["image"]]["entities"])]


def test_solo_kind_has_one_very_large_entity_and_no_position_questions(tmp_path):
    eg.generate(tmp_path, "train", 12, kind="solo")
    scenes = json.loads((tmp_path / "train_scenes.json").read_text())
    items = json.loads((tmp_path / "train.json").read_text())
    assert len(items) == 48
    for scene in scenes.values():
        w, h = scene["size"]
        (entity,) = scene["entities"]
        assert 384 <= w <= 768 and 384 <= h <= 768 and 0.4 * min(w, h) - 1 <= entity["size"] <= 0.8 * min(w, h) + 1
    assert {it["meta"]["qtype"] for it in items} == {"label", "colour", "shape", "count"}
    for item in items:
        assert item["answers"] == [_derive(item["question"], scenes[item["image"]]["entities"])]


def test_training_question_knobs_change_only_the_questions(tmp_path):
    """--qtypes restricts the question types; --balanced-counts makes half the counts name a colour/shape that is
    in the image. Images and scenes are unchanged, and the defaults give the evaluation splits as before."""
    eg.generate(tmp_path / "plain", "train", 40, kind="solo")
    eg.main(["--split", "train", "--n", "40", "--kind", "solo", "--out", str(tmp_path / "bal"),
             "--qtypes", "count,colour", "--balanced-counts"])
    scenes = json.loads((tmp_path / "bal" / "train_scenes.json").read_text())
    assert json.loads((tmp_path / "plain" / "train_scenes.json").read_text()) == scenes
    items = json.loads((tmp_path / "bal" / "train.json").read_text())
    assert {it["meta"]["qtype"] for it in items} == {"count", "colour"}
    counts = [it["answers"][0] for it in items if it["meta"]["qtype"] == "count"]
    plain = [it["answers"][0] for it in json.loads((tmp_path / "plain" / "train.json").read_text())
             if it["meta"]["qtype"] == "count"]
    assert 0.35 < counts.count("1") / len(counts) < 0.8 and plain.count("1") / len(plain) < 0.35
    for item in items:
        assert item["answers"] == [_derive(item["question"], scenes[item["image"]]["entities"])]
    assert eg.make_sample("test", 3) == eg.make_sample("test", 3, qtypes=eg.QTYPES, balanced_counts=False)
    with pytest.raises(ValueError, match="question types"):
        eg.make_sample("test", 3, qtypes=("colour", "size"))
    with pytest.raises(SystemExit):
        eg.main(["--split", "val", "--n", "1", "--out", str(tmp_path), "--qtypes", "size"])


def test_distinct_questions_never_repeat_one_on_an_image_and_change_nothing_else(tmp_path):
    """Count-only grid records repeat a question often; --distinct-questions redraws repeats. The images, the
    first question of each image and every answer's truth are unchanged."""
    eg.main(["--split", "train", "--n", "30", "--out", str(tmp_path / "rep"), "--qtypes", "count", "--balanced-counts"])
    eg.main(["--split", "train", "--n", "30", "--out", str(tmp_path / "dis"), "--qtypes", "count", "--balanced-counts",
             "--distinct-questions"])
    scenes = json.loads((tmp_path / "dis" / "train_scenes.json").read_text())
    assert json.loads((tmp_path / "rep" / "train_scenes.json").read_text()) == scenes

    def by_image(name):
        out = {}
        for it in json.loads((tmp_path / name / "train.json").read_text()):
            out.setdefault(it["image"], []).append(it)
        return out

    repeated, distinct = by_image("rep"), by_image("dis")
    assert any(len({it["question"] for it in its}) < len(its) for its in repeated.values())  # the leak exists
    for image, its in distinct.items():
        assert len({it["question"] for it in its}) == len(its) == 4
        assert its[0]["question"] == repeated[image][0]["question"]
        for it in its:
            assert it["answers"] == [_derive(it["question"], scenes[image]["entities"])]
    assert eg.make_sample("test", 3) == eg.make_sample("test", 3, distinct=False)


def test_cli(tmp_path, capsys):
    assert eg.main(["--split", "val", "--n", "3", "--out", str(tmp_path), "--questions-per-image", "2"]) == 0
    assert "wrote 6 items on 3 images" in capsys.readouterr().out
    assert len(json.loads((tmp_path / "val.json").read_text())) == 6
    with pytest.raises(SystemExit):
        eg.main(["--split", "val", "--n", "-1", "--out", str(tmp_path)])
