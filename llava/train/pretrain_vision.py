"""Stage 0 of the built-in small model: supervised pretraining of its SigLIP tower on crops of EntityGrid images.

    python -m llava.train.pretrain_vision --output_dir outputs/stage0 --max_steps 1500 [--batch_size 128] \
        [--model_name_or_path builtin:lavida-small] [--config_overrides JSON] [--kinds grid,single,solo]

Why this stage exists: real LaViDa starts from a SigLIP pretrained on web image-text pairs, and that pretraining
is what makes each patch feature say what is there. Nothing pretrained is reachable here. Measured on the tiny
model: a random frozen tower passes colour through (mean pixel value survives any random projection) but not
shape, so the LM learns colour and answer priors only; training the tower through the LM's answer loss instead is
too weak a signal (one answer token per image) and made even colour worse.

What it trains on: small square crops (CROP_PX², 8x8 tokens; the tower interpolates its position embeddings)
each centred, with jitter, on one entity of a generator image, scaled so that the entity's side is log-uniform in
CROP_ENTITY_SIDE -- from a blob of a patch to a shape filling the crop, the range in which grid entities appear in
LaViDa's views and SHIRG's fovea. The colour, shape and label of that entity are read by one linear classifier
each from the mean of the crop's tokens: the tokens must carry what the entity is, as the LM's attention later
reads them. Per-token linear heads ask every token where it is (its patch centre's (x, y) in the crop, in
[-1, 1]; squared error), whether an entity's centre lies in its patch (binary cross-entropy) and, where one
does, that entity's colour and shape (cross-entropy): without the first a linear read-out of a token's row or
column from the tower's features had held-out R² < 0 (left/right questions then have nothing to read); one
marked token per entity is what a count can add up, where the number of tokens an entity paints grows with its
size, and it must say what it marks, or an entity smaller than a patch is in no token at all. The end-of-stage
accuracy also reads the centre tokens of whole grid images' 384² global views. A 729-token view costs ~12x a
crop here, so a step of 128 crops costs about 10 full views.

Opt-in, and not in `make train-tiny`'s recipe: per token a count density per colour and per shape
(`--density_weight`, `entity_density`): each entity spreads a mass of 1 over the patches its box covers, so a
colour's density summed over a view's tokens is how many entities of that colour it holds, whatever their sizes,
and an average pool keeps that sum; `--density_views` adds train-split grid global views with only these targets.
Why it was tried: the centre marks find a third to a half of the entity centres on grid global views, and an LM
fed the tower's tokens answered grid counts at their prior even from one pooled global view. What it measured
(1,500 steps of 128 crops; counts on the global views of 48 val grid images, where a constant count is 35 %
exact for colours, 26 % for shapes): trained on crops it counts no better than the constant (colour 33 %,
shape 10 %: leaks summed over 729 tokens are a count of their own); with 4 grid views per step it counts colours
there (71 %, MAE 0.39) but the shape head stays at chance (CE ln 5) throughout, where without the density losses
its CE is 1.1 by step 500. The end-of-stage accuracy then also scores the density maps' sums on those views.
Also opt-in: `--centre_views` adds train-split grid global views that train the per-token centre, colour and
shape heads (the crops' per-token targets, on the views the LM's pooled tokens come from): an oracle LM counts
grids from one clean mark per entity centre and not from a density map, and the crops alone leave the centre
head finding a third of grid entities' centres.

What was measured on the way (64-wide tower, 2-core CPU): dense per-patch targets on whole 384² views (each
token asked the attributes of the entity painting it) learned colour only in 600 steps, shape and label stayed
at chance (CE = ln 5, ln 33); mixing those views into the crop batches stopped the crops learning shape too.
Crops alone: shape CE 1.61 -> 0.63 in 700 steps. Labels are learnable at one fixed scale and centring (CE 3.5 ->
0.9 in 400 steps) but not across the scales and sub-patch offsets a 14-px-patch ViT must be invariant to: with
those the label CE stays at ln 33 through 700 steps of 128 crops, and widening the range gradually after
learning them at one scale unlearns them. So this stage gives the tower colour and shape, not letters.

The same tower then feeds every method: this stage sees no question, no answer and nothing that differs between
prune methods. The heads are thrown away; the output `<output_dir>/final` is an ordinary checkpoint folder
(trained tower, projector and LM at their init) for stage 1 of `scripts/train_tiny.sh`.

Killed runs lose at most `--save_steps` steps: `<output_dir>/state.pt` (tower, heads, optimizer, scheduler,
step) is replaced atomically, and every batch is a pure function of (seed, step), so a resumed run is the
uninterrupted one. The images are drawn in memory by `llava.eval.entitygrid.make_sample`, none are written.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from llava.constants import SIGLIP_GRID, SIGLIP_IMAGE_SIZE, SIGLIP_PATCH_SIZE
from llava.errors import CheckpointError, ConfigError, LavidaError
from llava.eval import entitygrid as eg
from llava.mm_utils import image_to_tensor
from llava.model.builder import SMALL_MODEL_NAME, load_pretrained_model, save_pretrained
from llava.train.checkpoint import torch_load
from llava.train.train import FINAL_DIR, append_log, lr_factor, setup_logging, truncate_log
from llava.utils import atomic_file, logger

STATE_FILE = "state.pt"
LOG_FILE = "pretrain_log.jsonl"
ATTRIBUTES = {"colour": tuple(eg.COLOURS), "shape": eg.SHAPES, "label": eg.LABELS}  # class order of each head
CROP_PX = 112  # crop side fed to the tower: 8x8 tokens
CROP_ENTITY_SIDE = (10.0, 100.0)  # the centre entity's side in crop pixels, log-uniform
CROPS_PER_IMAGE = 8  # crops drawn from each generated image (drawing the image is the costly part)
CROP_GRID = CROP_PX // SIGLIP_PATCH_SIZE
TOKEN_ATTRIBUTES = ("colour", "shape")  # asked per centre token (labels are not learnable here, see above)
NO_ENTITY = -100  # per-token target of a patch holding no entity centre (cross-entropy's ignore index)
TOKEN_TARGETS = ("centre", *(f"token_{k}" for k in TOKEN_ATTRIBUTES))
DENSITY_CHANNELS = (*ATTRIBUTES["colour"], *ATTRIBUTES["shape"])  # one count-density map per colour and per shape
GRID_VIEW_IMAGES = 48  # val grid images whose 384² global view the end-of-stage accuracy also reads


class CropHeads(nn.Module):
    """One linear classifier per attribute on the mean of a crop's tokens, and per-token linear heads: the token's
    own (x, y) in the crop, whether an entity's centre lies in its patch, and that entity's colour and shape
    (LayerNorm first everywhere: the tower's output is the unnormalised residual stream LaViDa's projector reads).

    Why the per-token heads: with the mean-token heads alone, a linear read-out of a token's row or column from
    its features had held-out R² < 0, so no LM could answer left/right/above/below; and an entity covers a number
    of tokens that grows with its size, so counting "how many" needs one marked token per entity. The marked
    token must also say WHAT is there: an oracle LM probe counted on grids (54 % against a 34 % prior) only when
    every entity, however small, was painted onto its centre token, and stayed at the prior when entities smaller
    than a token were lost (58 % of grid entities at a 14x14 map) -- hence colour and shape per centre token."""

    def __init__(self, hidden: int):
        super().__init__()
        self.heads = nn.ModuleDict({k: nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, len(v)))
                                    for k, v in ATTRIBUTES.items()})
        self.position = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, 2))
        self.centre = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, 1))
        self.token_heads = nn.ModuleDict({k: nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, len(ATTRIBUTES[k])))
                                          for k in TOKEN_ATTRIBUTES})
        # non-negative, so that a background token can say exactly 0 (small leaks summed over a 729-token view
        # are a count of their own); initialised near 0: a map of the default init costs ~260 per crop, and its
        # gradient, ~1,000x the other heads', would shrink every update under the global clip
        self.density = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, len(DENSITY_CHANNELS)), nn.ReLU())
        nn.init.normal_(self.density[1].weight, std=1e-3)
        nn.init.zeros_(self.density[1].bias)

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """Attribute logits [B, classes] per attribute; "position" [B, N, 2]; "centre" logits [B, N]; per token
        attribute "token_<k>" logits [B, N, classes]; "density" [B, N, DENSITY_CHANNELS]."""
        pooled = features.mean(1)
        out = {k: head(pooled) for k, head in self.heads.items()}
        out["position"] = self.position(features)
        out["centre"] = self.centre(features).squeeze(-1)
        out.update({f"token_{k}": head(features) for k, head in self.token_heads.items()})
        out["density"] = self.density(features)
        return out


def token_positions(n_tokens: int) -> torch.Tensor:
    """(x, y) of each token's patch centre in a square view of n_tokens patches, raster order, in [-1, 1]."""
    side = math.isqrt(n_tokens)
    if side * side != n_tokens:
        raise ValueError(f"{n_tokens} tokens are not a square grid")
    coords = (torch.arange(side, dtype=torch.float32) + 0.5) / side * 2 - 1
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    return torch.stack([x.flatten(), y.flatten()], -1)


