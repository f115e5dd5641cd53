"""EntityGrid-QA: a seeded synthetic VQA set of small labelled shapes on large images.

    python -m llava.eval.entitygrid --split test --n 200 --out data/entitygrid [--seed S] [--seed-offset K]
                                    [--kind grid|sparse|medium|single|solo] [--questions-per-image 4]
                                    [--qtypes count,position] [--balanced-counts] [--distinct-questions]

writes `<out>/<split>.json` (the plain JSON list read by `llava.eval.datasets`: image, question, answers, id,
meta), `<out>/<split>_scenes.json` (every image's entities, for analysis and tests) and `<out>/images/*.png`.
For the evaluation layout use `--out <data-root>/entitygrid`.

What an image holds (kind "grid", the evaluation set):
- size: width and height drawn independently from 768..1536 px (multiples of 16), so aspect ratios 1:2 .. 2:1;
- 12..24 entities, each a filled shape (circle, square, triangle, diamond, hexagon) in one of 8 colours with one
  character label (digits, and capitals without I, O, Q) written inside; (colour, shape) pairs and labels are
  unique within an image, so every question below has exactly one answer;
- entity sides log-uniform between 20 px and 9% of the image's longer side: in LaViDa's 384² global view (a
  plain resize of the whole image) they appear 5..35 px wide, from readable there to readable only at native
  resolution; positions uniform over the image, non-overlapping (≥ 4 px apart), on a faint background grid.
Kind "sparse" (the curriculum's bridge to grids): a grid's image sizes and entity sizes, but 4..8 entities, so
counting and finding a named pair stay possible while the model meets grid-scale images and entities.
Kind "medium" (the curriculum's bridge from "single" to grid-sized entities): "single"'s image sizes with 3..6
entities of 7–15% of the shorter side (in a 384² view 13..58 px: half a cell to two cells of a 14×14 pooled map).
Kind "single" (an early curriculum stage): 384..768 px images with 1..3 large entities (15–35% of the shorter side).
Kind "solo" (the first curriculum stage): 384..768 px images with ONE entity, 40–80% of the shorter side: the
answer is in most of the image's tokens, so a model trained from scratch first learns to read the image at all
(position questions need two entities and are not asked).

Questions (4 per image by default, of distinct types, drawn at random; the image is shared by its questions):
    label     "What is the label on the red circle?"                 -> "7" / "K"
    colour    "What colour is the shape labelled K?"                 -> "red"
    shape     "What shape is labelled K?"                            -> "circle"
    count     "How many triangles are there?" / "How many blue shapes are there?" -> "0".."8"
    position  "Is the red circle left or right of the blue square?"  -> "left"/"right" (or above/below); only asked
              about pairs whose extents on that axis do not overlap.
    shape_of_colour "What shape is red?"                             -> "circle"; only asked of a colour exactly one
              entity has. Opt-in (`--qtypes`; not in the evaluation splits): the colour of a small entity
              survives downsampling, its shape does not, so it is a fine-detail question that needs no letter read.
The answer vocabulary is closed: `ANSWER_VOCAB`. Three knobs exist for training sets only (the defaults make the
evaluation splits, unchanged by them): `--qtypes` restricts the types asked (a type listed twice is asked about
twice as often), and `--balanced-counts` makes half of the count questions name a colour or shape the image has
(drawn uniformly, a one-entity image's colour count is 0 for 7 of 8 colours, and a model learns "always 0"),
and `--distinct-questions` never asks one image the same question twice (a training record holds all of an
image's questions as turns).

Item meta (for breakdowns): qtype; kind; image_size [W, H]; n_entities; target (the entity asked about: colour,
shape, label, box [x0, y0, x1, y1] with x1/y1 exclusive, size); box; size_px (side of the target's box);
size_global_px (that side after the 384² global-view resize, limited by the longer image side); size_bucket
("native" < 8 px in the global view ≤ "mid" < 14 px ≤ "global"); center_dist (distance of the box centre from the
image centre in coordinates normalised to [-1, 1] per axis, divided by √2: 0 at the centre, 1 in a corner).
Count questions have no single target: target/box/center_dist are None, `count_of` names the filter, `boxes`
lists the counted entities' boxes and size_px is the smallest of them (None if the count is 0). Position questions
name the `reference` entity and the `axis`; their size fields are the smaller of the two entities'.

Determinism: image i of a split is drawn from `random.Random("entitygrid-v1/<kind>/<split>/<seed>/<i>")`, so it
depends only on (kind, split, seed, i): the same on every machine, independent of --n, and chunks made with
--seed-offset (which shifts i) concatenate into the same set. Splits differ because the split name is in the key;
--seed (default 0) gives fresh sets for robustness checks.

Speed: images are drawn in palette mode (flat colours, text not anti-aliased) and saved as palette PNGs, which
is what makes generation fast: ~180 images/s (~730 items/s at 4 questions per image) for the grid kind's
~1160 px images, ~700 images/s for the single kind, on one core of a 2-core CPU machine; an RGB image with
anti-aliased text would be 3–5x slower to encode. `load_image` converts them to RGB. `make_sample` gives the same
sample in memory, without the disk round trip, for training loops.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import random
import sys
import time
from collections import Counter
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from llava.constants import DEFAULT_IMAGE_TOKEN, SIGLIP_IMAGE_SIZE

GENERATOR_VERSION = "entitygrid-v1"
SPLITS = ("train", "val", "test")
KINDS = ("grid", "sparse", "medium", "single", "solo")
QTYPES = ("label", "colour", "shape", "count", "position")  # the evaluation splits' types (the default)
# every known type: QTYPES plus the opt-in ones, which training sets and probes may ask (--qtypes) and the
# evaluation splits do not, so adding one never changes a committed split
ALL_QTYPES = QTYPES + ("shape_of_colour",)

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 150, 55),
    "blue": (35, 75, 215),
    "yellow": (240, 200, 20),
    "orange": (245, 130, 20),
    "purple": (135, 55, 185),
    "brown": (125, 80, 35),
    "black": (25, 25, 25),
}
# Label colour on each fill: dark text on the light fills, white elsewhere.
_DARK_TEXT = {"yellow", "orange"}
SHAPES = ("circle", "square", "triangle", "diamond", "hexagon")
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "diamond": "diamonds",
           "hexagon": "hexagons"}
LABELS = tuple("0123456789ABCDEFGHJKLMNPRSTUVWXYZ")  # no I, O, Q (confusable with 1, 0)
POSITIONS = ("left", "right", "above", "below")
MAX_COUNT = max(len(COLOURS), len(SHAPES))
ANSWER_VOCAB = frozenset(COLOURS) | frozenset(SHAPES) | frozenset(LABELS) | frozenset(POSITIONS) | frozenset(
    str(i) for i in range(MAX_COUNT + 1)
)

# Label font size as a fraction of the entity side, per shape (keeps the text inside the shape).
_FONT_FRACTION = {"circle": 0.55, "square": 0.62, "triangle": 0.46, "diamond": 0.45, "hexagon": 0.55}
# Vertical centre of the label as a fraction of the side (the triangle's incentre sits low).
_TEXT_Y = {"triangle": 0.68}
MIN_SIDE = 20
GAP = 4
# size_bucket thresholds on the entity side in the 384² global view, px.
BUCKET_NATIVE_BELOW = 8
BUCKET_GLOBAL_FROM = 14

# Palette indices: 0 background, 1 grid, 2 white text, 3 dark text, 4.. the colours, then the outline.
BACKGROUND_INDEX, GRID_INDEX = 0, 1  # every index above GRID_INDEX is painted by an entity
_PALETTE_BASE = [(246, 246, 241), (226, 226, 220), (255, 255, 255), (15, 15, 15)]
_COLOUR_INDEX = {name: 4 + i for i, name in enumerate(COLOURS)}
_OUTLINE = 4 + len(COLOURS)
_PALETTE = _PALETTE_BASE + list(COLOURS.values()) + [(70, 70, 70)]
_FLAT_PALETTE = [c for rgb in _PALETTE for c in rgb]
TEXT_RGB = {"white": _PALETTE[2], "dark": _PALETTE[3]}


def text_colour(colour: str) -> tuple[int, int, int]:
    """RGB of the label text drawn on a shape of this colour."""
    return TEXT_RGB["dark" if colour in _DARK_TEXT else "white"]


@functools.lru_cache(maxsize=256)
def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # FreeType, pillow >= 10.1
    except TypeError:  # pragma: no cover - older pillow: fixed bitmap font
        return ImageFont.load_default()


def _rng(kind: str, split: str, seed: int, index: int) -> random.Random:
    return random.Random(f"{GENERATOR_VERSION}/{kind}/{split}/{seed}/{index}")


# ----------------------------------------------------------------------------------------------------------------
# Scenes


def _log_uniform(rng: random.Random, lo: float, hi: float) -> int:
    return int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))


def make_scene(rng: random.Random, kind: str = "grid") -> dict:
    """Draw an image size and non-overlapping entities: {"size": [W, H], "entities": [{colour, shape, label,
    box, size}, ...]} (largest first)."""
    if kind in ("grid", "sparse"):  # the same image and entity sizes; sparse has fewer entities
        w, h = rng.randrange(768, 1537, 16), rng.randrange(768, 1537, 16)
        n = rng.randint(12, 24) if kind == "grid" else rng.randint(4, 8)
        lo, hi = MIN_SIDE, max(MIN_SIDE * 2, 0.09 * max(w, h))
    elif kind == "medium":
        w, h = rng.randrange(384, 769, 16), rng.randrange(384, 769, 16)
        n = rng.randint(3, 6)
        lo, hi = 0.07 * min(w, h), 0.15 * min(w, h)
    elif kind == "single":
        w, h = rng.randrange(384, 769, 16), rng.randrange(384, 769, 16)
        n = rng.randint(1, 3)
        lo, hi = 0.15 * min(w, h), 0.35 * min(w, h)
    elif kind == "solo":
        w, h = rng.randrange(384, 769, 16), rng.randrange(384, 769, 16)
        n = 1
        lo, hi = 0.4 * min(w, h), 0.8 * min(w, h)
    else:
        raise ValueError(f"unknown kind {kind!r}; choose from {', '.join(KINDS)}")
    pairs = rng.sample([(c, s) for c in COLOURS for s in SHAPES], n)
    labels = rng.sample(LABELS, n)
    sides = sorted((_log_uniform(rng, lo, hi) for _ in range(n)), reverse=True)
    placed: list[dict] = []
    for (colour, shape), label, side in zip(pairs, labels, sides):
        for _ in range(60):
            x0, y0 = rng.randint(GAP, w - side - GAP), rng.randint(GAP, h - side - GAP)
            box = [x0, y0, x0 + side, y0 + side]
            if all(box[0] >= o[2] + GAP or box[2] + GAP <= o[0] or box[1] >= o[3] + GAP or box[3] + GAP <= o[1]
                   for o in (e["box"] for e in placed)):
                placed.append({"colour": colour, "shape": shape, "label": label, "box": box, "size": side})
                break
        # an entity that finds no free spot in 60 tries is dropped (rare: entities cover < 10% of the image)
    return {"size": [w, h], "entities": placed}


def render_scene(scene: dict) -> Image.Image:
    """The scene as a palette ("P") image: background grid, then each shape with its label."""
    w, h = scene["size"]
    image = Image.new("P", (w, h), BACKGROUND_INDEX)
    image.putpalette(_FLAT_PALETTE)
    draw = ImageDraw.Draw(image)
    step = 64
    for x in range(step, w, step):
        draw.line([(x, 0), (x, h - 1)], fill=GRID_INDEX)
    for y in range(step, h, step):
        draw.line([(0, y), (w - 1, y)], fill=GRID_INDEX)
    for e in scene["entities"]:
        x0, y0, x1, y1 = e["box"]
        s = e["size"]
        # PIL boxes are inclusive: draw within [x0, x1 - 1] so the recorded exclusive box is exact.
        bx = (x0, y0, x1 - 1, y1 - 1)
        fill = _COLOUR_INDEX[e["colour"]]
        cx, cy = (x0 + x1 - 1) / 2, (y0 + y1 - 1) / 2
        if e["shape"] == "circle":
            draw.ellipse(bx, fill=fill, outline=_OUTLINE)
        elif e["shape"] == "square":
            draw.rectangle(bx, fill=fill, outline=_OUTLINE)
        elif e["shape"] == "triangle":
            draw.polygon([(cx, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=fill, outline=_OUTLINE)
        elif e["shape"] == "diamond":
            draw.polygon([(cx, y0), (x1 - 1, cy), (cx, y1 - 1), (x0, cy)], fill=fill, outline=_OUTLINE)
        else:  # hexagon, flat top/bottom edges touching the box's sides
            r = (s - 1) / 2
            draw.polygon([(cx + r * math.cos(math.pi / 3 * k), cy + r * math.sin(math.pi / 3 * k)) for k in range(6)],
                         fill=fill, outline=_OUTLINE)
        font = _font(max(6, int(round(_FONT_FRACTION[e["shape"]] * s))))
        ty = y0 + _TEXT_Y.get(e["shape"], 0.5) * (s - 1)
        draw.text((cx, ty), e["label"], font=font, anchor="mm", fill=3 if e["colour"] in _DARK_TEXT else 2)
    return image


# ----------------------------------------------------------------------------------------------------------------
# Questions


def _name(e: dict) -> str:
    return f"{e['colour']} {e['shape']}"


def _geometry(e: dict, w: int, h: int) -> dict:
    x0, y0, x1, y1 = e["box"]
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    dist = math.hypot((cx - w / 2) / (w / 2), (cy - h / 2) / (h / 2)) / math.sqrt(2)
    return {"box": list(e["box"]), "size_px": e["size"], "center_dist": round(dist, 4)}


def _size_fields(size_px: int | None, w: int, h: int) -> dict:
    if size_px is None:
        return {"size_px": None, "size_global_px": None, "size_bucket": None}
    g = size_px * SIGLIP_IMAGE_SIZE / max(w, h)
    bucket = "native" if g < BUCKET_NATIVE_BELOW else "mid" if g < BUCKET_GLOBAL_FROM else "global"
    return {"size_px": size_px, "size_global_px": round(g, 2), "size_bucket": bucket}


def _separated(a: dict, b: dict, axis: str) -> bool:
    i0, i1 = (0, 2) if axis == "x" else (1, 3)
    return a["box"][i1] <= b["box"][i0] or b["box"][i1] <= a["box"][i0]


def _target_meta(e: dict, w: int, h: int) -> dict:
    """Item meta of a question about one entity: the entity, its box, distance from the centre and size fields."""
    geo = _geometry(e, w, h)
    return {"target": dict(e), "box": geo["box"], "center_dist": geo["center_dist"], **_size_fields(e["size"], w, h)}


def _question(qtype: str, scene: dict, rng: random.Random, balanced_counts: bool = False
              ) -> tuple[str, str, dict] | None:
    """(question, answer, meta) of one type, or None when the scene cannot support that type. With
    `balanced_counts`, a count question names a colour or shape present in the image half of the time (drawn
    uniformly, few-entity images would get "0" most of the time: 7/8 of colour counts on a one-entity image)."""
    w, h = scene["size"]
    ents = scene["entities"]
    if not ents:
        return None
    if qtype == "shape_of_colour":
        # the colour is seen at any resolution, the shape of a small entity only at native resolution
        by_colour = Counter(e["colour"] for e in ents)
        unique = [e for e in ents if by_colour[e["colour"]] == 1]
        if not unique:
            return None
        e = rng.choice(unique)
        return f"What shape is {e['colour']}?", e["shape"], _target_meta(e, w, h)
    if qtype in ("label", "colour", "shape"):
        e = rng.choice(ents)
        if qtype == "label":
            q, a = f"What is the label on the {_name(e)}?", e["label"]
        elif qtype == "colour":
            q, a = f"What colour is the shape labelled {e['label']}?", e["colour"]
        else:
            q, a = f"What shape is labelled {e['label']}?", e["shape"]
        return q, a, _target_meta(e, w, h)
    if qtype == "count":
        present = balanced_counts and rng.random() < 0.5
        if rng.random() < 0.5:
            shape = rng.choice(sorted({e["shape"] for e in ents}) if present else SHAPES)
            counted = [e for e in ents if e["shape"] == shape]
            q, of = f"How many {PLURAL[shape]} are there?", {"shape": shape}
        else:
            colour = rng.choice(sorted({e["colour"] for e in ents}) if present else list(COLOURS))
            counted = [e for e in ents if e["colour"] == colour]
            q, of = f"How many {colour} shapes are there?", {"colour": colour}
        smallest = min((e["size"] for e in counted), default=None)
        return q, str(len(counted)), {"target": None, "box": None, "center_dist": None, "count_of": of,
                                      "boxes": [list(e["box"]) for e in counted], **_size_fields(smallest, w, h)}
    # position
    axes = ["x", "y"]
    rng.shuffle(axes)
    for axis in axes:
        pairs = [(a, b) for a in ents for b in ents if a is not b and _separated(a, b, axis)]
        if not pairs:
            continue
        a, b = rng.choice(pairs)
        i = 0 if axis == "x" else 1
        before = (a["box"][i] + a["box"][i + 2]) < (b["box"][i] + b["box"][i + 2])
        if axis == "x":
            q, ans = f"Is the {_name(a)} left or right of the {_name(b)}?", "left" if before else "right"
        else:
            q, ans = f"Is the {_name(a)} above or below the {_name(b)}?", "above" if before else "below"
        small = a if a["size"] <= b["size"] else b
        geo = _geometry(small, w, h)
        return q, ans, {"target": dict(a), "reference": dict(b), "axis": axis, "box": list(a["box"]),
                        "center_dist": geo["center_dist"], **_size_fields(small["size"], w, h)}
    return None


def check_qtypes(qtypes: tuple[str, ...]) -> None:
    """Raise ValueError unless `qtypes` is a non-empty list of known question types."""
    unknown = set(qtypes) - set(ALL_QTYPES)
    if unknown or not qtypes:
        raise ValueError(f"question types {sorted(unknown) or '(none)'}: choose from {', '.join(ALL_QTYPES)}")


def make_questions(scene: dict, rng: random.Random, k: int = 4, qtypes: tuple[str, ...] = QTYPES,
                   balanced_counts: bool = False, distinct: bool = False) -> list[tuple[str, str, dict]]:
    """Up to `k` questions of distinct types from `qtypes` in random order (types the scene cannot support are
    skipped; if k exceeds the number of types, types repeat). The defaults make the evaluation splits; `qtypes`,
    `balanced_counts` (see `_question`) and `distinct` are training-curriculum knobs. `distinct` redraws a
    question already asked of this image: a training record holds all of an image's questions as turns, and
    under complementary masking a repeated question's answer sits unmasked in the other turn (41 % of the
    count-only grid records repeat one otherwise)."""
    check_qtypes(qtypes)
    order = list(qtypes)
    rng.shuffle(order)
    out = []
    for j in range(max(k, 0) * 3):
        if len(out) == k:
            break
        qtype = order[j % len(order)]
        made = _question(qtype, scene, rng, balanced_counts)
        if made is not None and not (distinct and any(made[0] == q for q, _, _ in out)):
            q, a, meta = made
            out.append((q, a, {"qtype": qtype, **meta}))
    return out


def make_sample(split: str, index: int, seed: int = 0, kind: str = "grid", questions_per_image: int = 4,
                qtypes: tuple[str, ...] = QTYPES, balanced_counts: bool = False, distinct: bool = False):
    """Image `index` of a split, in memory: (PIL palette image, scene dict, [(question, answer, meta), ...]).
    The image depends only on (kind, split, seed, index); `qtypes` / `balanced_counts` change its questions."""
    scene, questions = make_scene_questions(split, index, seed, kind, questions_per_image, qtypes, balanced_counts,
                                            distinct)
    return render_scene(scene), scene, questions


def make_scene_questions(split: str, index: int, seed: int = 0, kind: str = "grid", questions_per_image: int = 4,
                         qtypes: tuple[str, ...] = QTYPES, balanced_counts: bool = False, distinct: bool = False):
    """`make_sample` without drawing the image: (scene dict, [(question, answer, meta), ...])."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    rng = _rng(kind, split, seed, index)
    scene = make_scene(rng, kind)
    questions = make_questions(scene, rng, questions_per_image, qtypes, balanced_counts, distinct)
    w, h = scene["size"]
    for _, _, meta in questions:
        meta.update(kind=kind, image_size=[w, h], n_entities=len(scene["entities"]))
    return scene, questions


