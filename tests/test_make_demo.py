"""`make demo`'s item (Makefile IMAGE / QUESTION / ANSWER) is the generator's, and the rule the Makefile states
for picking it holds: the first seed-0 test item of a count or position question whose targets all lie inside
SHIRG's centre fovea and whose smallest target is under 8 px in the 384² global view."""
import re
from pathlib import Path

import numpy as np
from PIL import Image

from llava.eval import entitygrid as eg
from shirg_patches.foveal import fovea_box

ROOT = Path(__file__).resolve().parents[1]
TEST_IMAGES = 75  # the seed-0 test split `make results` writes


def make_var(name: str) -> str:
    return re.search(rf"^{name} \?= (.+)$", (ROOT / "Makefile").read_text(), re.M).group(1).strip()


def in_fovea(box, size) -> bool:
    x0, y0, x1, y1 = fovea_box(tuple(size))  # SHIRG's centre fovea, in original pixels
    return box[0] >= x0 and box[1] >= y0 and box[2] <= x1 and box[3] <= y1


def boxes(meta) -> list:
    if meta["qtype"] == "count":
        return meta["boxes"]
    return [meta["box"], meta["reference"]["box"]]


def first_item_by_the_rule():
    for i in range(TEST_IMAGES):
        image, _, questions = eg.make_sample("test", i, 0, "grid")
        for question, answer, meta in questions:
            if (meta["qtype"] in ("count", "position") and boxes(meta)
                    and all(in_fovea(b, meta["image_size"]) for b in boxes(meta))
                    and meta["size_bucket"] == "native"):
                return image, question, answer


def test_the_demo_item_is_the_first_by_the_stated_rule_and_the_bundled_image_is_its_image():
    image, question, answer = first_item_by_the_rule()
    assert (question, answer) == (make_var("QUESTION"), make_var("ANSWER"))
    bundled = Image.open(ROOT / make_var("IMAGE")).convert("RGB")
    assert np.array_equal(np.asarray(bundled), np.asarray(image.convert("RGB")))