def centre_entities(crop: tuple[float, float, float, float], entities: list[dict], grid: int) -> list[int]:
    """Per patch of the crop's grid x grid tokens (raster order): the index of the entity whose box centre falls
    in it (the last one where two do), NO_ENTITY elsewhere."""
    x0, y0, side, _ = crop
    found = [NO_ENTITY] * (grid * grid)
    for i, e in enumerate(entities):
        bx0, by0, bx1, by1 = e["box"]
        u, v = ((bx0 + bx1) / 2 - x0) / side * grid, ((by0 + by1) / 2 - y0) / side * grid
        if 0 <= u < grid and 0 <= v < grid:
            found[int(v) * grid + int(u)] = i
    return found


def token_targets(found: list[int], entities: list[dict]) -> dict[str, list]:
    """From `centre_entities`: "centre" (1.0 where an entity centre is) and per TOKEN_ATTRIBUTES that entity's
    class (NO_ENTITY elsewhere)."""
    out = {"centre": [float(i != NO_ENTITY) for i in found]}
    for k in TOKEN_ATTRIBUTES:
        out[f"token_{k}"] = [NO_ENTITY if i == NO_ENTITY else ATTRIBUTES[k].index(entities[i][k]) for i in found]
    return out


def entity_density(crop: tuple[float, float, float, float], entities: list[dict], grid: int) -> torch.Tensor:
    """Per patch of the crop's grid x grid tokens (raster order), one count density per DENSITY_CHANNELS
    [grid², channels]: each entity spreads a mass of 1 over the patches its box covers, in proportion to the area
    it covers in each, into its colour's and its shape's channel. A channel's sum over the tokens is the number of
    such entities in the view (partly outside: partly counted), whatever their sizes; and an average pool keeps
    the sum up to the pool's constant factor, so it survives LaViDa's pooling."""
    x0, y0, side, _ = crop
    edges = torch.linspace(0.0, side, grid + 1)
    density = torch.zeros(grid, grid, len(DENSITY_CHANNELS))
    for e in entities:
        bx0, by0, bx1, by1 = e["box"]
        area = (bx1 - bx0) * (by1 - by0)
        if area <= 0:
            continue
        cols = (torch.clamp(edges[1:], max=bx1 - x0) - torch.clamp(edges[:-1], min=bx0 - x0)).clamp(min=0)
        rows = (torch.clamp(edges[1:], max=by1 - y0) - torch.clamp(edges[:-1], min=by0 - y0)).clamp(min=0)
        share = torch.outer(rows, cols) / area
        density[:, :, DENSITY_CHANNELS.index(e["colour"])] += share
        density[:, :, len(ATTRIBUTES["colour"]) + ATTRIBUTES["shape"].index(e["shape"])] += share
    return density.flatten(0, 1)