# ----------------------------------------------------------------------------------------------------------------
# Writing a split


def to_llava_records(items: list[dict]) -> list[dict]:
    """Plain items -> LLaVA training records, one per image, its questions as the turns of one conversation
    (the trainer's `llada` preprocessing draws one turn per sample, so every epoch asks each image a fresh
    question). Questions carry the evaluation harness's EntityGrid prompt suffix, so training and evaluation
    prompts are the same text."""
    from llava.eval.datasets import DATASET_SPECS

    spec = DATASET_SPECS["entitygrid"]
    by_image: dict[str, list[dict]] = {}
    for it in items:
        by_image.setdefault(it["image"], []).append(it)
    records = []
    for image, its in by_image.items():
        turns = []
        for k, it in enumerate(its):
            question = spec.prompt(it["question"])
            turns.append({"from": "human", "value": f"{DEFAULT_IMAGE_TOKEN}\n{question}" if k == 0 else question})
            turns.append({"from": "gpt", "value": it["answers"][0]})
        records.append({"id": image.rsplit("/", 1)[-1].rsplit(".", 1)[0], "image": image, "conversations": turns})
    return records


def generate(out: str | Path, split: str, n: int, seed: int = 0, seed_offset: int = 0, kind: str = "grid",
             questions_per_image: int = 4, llava: bool = False, qtypes: tuple[str, ...] = QTYPES,
             balanced_counts: bool = False, distinct: bool = False) -> dict:
    """Write n images (indices seed_offset .. seed_offset+n-1) and their items under `out`; return stats
    {"images", "items", "seconds", "images_per_s", "items_per_s", "json"}. With `llava`, also
    `<split>_llava.json`: the same items as LLaVA training records (`to_llava_records`)."""
    if n < 0 or seed_offset < 0:
        raise ValueError("n and seed_offset must be non-negative")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    items, scenes = [], {}
    start = time.perf_counter()
    for index in range(seed_offset, seed_offset + n):
        image, scene, questions = make_sample(split, index, seed, kind, questions_per_image, qtypes, balanced_counts,
                                              distinct)
        stem = f"{split}-{kind}-s{seed}-{index:06d}"
        rel = f"images/{stem}.png"
        image.save(out / rel)
        scenes[rel] = scene
        for j, (q, a, meta) in enumerate(questions):
            items.append({"id": f"{stem}-q{j}", "image": rel, "question": q, "answers": [a], "meta": meta})
    seconds = time.perf_counter() - start
    json_path = out / f"{split}.json"
    json_path.write_text(json.dumps(items), encoding="utf-8")
    if llava:
        (out / f"{split}_llava.json").write_text(json.dumps(to_llava_records(items)), encoding="utf-8")
    (out / f"{split}_scenes.json").write_text(json.dumps(scenes), encoding="utf-8")
    return {"images": n, "items": len(items), "seconds": round(seconds, 3),
            "images_per_s": round(n / seconds, 1) if seconds > 0 else None,
            "items_per_s": round(len(items) / seconds, 1) if seconds > 0 else None, "json": str(json_path)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m llava.eval.entitygrid", description=__doc__.split("\n\n")[0])
    p.add_argument("--split", choices=SPLITS, required=True)
    p.add_argument("--n", type=int, required=True, help="number of images (each gets --questions-per-image items)")
    p.add_argument("--out", required=True, help="output folder (<out>/<split>.json, <out>/images/)")
    p.add_argument("--seed", type=int, default=0, help="base seed; change it for a fresh set (default 0)")
    p.add_argument("--seed-offset", type=int, default=0, help="index of the first image (to generate in chunks)")
    p.add_argument("--kind", choices=KINDS, default="grid",
                   help="grid: 12-24 small entities; sparse: 4-8 of them; single: 1-3 large; solo: one very large")
    p.add_argument("--questions-per-image", type=int, default=4)
    p.add_argument("--llava", action="store_true", help="also write <split>_llava.json (LLaVA training records)")
    p.add_argument("--qtypes", default=",".join(QTYPES),
                   help=f"comma-separated question types to ask (training curricula; default the evaluation set's "
                        f"{','.join(QTYPES)}; known: {','.join(ALL_QTYPES)})")
    p.add_argument("--balanced-counts", action="store_true",
                   help="count questions name a colour/shape present in the image half of the time (training "
                        "curricula: on few-entity images most counts are otherwise 0)")
    p.add_argument("--distinct-questions", action="store_true",
                   help="never ask one image the same question twice (training records hold every question of an "
                        "image as turns: a repeat's answer is visible in the other turn)")
    args = p.parse_args(argv)
    if args.n < 0 or args.seed_offset < 0 or args.questions_per_image < 1:
        p.error("--n and --seed-offset must be >= 0 and --questions-per-image >= 1")
    qtypes = tuple(t for t in args.qtypes.split(",") if t)
    try:
        check_qtypes(qtypes)
    except ValueError as e:
        p.error(f"--qtypes {args.qtypes!r}: {e}")
    stats = generate(args.out, args.split, args.n, args.seed, args.seed_offset, args.kind, args.questions_per_image,
                     args.llava, qtypes, args.balanced_counts, args.distinct_questions)
    print(f"wrote {stats['items']} items on {stats['images']} images to {stats['json']} in {stats['seconds']} s "
          f"({stats['images_per_s']} images/s, {stats['items_per_s']} items/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
