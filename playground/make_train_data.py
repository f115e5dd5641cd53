"""Regenerate the bundled CPU training set (deterministic): `python playground/make_train_data.py`.

16 EntityGrid-QA images of the "single" kind (384..768 px, 1-3 large labelled shapes; `llava/eval/entitygrid.py`,
split "train", seed 0) with 2 questions each, written as 32 LLaVA-format records (one question per record, the
`<image>` placeholder first) to `playground/data/train.json`, images under `playground/data/images/` as palette
PNGs (a few KB each). `train.yaml` lists the same file the way a data mix would. The set is for the CPU smoke
run and the tests: small enough to keep in the repository, real enough that the answers depend on the image.
"""
import json
from pathlib import Path

from llava.eval.entitygrid import make_sample

OUT = Path(__file__).resolve().parent / "data"
N_IMAGES, QUESTIONS = 16, 2


def main() -> None:
    (OUT / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(N_IMAGES):
        image, _, questions = make_sample("train", i, seed=0, kind="single", questions_per_image=QUESTIONS)
        rel = f"images/entitygrid-single-{i:03d}.png"
        image.save(OUT / rel, optimize=True)
        for j, (question, answer, meta) in enumerate(questions):
            records.append({
                "id": f"entitygrid-single-{i:03d}-q{j}",
                "image": rel,
                "conversations": [
                    {"from": "human",
                     "value": f"<image>\n{question}\nAnswer the question using a single word or phrase."},
                    {"from": "gpt", "value": answer},
                ],
                "meta": {"qtype": meta["qtype"], "image_size": meta["image_size"]},
            })
    (OUT / "train.json").write_text(json.dumps(records, indent=1) + "\n")
    (OUT / "train.yaml").write_text(
        "# Data list in LaViDa's yaml format (llava/train/data.py); json_path is relative to this file.\n"
        "datasets:\n  - json_path: train.json\n    sampling_strategy: all\n")
    print(f"wrote {len(records)} records on {N_IMAGES} images to {OUT}")


if __name__ == "__main__":
    main()