def draw_entity_crop(rng: random.Random, width: int, height: int, entities: list[dict]
                     ) -> tuple[tuple[float, float, float, float], int]:
    """A square (x0, y0, side, side) around one random entity, and that entity's index: sized so that the
    entity's side becomes log-uniform in CROP_ENTITY_SIDE once the square is resized to CROP_PX (smaller if the
    image is), centre jittered with the entity kept whole, shifted inside the image."""
    index = rng.randrange(len(entities))
    x0, y0, x1, y1 = entities[index]["box"]
    lo, hi = CROP_ENTITY_SIDE
    side = min(CROP_PX * (x1 - x0) / math.exp(rng.uniform(math.log(lo), math.log(hi))), width, height)
    slack = max(0.0, side - (x1 - x0)) / 2
    cx = (x0 + x1) / 2 + rng.uniform(-slack, slack)
    cy = (y0 + y1) / 2 + rng.uniform(-slack, slack)
    return (min(max(cx - side / 2, 0.0), width - side), min(max(cy - side / 2, 0.0), height - side), side, side), index


def stack_targets(targets: dict[str, list]) -> dict[str, torch.Tensor]:
    """Per-sample target lists -> tensors ("density" holds per-sample tensors, the others lists of numbers)."""
    return {k: torch.stack(v) if k == "density" else torch.tensor(v) for k, v in targets.items()}


