"""LaViDa's training objective: masked-diffusion cross-entropy with complementary masking.

For each sample a noise level t ~ U(0, 1) is drawn and p = (1 - eps) t + eps with eps = 1e-3 (so p never hits 0).
Every position of the row draws u ~ U(0, 1) and is "masked" when u <= max(p, min(u)): at least one position of the
row is masked even for tiny t (that position may fall outside the targets, as upstream).

Two copies of the batch are built from ONE image encoding:
  A: masked targets replaced by the `<|mdm_mask|>` embedding;   B: the complementary (unmasked) targets replaced.
Each copy is supervised only on its replaced positions, so every target token is predicted exactly once across
A and B — twice the supervision per image encoding, and no target is ever "free". The loss is the plain token
mean of the cross-entropy over all supervised positions of [A; B], with NO 1/t weighting (LaViDa's choice; the
ELBO weight is dropped). Targets are all labels != IGNORE_INDEX, which includes the EOS padding the collator
turned into targets. FIM markers (LaViDa's stage 3) are not produced by our data pipeline and are not special-cased.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava.errors import InputError

MASK_EPS = 1e-3


def sample_t(batch_size: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Per-sample noise level t ~ U(0, 1), [B] float32 on CPU (LaViDa's `uniform` policy)."""
    return torch.rand(batch_size, generator=generator)


