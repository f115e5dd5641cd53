"""Stage 0 of the built-in small model: dense supervised pretraining of its SigLIP tower on EntityGrid images.

    python -m llava.train.pretrain_vision --output_dir outputs/stage0 --max_steps 600 \
        [--model_name_or_path builtin:lavida-small] [--config_overrides JSON] [--kinds grid,single,solo]

Why this stage exists: real LaViDa starts from a SigLIP pretrained on web image-text pairs, and that pretraining
is what makes each patch feature say what is there. Nothing pretrained is reachable here. Measured on the tiny
model: a random frozen tower passes colour through (mean pixel value survives any random projection) but not
shape or label, so the LM learns colour and answer priors only; training the tower through the LM's answer loss
instead is too weak a signal (one answer token per image) and made even colour worse. Here every patch token gets
its own target -- the colour, shape and label of the entity covering it, or background -- from the scene
description the generator keeps, so one view carries 729 supervised tokens.

Views are drawn at the scales the model later sees, all as 384² inputs: the whole image resized without keeping
its aspect (LaViDa's global view) and rectangles from 384 px to the whole image (any-res tiles, SHIRG's fovea,
the small curriculum images). The same tower then feeds every method: this stage sees no question, no answer and
nothing that differs between prune methods. The heads are thrown away; the output `<output_dir>/final` is an
ordinary checkpoint folder (trained tower, projector and LM at their init) for stage 1 of `scripts/train_tiny.sh`.

Killed runs lose at most `--save_steps` steps: `<output_dir>/state.pt` (tower, heads, optimizer, step) is
replaced atomically, and every batch is a pure function of (seed, step), so a resumed run is the uninterrupted
one. The images are drawn in memory by `llava.eval.entitygrid.make_sample` (train split), none are written.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from llava.constants import SIGLIP_IMAGE_SIZE
from llava.errors import CheckpointError, ConfigError, LavidaError
from llava.eval import entitygrid as eg
from llava.mm_utils import image_to_tensor
from llava.model.builder import SMALL_MODEL_NAME, load_pretrained_model, save_pretrained
from llava.train.checkpoint import torch_load
from llava.train.train import FINAL_DIR, lr_factor, setup_logging
from llava.utils import atomic_file, logger

STATE_FILE = "state.pt"
LOG_FILE = "pretrain_log.jsonl"
# Targets per patch: index 0 is "no entity here", then the generator's vocabularies in their order.
HEAD_CLASSES = {"colour": ("none", *eg.COLOURS), "shape": ("none", *eg.SHAPES), "label": ("none", *eg.LABELS)}
GLOBAL_VIEW_P = 0.25  # share of views that are the whole image (the global view); the rest are rectangles
MAX_VIEW_ASPECT = 2.0  # rectangles' width/height within [1/2, 2]: the global view's distortion range
LABEL_BOX = 0.5  # the label's text spans about the central half of an entity's side (45-62 % font height)
IGNORE = -100  # F.cross_entropy's ignore_index: label targets on patches that cannot see the text


class PatchHeads(nn.Module):
    """The probes the tower is trained through: per attribute, a linear classifier on every patch feature, and
    for shape and label one more on the MEAN feature of each entity's patches (its text patches for the label).

    Why both: the LM binds a question to tokens, so each token should say what it shows (the patch heads); but
    a shape or a letter larger than a patch is only visible across patches, and a tiny ViT from scratch learns
    that aggregation slowly (measured: patch-only heads stay at chance for shape and label for 500 steps). The
    entity heads give every patch of an entity the gradient of recognising it as a whole, as the LM's attention
    will (it averages the values of the tokens it selects)."""

    POOLED = ("shape", "label")

    def __init__(self, hidden: int):
        super().__init__()
        # LayerNorm first: the tower's output is the unnormalised residual stream LaViDa's projector reads
        self.heads = nn.ModuleDict({k: nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, len(v)))
                                    for k, v in HEAD_CLASSES.items()})
        self.entity_heads = nn.ModuleDict({k: nn.Sequential(
            nn.LayerNorm(hidden), nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, len(HEAD_CLASSES[k])))
            for k in self.POOLED})

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: head(features) for k, head in self.heads.items()}

    def entity_logits(self, features: torch.Tensor, targets: dict[str, torch.Tensor]
                      ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{head: (logits [M, C], targets [M])}, one row per entity of every view."""
        out = {}
        for k in self.POOLED:
            where = (targets["owner"] > 0) & (targets[k] != IGNORE)
            pooled, target = pool_by_owner(features, targets["owner"], where, targets[k])
            out[k] = (self.entity_heads[k](pooled), target)
        return out