def make_batch(seed: int, step: int, n_crops: int, kinds: list[str], n_images: int, split: str,
               density: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Crops [n_crops,3,CROP_PX,CROP_PX] (LaViDa's preprocessing) of one step, CROPS_PER_IMAGE per image; per
    attribute the class of the entity each is centred on [n_crops], and per token [n_crops, CROP_GRID²] "centre"
    (1 where any entity's centre lies in the patch) and "token_<k>" (that entity's class, NO_ENTITY elsewhere),
    and with `density` "density" [n_crops, CROP_GRID², channels] (`entity_density`; a loop over every entity of
    every crop, so only when asked): a pure function of (seed, step)."""
    rng = random.Random(f"pretrain-vision-crops/{split}/{seed}/{step}")
    pixels, targets = [], {k: [] for k in (*ATTRIBUTES, *TOKEN_TARGETS, *(["density"] if density else []))}
    while len(pixels) < n_crops:
        kind = rng.choice(kinds)
        image, scene, _ = eg.make_sample(split, rng.randrange(n_images), seed, kind, questions_per_image=0)
        rgb = image.convert("RGB")
        for _ in range(min(CROPS_PER_IMAGE, n_crops - len(pixels))):
            crop, index = draw_entity_crop(rng, *scene["size"], scene["entities"])
            x0, y0, w, h = crop
            pixels.append(image_to_tensor(rgb.crop((round(x0), round(y0), round(x0 + w), round(y0 + h))), CROP_PX))
            for k, classes in ATTRIBUTES.items():
                targets[k].append(classes.index(scene["entities"][index][k]))
            for k, v in token_targets(centre_entities(crop, scene["entities"], CROP_GRID), scene["entities"]).items():
                targets[k].append(v)
            if density:
                targets["density"].append(entity_density(crop, scene["entities"], CROP_GRID))
    return torch.stack(pixels), stack_targets(targets)


def density_losses(predicted: torch.Tensor, target: torch.Tensor, weight: float) -> dict[str, torch.Tensor]:
    """`weight` x the squared error of the count densities [B, N, channels] summed over a view's tokens and
    channels (a count's scale: one entity misplaced entirely costs 2), and ("_sum") of each channel's sum over the
    view: the count itself, which per-token errors hardly see when they are small and many."""
    return {"density": weight * ((predicted - target) ** 2).sum((1, 2)).mean(),
            "density_sum": weight * ((predicted.sum(1) - target.sum(1)) ** 2).sum(1).mean()}


def losses(heads: CropHeads, features: torch.Tensor, targets: dict[str, torch.Tensor], density_weight: float = 0.0
           ) -> dict[str, torch.Tensor]:
    """Cross-entropy per attribute of each crop's centre entity; per token, the squared error of its predicted
    (x, y), the binary cross-entropy of "an entity's centre is in this patch", on the patches where one is, the
    cross-entropy of that entity's colour and shape, and with a density_weight `density_losses`."""
    out = heads(features)
    parts = {k: F.cross_entropy(out[k], targets[k]) for k in ATTRIBUTES}
    parts["position"] = F.mse_loss(out["position"], token_positions(features.shape[1]).expand_as(out["position"]))
    parts.update(centre_token_losses(out, targets))
    if density_weight:
        parts.update(density_losses(out["density"], targets["density"], density_weight))
    return parts


def centre_token_losses(out: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per token, the binary cross-entropy of "an entity's centre is in this patch" and, on the patches where one
    is, the cross-entropy of that entity's colour and shape (every crop and every grid view holds a centre, so no
    batch lacks a target)."""
    parts = {"centre": F.binary_cross_entropy_with_logits(out["centre"], targets["centre"])}
    for k in TOKEN_ATTRIBUTES:
        parts[f"token_{k}"] = F.cross_entropy(out[f"token_{k}"].flatten(0, 1), targets[f"token_{k}"].flatten(),
                                              ignore_index=NO_ENTITY)
    return parts


def centre_token_scores(out: dict[str, torch.Tensor], targets: dict[str, torch.Tensor], prefix: str = ""
                        ) -> dict[str, float]:
    """Recall and precision of the centre head (logit > 0), and per TOKEN_ATTRIBUTES the accuracy of the per-token
    head on the patches that hold an entity centre."""
    centre, predicted = targets["centre"] > 0.5, out["centre"] > 0
    acc = {f"{prefix}centre_recall": round(predicted[centre].float().mean().item(), 4),
           f"{prefix}centre_precision": round(centre[predicted].float().mean().item(), 4) if predicted.any() else 0.0}
    for k in TOKEN_ATTRIBUTES:
        right = out[f"token_{k}"].argmax(-1)[centre] == targets[f"token_{k}"][centre]
        acc[f"{prefix}token_{k}"] = round(right.float().mean().item(), 4)
    return acc


def density_count_scores(out: dict[str, torch.Tensor], targets: dict[str, torch.Tensor], prefix: str = ""
                         ) -> dict[str, float]:
    """Per view and channel, the predicted count (the density map summed over the tokens, rounded) against the
    true one: the share exactly right and the mean absolute error, over colour channels and over shape channels
    (only views whose entities all lie inside them have whole-number truths: the global views)."""
    predicted, truth = out["density"].sum(1), targets["density"].sum(1)
    n_colours = len(ATTRIBUTES["colour"])
    acc = {}
    for name, part in (("colour", slice(0, n_colours)), ("shape", slice(n_colours, None))):
        p, t = predicted[:, part], truth[:, part]
        acc[f"{prefix}count_{name}_exact"] = round((p.round() == t.round()).float().mean().item(), 4)
        acc[f"{prefix}count_{name}_mae"] = round((p - t).abs().mean().item(), 4)
    return acc


def grid_views(seed: int, indices, split: str = "val", density: bool = False
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The global 384² view (LaViDa's distorting resize) of the grid images `indices` of `split`, with the per-token
    targets of its 27x27 patches (and with `density` their count densities): where the LM's pooled tokens come
    from, with entities far smaller than crops'."""
    pixels, targets = [], {k: [] for k in (*TOKEN_TARGETS, *(["density"] if density else []))}
    for i in indices:
        image, scene, _ = eg.make_sample(split, i, seed, "grid", questions_per_image=0)
        pixels.append(image_to_tensor(image.convert("RGB"), SIGLIP_IMAGE_SIZE))
        w, h = scene["size"]  # the view is the image stretched to a square: scale the boxes to the width
        squashed = [{**e, "box": [e["box"][0], e["box"][1] * w / h, e["box"][2], e["box"][3] * w / h]}
                    for e in scene["entities"]]
        view = (0.0, 0.0, float(w), float(w))
        for k, v in token_targets(centre_entities(view, squashed, SIGLIP_GRID), squashed).items():
            targets[k].append(v)
        if density:
            targets["density"].append(entity_density(view, squashed, SIGLIP_GRID))
    return torch.stack(pixels), stack_targets(targets)


def train_view_indices(key: str, seed: int, step: int, n: int, n_images: int) -> list[int]:
    """`n` train-split grid image indices for one step's extra views: a pure function of (key, seed, step), so a
    resumed run draws the same views and each kind of view (`key`) its own."""
    rng = random.Random(f"{key}/{seed}/{step}")
    return [rng.randrange(n_images) for _ in range(n)]


@torch.no_grad()
def accuracy(tower, heads: CropHeads, seed: int, kinds: list[str], n_crops: int, n_grid_views: int = GRID_VIEW_IMAGES,
             density: bool = False) -> dict[str, float]:
    """Per attribute, the share of val-split crops whose centre entity the heads name right; the position R²;
    the centre-token scores on the crops and ("grid_view_"), on whole grid images' global views, where with
    `density` the count densities' sums are also scored against the true counts."""
    pixels, targets = make_batch(seed, 0, n_crops, kinds, 1000, "val", density)
    features = tower(pixels).features
    out = heads(features)
    acc = {k: round((out[k].argmax(-1) == targets[k]).float().mean().item(), 4) for k in ATTRIBUTES}
    truth = token_positions(features.shape[1]).expand_as(out["position"])
    acc["position_r2"] = round(1 - ((out["position"] - truth) ** 2).sum().item()
                               / ((truth - truth.mean((0, 1))) ** 2).sum().item(), 4)
    acc.update(centre_token_scores(out, targets))
    if n_grid_views:
        views, view_targets = grid_views(seed, range(n_grid_views), density=density)
        view_out = heads(tower(views).features)
        acc.update(centre_token_scores(view_out, view_targets, "grid_view_"))
        if density:
            acc.update(density_count_scores(view_out, view_targets, "grid_view_"))
    return acc


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
    p.add_argument("--batch_size", type=int, default=128, help=f"entity crops ({CROP_PX}² px) per step")
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--warmup_steps", type=int, default=30)
    p.add_argument("--min_lr_rate", type=float, default=0.1)
    p.add_argument("--weight_decay", type=float, default=1e-4)
    p.add_argument("--kinds", default="grid,single,solo", help="EntityGrid kinds the crops come from")
    p.add_argument("--n_images", type=int, default=4000, help="train-split images per kind drawn from")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save_steps", type=int, default=100)
    p.add_argument("--logging_steps", type=int, default=10)
    p.add_argument("--eval_crops", type=int, default=512, help="val crops for the accuracy logged at the end")
    p.add_argument("--density_weight", type=float, default=0.0,
                   help="weight of the per-token count-density losses (0: no density head is trained)")
    p.add_argument("--density_views", type=int, default=0,
                   help="train-split grid global views (384²) per step that train the density head too")
    p.add_argument("--centre_views", type=int, default=0,
                   help="train-split grid global views (384²) per step that train the per-token centre, colour and "
                        "shape heads too (where grid entities are far smaller than in crops)")
    args = p.parse_args(argv)
    kinds = [k for k in args.kinds.split(",") if k]
    bad = [k for k in kinds if k not in eg.KINDS]
    if bad or not kinds:
        p.error(f"--kinds: {','.join(bad) or 'empty'} not among {', '.join(eg.KINDS)}")
    if min(args.max_steps, args.batch_size, args.n_images, args.save_steps, args.eval_crops) < 1:
        p.error("--max_steps, --batch_size, --n_images, --save_steps and --eval_crops must be >= 1")
    if args.density_weight < 0 or args.density_views < 0 or (args.density_views and not args.density_weight):
        p.error("--density_weight and --density_views must be >= 0, and --density_views needs a --density_weight")
    if args.centre_views < 0:
        p.error("--centre_views must be >= 0")
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
    heads = CropHeads(tower.hidden_size)
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
        truncate_log(out, start, LOG_FILE)
        logger.info("resumed %s at step %d", out / STATE_FILE, start)
    tower.train()
    t0, window, logged = time.time(), {}, start  # losses are logged as means over the logging window
    for step in range(start, args.max_steps):
        pixels, targets = make_batch(args.seed, step, args.batch_size, args.kinds, args.n_images, "train",
                                     args.density_weight > 0)
        parts = losses(heads, tower(pixels).features, targets, args.density_weight)
        if args.density_views:
            indices = train_view_indices("pretrain-vision-views", args.seed, step, args.density_views, args.n_images)
            views, view_targets = grid_views(args.seed, indices, "train", density=True)
            view_density = heads(tower(views).features)["density"]
            parts.update({f"view_{k}": v for k, v in
                          density_losses(view_density, view_targets["density"], args.density_weight).items()})
        if args.centre_views:
            indices = train_view_indices("pretrain-vision-centre-views", args.seed, step, args.centre_views,
                                         args.n_images)
            views, view_targets = grid_views(args.seed, indices, "train")
            parts.update({f"view_{k}": v for k, v in
                          centre_token_losses(heads(tower(views).features), view_targets).items()})
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
            append_log(out, entry, LOG_FILE)
            logger.info("%s", entry)
        if done % args.save_steps == 0 and done < args.max_steps:
            save_state(out, done, tower, heads, optimizer, scheduler)
    tower.eval()
    acc = accuracy(tower, heads, args.seed, args.kinds, args.eval_crops, density=args.density_weight > 0)
    (out / "val_accuracy.json").write_text(json.dumps(acc, indent=1))
    logger.info("val crop accuracy %s", acc)
    save_pretrained(model, tokenizer, out / FINAL_DIR)
    (out / STATE_FILE).unlink(missing_ok=True)
    print(f"pretrained the vision tower for {args.max_steps} steps: val crop accuracy {acc}; "
          f"checkpoint {out / FINAL_DIR}")
    return acc


if __name__ == "__main__":
    sys.exit(main())
