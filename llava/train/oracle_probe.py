"""Can this LM learn EntityGrid's questions when its visual tokens are perfect? An LM-only capacity check.

    python -m llava.train.oracle_probe --kind single --qtypes count,position --steps 1500 \
        [--config_overrides '{"d_model": 64, "n_layers": 3, ...}'] [--lr 1e-3] [--batch 16] [--out probe.json] \
        [--warmup_steps 30 --min_lr_rate 0.1]
    python -m llava.train.oracle_probe --curriculum solo:colour,shape:300 solo:count:600 single:count,position:1500

Why: the trained built-in model answers grid questions at the constant-answer prior, and stage-3 probes showed
that even on 1-3-entity images its LM matched colour words against the image but not shape words, and never
compared two positions. That is either the tokens (what stage 0's tower and the projector hand the LM) or the LM
(its width, depth, steps, learning rate). This check removes the first: SigLIP and the projector are replaced by
an ORACLE that hands the LM a GRID x GRID token map of the image (the longer side split into GRID cells, as the
padded single view pooled to 14x14 is) in which every token is a learned embedding of exactly what covers its
cell centre (the entity's colour and shape, or background), whether an entity's box centre lies in the cell, and
the cell's row and column (`--paint centre` also paints every entity onto its centre cell, so entities
smaller than a cell are not lost; `--paint density` adds to what covers each cell its share of every entity's
box area, in that entity's colour and shape, so that part of the map summed over cells is every count at any
entity size: the oracle of stage 0's density heads, asking whether this LM can sum). Everything the LM sees
after that is the real pipeline: the chat template and tokenizer in the inference layout, the LLaDA LM at the
given dims and init, and LaViDa's complementary-masking loss (`llava.train.objective.diffusion_loss`). If the LM
cannot learn a question type from these tokens in a given budget, no tower will get it there; if it can, the tower
is what to fix.

Data: `--n_images` scenes of `--kind` from the generator's train split (seeded, a fixed pool as the real stages
use; questions drawn per sample with balanced counts), evaluated on `--n_eval` val-split questions (the same
mix) every `--eval_every` steps. Accuracy is read at the first answer slot of prompt + 4 mask tokens (one
forward, argmax over the vocabulary; every EntityGrid answer is one token of the built-in tokenizer), next to
the share of each type's most frequent answer on the same items (what a model that does not look scores).
`--curriculum` runs stages in order as `make train-tiny` does (each its own data, a fresh optimizer, its own lr
schedule), evaluated throughout on the last stage's kind and question types: whether an LM that first learned to
name what it sees gets past the matching plateau sooner than one asked the final questions from the start.
The probe saves no weights; `--out` gets the accuracy curve as JSON.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

from llava.constants import IGNORE_INDEX
from llava.eval import entitygrid as eg
from llava.eval.datasets import DATASET_SPECS
from llava.model.builder import build_small_model
from llava.train.data import DataCollatorForSupervisedDataset, preprocess_llada
from llava.train.objective import build_inputs_embeds, diffusion_loss
from llava.train.train import lr_factor

ANSWER_SLOTS = 4  # the decoding length `make results` and the demo use


class OracleTokens(nn.Module):
    """Scene -> [GRID*GRID, D] tokens saying, per cell, what covers its centre and where the cell is."""

    POSITION_CODES = ("learned", "linear")
    PAINTS = ("cover", "centre", "density")

    def __init__(self, dim: int, grid: int = 14, position_code: str = "learned", paint: str = "cover"):
        """`position_code`: "learned" gives every row and column its own embedding (unordered: which of two
        columns lies further right must be learned per pair); "linear" adds the cell's normalised (x, y) in
        [-1, 1] times one learned direction each, the ordered code stage 0's per-token (x, y) regression asks
        of the real tower. `paint`: "cover" says what covers each cell's centre, as a pooled view sees it (an
        entity smaller than a cell may cover none: on 14x14 grid maps 58 % of grid entities do not); "centre"
        also paints every entity onto the cell holding its box centre, so no entity is lost at any map size;
        "density" adds to "cover" the cell's share of each entity's box area (in [0, 1], summing to 1 per
        entity over the map) times density embeddings of that entity's colour and shape: what a perfect
        count-density tower (stage 0's density heads next to its attribute heads) would hand the LM."""
        super().__init__()
        if position_code not in self.POSITION_CODES:
            raise ValueError(f"position code {position_code!r} is not one of {self.POSITION_CODES}")
        if paint not in self.PAINTS:
            raise ValueError(f"paint {paint!r} is not one of {self.PAINTS}")
        self.grid, self.position_code, self.paint = grid, position_code, paint
        if position_code == "linear":  # only then: the learned code's runs keep their seeded init
            self.row_dir = nn.Parameter(torch.randn(dim) * dim ** -0.5)
            self.col_dir = nn.Parameter(torch.randn(dim) * dim ** -0.5)
        self.colour = nn.Embedding(len(eg.COLOURS) + 1, dim)  # last row: background
        self.shape = nn.Embedding(len(eg.SHAPES) + 1, dim)
        self.centre = nn.Embedding(2, dim)
        self.row = nn.Embedding(grid, dim)
        self.col = nn.Embedding(grid, dim)
        tables = [self.colour, self.shape, self.centre, self.row, self.col]
        if paint == "density":  # only then, and last: the other paints' runs keep their seeded init
            self.colour_density = nn.Embedding(len(eg.COLOURS), dim)
            self.shape_density = nn.Embedding(len(eg.SHAPES), dim)
            tables += [self.colour_density, self.shape_density]
        for emb in tables:
            nn.init.normal_(emb.weight, 0.0, dim ** -0.5)  # the scale of the LM's fan_in-initialised embeddings

    def cell_ids(self, scene: dict) -> dict[str, torch.Tensor]:
        """Per-cell integer ids (raster order) -- the oracle's reading of the scene, without any pixels."""
        side = max(scene["size"]) / self.grid
        centres = (torch.arange(self.grid) + 0.5) * side
        cy, cx = torch.meshgrid(centres, centres, indexing="ij")
        colour = torch.full((self.grid, self.grid), len(eg.COLOURS))
        shape = torch.full((self.grid, self.grid), len(eg.SHAPES))
        centre = torch.zeros(self.grid, self.grid, dtype=torch.long)
        colours, shapes = list(eg.COLOURS), list(eg.SHAPES)
        centre_cells = []  # (row, col, colour id, shape id) of each entity's box centre
        for e in scene["entities"]:
            x0, y0, x1, y1 = e["box"]
            ids = colours.index(e["colour"]), shapes.index(e["shape"])
            inside = (cx >= x0) & (cx < x1) & (cy >= y0) & (cy < y1)
            colour[inside], shape[inside] = ids
            r, c = min(int((y0 + y1) / 2 / side), self.grid - 1), min(int((x0 + x1) / 2 / side), self.grid - 1)
            centre[r, c] = 1
            centre_cells.append((r, c, *ids))
        if self.paint == "centre":  # after all coverage, so a neighbour's box cannot paint over a centre cell
            for r, c, colour_id, shape_id in centre_cells:
                colour[r, c], shape[r, c] = colour_id, shape_id
        rows, cols = torch.meshgrid(torch.arange(self.grid), torch.arange(self.grid), indexing="ij")
        ids = {k: v.flatten() for k, v in
               {"colour": colour, "shape": shape, "centre": centre, "row": rows, "col": cols}.items()}
        if self.paint == "density":
            ids.update(self.cell_mass(scene))
        return ids

    def cell_mass(self, scene: dict) -> dict[str, torch.Tensor]:
        """{"colour_mass": [cells, colours], "shape_mass": [cells, shapes]}: each entity's box area split over the
        cells it overlaps, as fractions of the box (a map summed over cells is every colour's and shape's count)."""
        side = max(scene["size"]) / self.grid
        edges = torch.arange(self.grid + 1, dtype=torch.float64) * side
        colour_mass = torch.zeros(self.grid * self.grid, len(eg.COLOURS))
        shape_mass = torch.zeros(self.grid * self.grid, len(eg.SHAPES))
        colours, shapes = list(eg.COLOURS), list(eg.SHAPES)
        for e in scene["entities"]:
            x0, y0, x1, y1 = e["box"]
            # overlap of [x0, x1) with each cell's [edge_i, edge_i+1), per axis; the outer product is the area
            ox = (torch.clamp(edges[1:], max=x1) - torch.clamp(edges[:-1], min=x0)).clamp(min=0)
            oy = (torch.clamp(edges[1:], max=y1) - torch.clamp(edges[:-1], min=y0)).clamp(min=0)
            share = ((oy[:, None] * ox[None, :]).flatten() / ((x1 - x0) * (y1 - y0))).float()
            colour_mass[:, colours.index(e["colour"])] += share
            shape_mass[:, shapes.index(e["shape"])] += share
        return {"colour_mass": colour_mass, "shape_mass": shape_mass}

    def forward(self, scene: dict) -> torch.Tensor:
        ids = self.cell_ids(scene)
        what = self.colour(ids["colour"]) + self.shape(ids["shape"]) + self.centre(ids["centre"])
        if self.paint == "density":
            what = (what + ids["colour_mass"] @ self.colour_density.weight
                    + ids["shape_mass"] @ self.shape_density.weight)
        if self.position_code == "learned":
            return what + self.row(ids["row"]) + self.col(ids["col"])
        to_unit = 2.0 / max(self.grid - 1, 1)
        return (what + (ids["row"].float() * to_unit - 1)[:, None] * self.row_dir
                + (ids["col"].float() * to_unit - 1)[:, None] * self.col_dir)


class OracleModel(nn.Module):
    """The LaViDa model's LM under an oracle encoder: exposes exactly what `diffusion_loss` uses."""

    def __init__(self, lavida, grid: int, position_code: str = "learned", paint: str = "cover"):
        super().__init__()
        self.lavida = lavida
        self.oracle = OracleTokens(lavida.config.llada.d_model, grid, position_code, paint)
        self.model, self.config, self.mm_config = lavida.model, lavida.config, lavida.mm_config

    def encode_image(self, scene, prune_method=None, question_ids=None, options=None):
        return SimpleNamespace(tokens=self.oracle(scene))

    def parameters_to_train(self) -> list[nn.Parameter]:
        """The LM and the oracle's embeddings (the unused tower and projector get no gradient anyway)."""
        return list(self.model.transformer.parameters()) + list(self.oracle.parameters())


def draw_items(kind: str, split: str, n_images: int, qtypes: tuple[str, ...], seed: int,
               per_image: int = 4) -> list[tuple[dict, str, str, str, str]]:
    """(scene, question prompt, answer, qtype, form) for `per_image` questions on each of `n_images` scenes
    (balanced counts), no image rendered. `form` splits a type by what its answer needs: a count of a colour or
    of a shape, a position on the x or the y axis (one word per axis is the position prior)."""
    prompt = DATASET_SPECS["entitygrid"].prompt
    out = []
    for i in range(n_images):
        scene, questions = eg.make_scene_questions(split, i, seed, kind, per_image, qtypes, balanced_counts=True)
        for q, a, meta in questions:
            out.append((scene, prompt(q), a, meta["qtype"], question_form(meta)))
    return out


def question_form(meta: dict) -> str:
    if meta["qtype"] == "count":
        return "count of " + next(iter(meta["count_of"]))
    if meta["qtype"] == "position":
        return f"position {meta['axis']}"
    return meta["qtype"]


def tokenize(item, tokenizer, index: int) -> dict:
    scene, question, answer = item[:3]
    conv = [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    out = preprocess_llada(conv, tokenizer, True, np.random.default_rng(0), inference_prompt=True)
    out.update(image=scene, index=index, epoch=0)
    return out


@torch.no_grad()
def evaluate(model: OracleModel, tokenizer, items: list, batch: int = 32) -> dict:
    """{"overall", "by_type", "by_form"}: accuracy at the first answer slot (every EntityGrid answer is one token
    of the built-in tokenizer) per question type and per form, next to the same items' majority-answer share;
    "overall" sets the accuracy against both priors: answering each type's, or each form's, majority. The form
    prior is the one to beat -- the question's words alone tell a colour count from a shape count."""
    model.eval()
    mask_id = model.config.llada.mask_token_id
    right = [False] * len(items)
    by_length: dict[int, list[int]] = {}  # rows of one prompt length run together, so no row needs padding
    encoded = [tokenize(it, tokenizer, 0) for it in items]
    for i, it in enumerate(encoded):
        by_length.setdefault(int(it["labels"].eq(IGNORE_INDEX).sum()), []).append(i)
    for length, rows in by_length.items():
        for s in range(0, len(rows), batch):
            chunk = rows[s: s + batch]
            input_ids = torch.stack([torch.cat([encoded[i]["input_ids"][:length], torch.full((ANSWER_SLOTS,), mask_id)])
                                     for i in chunk])
            visual = [model.oracle(items[i][0]) for i in chunk]
            embeds, _, _ = build_inputs_embeds(model, input_ids, visual)
            logits = model.model(inputs_embeds=embeds)
            at = length + visual[0].shape[0] - 1  # the first answer slot, after the placeholder became the tokens
            for i, row in zip(chunk, logits):
                right[i] = int(row[at].argmax()) == int(encoded[i]["labels"][length])
    model.train()
    out = {"overall": {"accuracy": round(100 * sum(right) / len(items), 1), "n": len(items)}}
    for name, key in (("by_type", 3), ("by_form", 4)):
        out[name], majority_items = {}, 0
        for group in sorted({it[key] for it in items}):
            rows = [i for i, it in enumerate(items) if it[key] == group]
            majority = Counter(items[i][2] for i in rows).most_common(1)[0][1]
            majority_items += majority
            out[name][group] = {"accuracy": round(100 * sum(right[i] for i in rows) / len(rows), 1),
                                "majority": round(100 * majority / len(rows), 1), "n": len(rows)}
        out["overall"][f"prior_{name.removeprefix('by_')}"] = round(100 * majority_items / len(items), 1)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m llava.train.oracle_probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--kind", default="single", choices=eg.KINDS)
    p.add_argument("--qtypes", default="count,position", help="comma-separated EntityGrid question types")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--curriculum", nargs="+", default=None, metavar="KIND:QTYPES:STEPS",
                   help="stages run in order, each with its own data, optimizer and lr schedule (as train-tiny's); "
                        "replaces --kind/--qtypes/--steps, and the evaluation uses the last stage's kind and types")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup_steps", type=int, default=0)
    p.add_argument("--min_lr_rate", type=float, default=1.0,
                   help="cosine decay to lr x this after warm-up, as the trainer's; 1.0 (default): constant lr")
    p.add_argument("--grid", type=int, default=14, help="token map side (14: the pooled single view)")
    p.add_argument("--position_code", default="learned", choices=OracleTokens.POSITION_CODES,
                   help="learned: one embedding per row and column; linear: normalised (x, y) times a learned "
                        "direction each (ordered, like stage 0's regressed positions)")
    p.add_argument("--paint", default="cover", choices=OracleTokens.PAINTS,
                   help="cover: each cell says what covers its centre; centre: every entity is also painted onto "
                        "the cell of its box centre (none lost, however small); density: cover plus each cell's "
                        "share of every entity's box area in that entity's colour and shape (summed: the counts)")
    p.add_argument("--n_images", type=int, default=3000)
    p.add_argument("--n_eval", type=int, default=240)
    p.add_argument("--eval_every", type=int, default=250)
    p.add_argument("--config_overrides", default='{"d_model": 64, "n_layers": 3, "n_heads": 4, "n_kv_heads": 4, '
                   '"mlp_hidden_size": 172, "init_fn": "fan_in"}', help="JSON config keys of the LM (train-tiny's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the accuracy curve here as JSON")
    return p


def parse_stage(spec: str) -> tuple[str, tuple[str, ...], int]:
    """`KIND:QTYPES:STEPS` (e.g. `solo:colour,shape:300`) -> (kind, qtypes, steps); ValueError says what is wrong."""
    parts = spec.split(":")
    if len(parts) != 3 or parts[0] not in eg.KINDS or not parts[2].isdigit() or int(parts[2]) < 1:
        raise ValueError(f"--curriculum stage {spec!r} is not KIND:QTYPES:STEPS (KIND one of {', '.join(eg.KINDS)}, "
                         "STEPS a positive integer)")
    qtypes = tuple(q.strip() for q in parts[1].split(",") if q.strip())
    eg.check_qtypes(qtypes)
    return parts[0], qtypes, int(parts[2])


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.steps < 1 or args.batch < 1 or args.grid < 1:
        print("error: --steps, --batch and --grid must be positive", file=sys.stderr)
        return 2
    try:
        stages = [parse_stage(s) for s in (args.curriculum or [f"{args.kind}:{args.qtypes}:{args.steps}"])]
        overrides = json.loads(args.config_overrides)
    except (ValueError, json.JSONDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.warmup_steps < 0 or not 0.0 <= args.min_lr_rate <= 1.0:
        print("error: --warmup_steps must be >= 0 and --min_lr_rate in [0, 1]", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    tokenizer, lavida = build_small_model(args.seed, overrides)
    model = OracleModel(lavida, args.grid, args.position_code, args.paint).train()
    final_kind, final_qtypes, _ = stages[-1]
    eval_items = draw_items(final_kind, "val", max(1, args.n_eval // 4), final_qtypes, args.seed)[: args.n_eval]
    collate = DataCollatorForSupervisedDataset(tokenizer.pad_token_id, seed=args.seed, extra_pad_range=(-16, 16))
    gen = torch.Generator().manual_seed(args.seed)
    order = random.Random(args.seed)
    curve, start, step = [], time.time(), 0
    for kind, qtypes, steps in stages:
        # each stage as train-tiny runs it: its own training set, a fresh optimizer and its own lr schedule
        train_items = draw_items(kind, "train", args.n_images, qtypes, args.seed)
        opt = torch.optim.AdamW(model.parameters_to_train(), lr=args.lr, weight_decay=1e-4)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s, steps=steps: lr_factor(s, args.warmup_steps, steps, args.min_lr_rate))
        for stage_step in range(1, steps + 1):
            step += 1
            picks = order.sample(range(len(train_items)), min(args.batch, len(train_items)))
            batch = collate([tokenize(train_items[i], tokenizer, i) for i in picks])
            loss, _ = diffusion_loss(model, batch, generator=gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters_to_train(), 1.0)
            opt.step()
            schedule.step()
            if step % args.eval_every == 0 or stage_step == steps:
                point = {"step": step, "stage": f"{kind}:{','.join(qtypes)}", "loss": round(loss.item(), 4),
                         "lr": round(schedule.get_last_lr()[0], 7), "seconds": round(time.time() - start, 1),
                         **evaluate(model, tokenizer, eval_items)}
                curve.append(point)
                print(json.dumps(point), flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"args": vars(args), "curve": curve}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