def pool_by_owner(features: torch.Tensor, owner: torch.Tensor, where: torch.Tensor, target: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of features [B, N, C] over the patches `where` of each (view, owner), and that group's target
    (the same on all its patches): ([M, C], [M]) for the M non-empty groups."""
    b, _, c = features.shape
    e = int(owner.max()) + 1
    group = (torch.arange(b)[:, None] * e + owner)[where]
    sums = features.new_zeros(b * e, c).index_add(0, group, features[where])
    counts = features.new_zeros(b * e).index_add(0, group, features.new_ones(group.shape))
    labels = torch.zeros(b * e, dtype=torch.long).scatter(0, group, target[where])
    present = counts > 0
    return sums[present] / counts[present, None], labels[present]


def draw_view(rng: random.Random, width: int, height: int) -> tuple[float, float, float, float]:
    """A rectangle (x0, y0, w, h) of the image in pixels: the whole image with probability GLOBAL_VIEW_P, else a
    rectangle whose geometric-mean side is log-uniform from min(384, shorter side) to the longer side."""
    if rng.random() < GLOBAL_VIEW_P:
        return 0.0, 0.0, float(width), float(height)
    lo, hi = min(SIGLIP_IMAGE_SIZE, width, height), max(width, height)
    side = math.exp(rng.uniform(math.log(lo), math.log(hi)))
    aspect = math.exp(rng.uniform(-math.log(MAX_VIEW_ASPECT), math.log(MAX_VIEW_ASPECT)))
    w, h = min(side * math.sqrt(aspect), width), min(side / math.sqrt(aspect), height)
    return rng.uniform(0, width - w), rng.uniform(0, height - h), w, h


def entity_ids(palette: np.ndarray, entities: list[dict]) -> np.ndarray:
    """[H, W] uint8 map of the image: 1 + the index of the entity each pixel is painted by, 0 for background
    and grid lines. The generator draws in palette mode, so "painted" is exact: any index above the grid's, inside
    the entity's box (boxes do not overlap)."""
    ids = np.zeros(palette.shape, dtype=np.uint8)
    for i, e in enumerate(entities):
        x0, y0, x1, y1 = e["box"]
        ids[y0:y1, x0:x1][palette[y0:y1, x0:x1] > eg.GRID_INDEX] = i + 1
    return ids


def patch_targets(ids: Image.Image, entities: list[dict], text_ids: Image.Image, grid: int,
                  patch: int) -> dict[str, torch.Tensor]:
    """Per-patch class indices [grid*grid] (raster order, as the tower's tokens) for each head, and "owner"
    (1 + entity index, 0 for background), from a view's entity-id map and text-region map (both already cropped
    to the view, any size).

    A patch belongs to the entity painting most of its pixels (none if it is all background), so every visible
    entity owns at least one patch however small it is in the view, and a diamond's empty box corners stay
    background. Colour and shape are asked of all of an entity's patches; the label only of its patches that
    overlap the text (the central LABEL_BOX of its side), elsewhere it is IGNORE: a patch on a big entity's rim
    cannot see the letter, and the LM reads it from the entity's tokens together anyway."""
    side = grid * patch  # the tower's tokens cover [0, grid*patch) of the resized view

    def pixels_per_patch(view: Image.Image) -> np.ndarray:  # [grid², patch²], patches in raster order
        cells = np.asarray(view.resize((side, side), Image.Resampling.NEAREST)).reshape(grid, patch, grid, patch)
        return cells.transpose(0, 2, 1, 3).reshape(grid * grid, -1)

    cells, text = pixels_per_patch(ids), pixels_per_patch(text_ids)
    n = len(entities) + 1
    flat = np.arange(grid * grid)[:, None] * n + cells  # (patch, entity) pairs -> pixel counts
    counts = np.bincount(flat.ravel(), minlength=grid * grid * n).reshape(grid * grid, n)
    counts[:, 0] = 0
    owner = np.where(counts.max(1) > 0, counts.argmax(1), 0)
    has_text = (text == owner[:, None]).any(1) & (owner > 0)
    lut = {k: np.array([0] + [HEAD_CLASSES[k].index(e[k]) for e in entities]) for k in HEAD_CLASSES}
    label = np.where(has_text, lut["label"][owner], np.where(owner > 0, IGNORE, 0))
    return {"colour": torch.from_numpy(lut["colour"][owner]), "shape": torch.from_numpy(lut["shape"][owner]),
            "label": torch.from_numpy(label), "owner": torch.from_numpy(owner)}


def text_regions(size: tuple[int, int], entities: list[dict]) -> np.ndarray:
    """[H, W] uint8 map: 1 + entity index over the central LABEL_BOX of each entity's box, 0 elsewhere."""
    w, h = size
    out = np.zeros((h, w), dtype=np.uint8)
    for i, e in enumerate(entities):
        x0, y0, x1, y1 = e["box"]
        r = LABEL_BOX * (x1 - x0) / 2
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        out[max(0, math.floor(cy - r)):math.ceil(cy + r), max(0, math.floor(cx - r)):math.ceil(cx + r)] = i + 1
    return out


def make_view(image: Image.Image, scene: dict, view: tuple[float, float, float, float], grid: int, patch: int
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One view of a generator image: pixels [3,384,384] (LaViDa's preprocessing) and its patch targets."""
    x0, y0, w, h = view
    box = (round(x0), round(y0), round(x0 + w), round(y0 + h))
    ids = entity_ids(np.asarray(image), scene["entities"])
    text = text_regions(image.size, scene["entities"])
    targets = patch_targets(Image.fromarray(ids).crop(box), scene["entities"], Image.fromarray(text).crop(box),
                            grid, patch)
    return image_to_tensor(image.convert("RGB").crop(box)), targets


def make_batch(seed: int, step: int, batch: int, kinds: list[str], n_images: int, split: str, grid: int,
               patch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Views [B,3,384,384] and targets [B,grid²] of one step: a pure function of (seed, step)."""
    rng = random.Random(f"pretrain-vision/{split}/{seed}/{step}")
    pixels, targets = [], {}
    for _ in range(batch):
        kind = rng.choice(kinds)
        image, scene, _ = eg.make_sample(split, rng.randrange(n_images), seed, kind, questions_per_image=0)
        view_pixels, view_targets = make_view(image, scene, draw_view(rng, *scene["size"]), grid, patch)
        pixels.append(view_pixels)
        for k, t in view_targets.items():
            targets.setdefault(k, []).append(t)
    return torch.stack(pixels), {k: torch.stack(v) for k, v in targets.items()}


def entity_weights(owner: torch.Tensor) -> torch.Tensor:
    """[B, N] patch weights: 1 / (patches of the same owner in the view), so each entity -- and the background,
    as one more owner -- weighs the same however many patches it covers. Why: a solo image's entity covers
    hundreds of patches of ONE shape; weighting patches equally, a batch is a handful of effective samples and
    the heads chase each batch's dominant shape instead of learning shapes."""
    b, n = owner.shape
    counts = torch.zeros(b, int(owner.max()) + 1, dtype=torch.float32).scatter_add_(
        1, owner, torch.ones(b, n, dtype=torch.float32))
    return 1.0 / counts.gather(1, owner)


def losses(heads: PatchHeads, features: torch.Tensor, targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Cross-entropy per head, each entity weighted equally (`entity_weights`). Colour (with "none") over every
    patch teaches where entities are; shape and label over the entity patches where they are defined, and once
    more per entity (`PatchHeads.entity_logits`)."""
    logits = heads(features)
    weights = entity_weights(targets["owner"])
    out = {}
    for k, (entity_logits, entity_targets) in heads.entity_logits(features, targets).items():
        out[f"{k}_entity"] = F.cross_entropy(entity_logits, entity_targets) if len(entity_targets) else (
            entity_logits.sum() * 0.0)
    for k in HEAD_CLASSES:
        seen = targets[k] != IGNORE
        if k != "colour":
            seen &= targets["owner"] > 0
        w = weights[seen]
        ce = F.cross_entropy(logits[k][seen], targets[k][seen], reduction="none")
        out[k] = (ce * w).sum() / w.sum() if seen.any() else logits[k].sum() * 0.0
    return out


@torch.no_grad()
def accuracy(tower, heads: PatchHeads, seed: int, kinds: list[str], n_views: int, grid: int, patch: int) -> dict:
    """Patch accuracy on val-split views, each entity weighted equally (`entity_weights`): entity vs background
    over all patches, each head over entity patches."""
    pixels, targets = make_batch(seed, 0, n_views, kinds, 1000, "val", grid, patch)
    features = tower(pixels).features
    logits = heads(features)
    weights, on = entity_weights(targets["owner"]), targets["owner"] > 0

    def weighted(correct, where):
        return ((correct.float() * weights)[where].sum() / weights[where].sum()).item()

    out = {"entity_or_background": weighted((logits["colour"].argmax(-1) > 0) == on, torch.ones_like(on))}
    for k in HEAD_CLASSES:
        out[k] = weighted(logits[k].argmax(-1) == targets[k], on & (targets[k] != IGNORE))
    for k, (entity_logits, entity_targets) in heads.entity_logits(features, targets).items():
        out[f"{k}_entity"] = (entity_logits.argmax(-1) == entity_targets).float().mean().item()
    return {k: round(v, 4) for k, v in out.items()}


def save_state(out: Path, step: int, tower, heads, optimizer, scheduler) -> None:
    with atomic_file(out / STATE_FILE) as fh:
        torch.save({"step": step, "tower": tower.state_dict(), "heads": heads.state_dict(),
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, fh)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m llava.train.pretrain_vision", description=__doc__.split("\n\n")[0])
    p.add_argument("--model_name_or_path", default=SMALL_MODEL_NAME)
    p.add_argument("--config_overrides", default=None, help="JSON object of config keys (the built-in model's dims)")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--max_steps", type=int, required=True)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--warmup_steps", type=int, default=30)
    p.add_argument("--min_lr_rate", type=float, default=0.1)
    p.add_argument("--weight_decay", type=float, default=1e-4)
    p.add_argument("--kinds", default="grid,single,solo", help="EntityGrid kinds the views come from")
    p.add_argument("--n_images", type=int, default=4000, help="train-split images per kind drawn from")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save_steps", type=int, default=50)
    p.add_argument("--logging_steps", type=int, default=10)
    p.add_argument("--eval_views", type=int, default=64, help="val views for the accuracy logged at the end")
    args = p.parse_args(argv)
    kinds = [k for k in args.kinds.split(",") if k]
    bad = [k for k in kinds if k not in eg.KINDS]
    if bad or not kinds:
        p.error(f"--kinds: {','.join(bad) or 'empty'} not among {', '.join(eg.KINDS)}")
    if args.max_steps < 1 or args.batch_size < 1 or args.n_images < 1 or args.save_steps < 1:
        p.error("--max_steps, --batch_size, --n_images and --save_steps must be >= 1")
    args.kinds = kinds
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging()
    try:
        pretrain(args)
    except LavidaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def pretrain(args: argparse.Namespace) -> dict:
    """Run the stage; returns the val accuracy (also in `<output_dir>/val_accuracy.json`)."""
    try:
        overrides = json.loads(args.config_overrides) if args.config_overrides else None
    except json.JSONDecodeError as e:
        raise ConfigError(f"--config_overrides is not JSON: {e}") from None
    out = Path(args.output_dir)
    if (out / FINAL_DIR).exists():
        raise CheckpointError(f"{out / FINAL_DIR} exists: this stage is done (delete the folder to redo it)")
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    tokenizer, model, _, _ = load_pretrained_model(args.model_name_or_path, config_overrides=overrides)
    tower = model.model.vision_tower
    grid, patch = tower.num_patches_per_side, tower.patch_size
    heads = PatchHeads(tower.hidden_size)
    params = [*tower.parameters(), *heads.parameters()]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, args.warmup_steps, args.max_steps, args.min_lr_rate))
    start = 0
    if (out / STATE_FILE).exists():
        state = torch_load(out / STATE_FILE)
        tower.load_state_dict(state["tower"])
        heads.load_state_dict(state["heads"])
        optimizer.load_state_dict(state["optimizer"])  # carries each group's current lr
        scheduler.load_state_dict(state["scheduler"])  # its step count
        start = state["step"]
        if start > args.max_steps:
            raise CheckpointError(f"{out / STATE_FILE} is at step {start} > --max_steps {args.max_steps}")
        logger.info("resumed %s at step %d", out / STATE_FILE, start)
    tower.train()
    t0, window, logged = time.time(), {}, start  # losses are logged as means over the logging window
    for step in range(start, args.max_steps):
        pixels, targets = make_batch(args.seed, step, args.batch_size, args.kinds, args.n_images, "train", grid,
                                     patch)
        parts = losses(heads, tower(pixels).features, targets)
        loss = sum(parts.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        done = step + 1
        for k, v in parts.items():
            window[k] = window.get(k, 0.0) + v.item()
        if done % args.logging_steps == 0 or done == args.max_steps:
            n = done - logged
            entry = {"step": done, "loss": round(sum(window.values()) / n, 4),
                     **{k: round(v / n, 4) for k, v in window.items()},
                     "lr": optimizer.param_groups[0]["lr"], "seconds": round(time.time() - t0, 1)}
            window, logged = {}, done
            with open(out / LOG_FILE, "a") as f:
                f.write(json.dumps(entry) + "\n")
            logger.info("%s", entry)
        if done % args.save_steps == 0 and done < args.max_steps:
            save_state(out, done, tower, heads, optimizer, scheduler)
    tower.eval()
    acc = accuracy(tower, heads, args.seed, args.kinds, args.eval_views, grid, patch)
    (out / "val_accuracy.json").write_text(json.dumps(acc, indent=1))
    logger.info("val patch accuracy %s", acc)
    save_pretrained(model, tokenizer, out / FINAL_DIR)
    (out / STATE_FILE).unlink(missing_ok=True)
    print(f"pretrained the vision tower for {args.max_steps} steps: val patch accuracy {acc}; "
          f"checkpoint {out / FINAL_DIR}")
    return acc


if __name__ == "__main__":
    sys.exit(main())