def complementary_masks(
    labels: torch.Tensor,
    generator: Optional[torch.Generator] = None,
    t: Optional[torch.Tensor] = None,
    eps: float = MASK_EPS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """labels [B, L] -> (mask_a, mask_b, targets), bool [B, L] on labels' device.

    targets = labels != IGNORE_INDEX; mask_a = masked & targets; mask_b = ~masked & targets, so A and B are
    disjoint and cover the targets exactly. `t` [B] defaults to `sample_t(B, generator)` (drawn first), then u.
    """
    B, L = labels.shape
    if t is None:
        t = sample_t(B, generator)
    p = (1 - eps) * t.float().cpu() + eps
    u = torch.rand(B, L, generator=generator)
    masked = u <= torch.maximum(p, u.min(dim=1).values)[:, None]
    masked = masked.to(labels.device)
    targets = labels != IGNORE_INDEX
    return masked & targets, ~masked & targets, targets


def drop_visual_tokens(
    tokens: torch.Tensor, fraction: float, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """Zero round(fraction * T) randomly chosen visual tokens [T, D] (a regulariser; the sequence keeps its length
    so positions and the answer layout don't change)."""
    n = int(round(fraction * tokens.shape[0]))
    if n == 0:
        return tokens
    keep = torch.ones(tokens.shape[0], dtype=torch.bool)
    keep[torch.randperm(tokens.shape[0], generator=generator)[:n]] = False
    return tokens * keep.to(tokens.device, tokens.dtype)[:, None]


def build_inputs_embeds(
    model,
    input_ids: torch.Tensor,
    visual_tokens: Sequence[Optional[torch.Tensor]],
    labels: Optional[torch.Tensor] = None,
    max_length: Optional[int] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """Splice each sample's visual tokens at its IMAGE_TOKEN_INDEX -> (embeds [B,L,D], labels [B,L], valid [B,L]).

    A sample has exactly one placeholder when its visual tokens are given, none when they are None (text-only).
    Visual positions are labelled IGNORE_INDEX. Rows are truncated to `max_length` (default: the model's
    `tokenizer_model_max_length`, as upstream does after insertion), then right-padded to the longest row with
    zero vectors (labels IGNORE_INDEX). `valid` is False exactly on that zero padding; upstream attends to it,
    `diffusion_loss` masks it by default (see there).
    """
    wte = model.model.transformer.wte
    device, dtype = wte.weight.device, wte.weight.dtype
    input_ids = input_ids.to(device)
    if labels is not None:
        labels = labels.to(device)
    if len(visual_tokens) != input_ids.shape[0]:
        raise InputError(f"{input_ids.shape[0]} samples but {len(visual_tokens)} visual-token entries")
    max_length = max_length or model.mm_config.tokenizer_model_max_length
    text = wte(input_ids.clamp(min=0))  # placeholders embed as id 0 and are cut out below
    rows, row_labels = [], []
    for i, vis in enumerate(visual_tokens):
        where = (input_ids[i] == IMAGE_TOKEN_INDEX).nonzero().flatten().tolist()
        expected = 0 if vis is None else 1
        if len(where) != expected:
            raise InputError(f"sample {i} has {len(where)} <image> placeholders but {expected} image(s)")
        lab = labels[i] if labels is not None else None
        if vis is None:
            row, row_lab = text[i], lab
        else:
            p = where[0]
            vis = vis.to(device=device, dtype=dtype)
            row = torch.cat([text[i, :p], vis, text[i, p + 1:]])
            if lab is not None:
                ignore = lab.new_full((vis.shape[0],), IGNORE_INDEX)
                row_lab = torch.cat([lab[:p], ignore, lab[p + 1:]])
        rows.append(row[:max_length])
        row_labels.append(row_lab[:max_length] if lab is not None else None)
    length = max(r.shape[0] for r in rows)
    embeds = text.new_zeros(len(rows), length, text.shape[-1])
    valid = torch.zeros(len(rows), length, dtype=torch.bool, device=device)
    out_labels = None if labels is None else labels.new_full((len(rows), length), IGNORE_INDEX)
    for i, row in enumerate(rows):
        embeds[i, : row.shape[0]] = row
        valid[i, : row.shape[0]] = True
        if out_labels is not None:
            out_labels[i, : row.shape[0]] = row_labels[i]
    return embeds, out_labels, valid


def diffusion_loss(
    model,
    batch: dict,
    prune_method: str = "pool",
    prune_options: Optional[dict] = None,
    token_dropout: float = 0.0,
    generator: Optional[torch.Generator] = None,
    attend_padding: bool = False,
) -> tuple[torch.Tensor, dict]:
    """LaViDa's complementary-masking loss for one collated batch -> (scalar loss, stats).

    Each image is encoded once (`model.encode_image`, with gradients) and shared by copies A and B. With
    `token_dropout` > 0 and `model.training`, that fraction of each image's visual tokens is zeroed. The mask
    token is substituted at the embedding level (`wte(mask_token_id)`, so its embedding row is trained too).

    Batch padding: samples with different visual-token counts are right-padded with zero vectors. Upstream lets
    every token attend to those zeros, which makes a sample's loss depend on the others in its batch; by default
    we mask the padding keys instead so the batched loss equals the per-sample one. `attend_padding=True`
    reproduces upstream. EOS padding from the collator is real input either way (attended and supervised).

    Random draws from `generator`, in order: token dropout (if active), t [B], u [B, L].
    stats: loss, t [B], targets / masked_a / masked_b counts, seq_len, visual_tokens per sample, mask_a, mask_b.
    """
    images = batch["images"]
    question_ids = batch.get("question_ids") or [None] * len(images)
    visual = [
        None if image is None else model.encode_image(image, prune_method, question_ids=q, options=prune_options).tokens
        for image, q in zip(images, question_ids)
    ]
    if token_dropout > 0 and model.training:
        visual = [None if v is None else drop_visual_tokens(v, token_dropout, generator) for v in visual]
    embeds, labels, valid = build_inputs_embeds(model, batch["input_ids"], visual, batch["labels"])

    t = sample_t(embeds.shape[0], generator)
    mask_a, mask_b, targets = complementary_masks(labels, generator, t=t)
    wte = model.model.transformer.wte
    mask_id = torch.tensor(model.config.llada.mask_token_id, device=embeds.device)
    mask_embed = wte(mask_id).to(embeds.dtype)
    copy_a = torch.where(mask_a[..., None], mask_embed, embeds)
    copy_b = torch.where(mask_b[..., None], mask_embed, embeds)
    attn = None
    if not attend_padding and not bool(valid.all()):
        attn = valid.repeat(2, 1)[:, None, None, :]  # [2B, 1, 1, L]: no query attends to zero padding
    supervised = torch.cat([mask_a, mask_b])
    # the head runs on the supervised slots only (each target once across A and B), not on every position
    logits = model.model(inputs_embeds=torch.cat([copy_a, copy_b]), attention_mask=attn, logits_at=supervised)
    ce_sum = F.cross_entropy(logits.float(), torch.cat([labels, labels])[supervised], reduction="sum")
    count = int(supervised.sum())
    loss = ce_sum / max(count, 1)
    stats = {
        "loss": float(loss.detach()),
        "t": t,
        "targets": int(targets.sum()),
        "masked_a": int(mask_a.sum()),
        "masked_b": int(mask_b.sum()),
        "seq_len": embeds.shape[1],
        "visual_tokens": [0 if v is None else v.shape[0] for v in visual],
        "mask_a": mask_a,
        "mask_b": mask_b,
    }
    return loss, stats
