"""LaViDa's complementary-masking objective on the built-in small model (fp32, CPU).

The batched loss is checked against a direct per-sample computation: each sample alone, with its own visual
tokens and the same masks, CE summed over masked targets of both copies and divided by the total count.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava.errors import InputError
from llava.train import objective
from llava.train.data import DataCollatorForSupervisedDataset, preprocess_llada
from llava.train.objective import (
    build_inputs_embeds,
    complementary_masks,
    diffusion_loss,
    drop_visual_tokens,
    sample_t,
)

SIZES = [(768, 768), (640, 480), (400, 900)]
ANSWERS = ["The color is red.", "Yes.", "There are three circles and two squares in the image."]


def noise_image(size, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def make_batch(tokenizer, sizes=SIZES, answers=ANSWERS, extra=4):
    items = []
    for i, (size, answer) in enumerate(zip(sizes, answers)):
        conv = [{"from": "human", "value": "<image>\nWhat is in the image?"}, {"from": "gpt", "value": answer}]
        item = preprocess_llada(conv, tokenizer, True, np.random.default_rng(i))
        item.update(image=noise_image(size, i), index=i, epoch=0)
        items.append(item)
    collate = DataCollatorForSupervisedDataset(tokenizer.pad_token_id, extra_pad_range=(extra, extra + 1))
    return collate(items)


@pytest.fixture(scope="module")
def batched(small_model):
    """One batched loss of 3 differently shaped images, with encode_image calls counted and their tokens kept."""
    tok, model = small_model
    batch = make_batch(tok)
    calls = []
    real = model.encode_image

    def counting(image, *args, **kwargs):
        out = real(image, *args, **kwargs)
        calls.append((image, out))
        return out

    model.encode_image = counting
    try:
        with torch.no_grad():
            loss, stats = diffusion_loss(model, batch, prune_method="pool", generator=torch.Generator().manual_seed(0))
    finally:
        del model.encode_image  # back to the class method
    return batch, loss, stats, calls


def test_loss_equals_direct_per_sample_computation(small_model, batched):
    tok, model = small_model
    batch, loss, stats, calls = batched
    counts = stats["visual_tokens"]
    assert len(set(counts)) == 3 and counts[0] == 1008 and counts[1] == 834  # pooled any-res, per aspect
    wte = model.model.transformer.wte
    mask_embed = wte.weight[model.config.llada.mask_token_id]
    ce_sum, count = 0.0, 0
    with torch.no_grad():
        for i, (_, visual) in enumerate(calls):
            embeds, labels, valid = build_inputs_embeds(
                model, batch["input_ids"][i : i + 1], [visual.tokens], batch["labels"][i : i + 1]
            )
            n = embeds.shape[1]
            assert valid.all()
            mask_a, mask_b = stats["mask_a"][i], stats["mask_b"][i]
            assert not mask_a[n:].any() and not mask_b[n:].any()  # nothing masked in the zero padding
            for mask in (mask_a[:n], mask_b[:n]):
                x = torch.where(mask[:, None], mask_embed, embeds[0])
                logits = model.model(inputs_embeds=x[None])[0]
                ce_sum += F.cross_entropy(logits[mask], labels[0][mask], reduction="sum").item()
                count += int(mask.sum())
    assert count == stats["targets"] == stats["masked_a"] + stats["masked_b"]
    # plain token mean over both copies: no 1/t weighting
    assert loss.item() == pytest.approx(ce_sum / count, rel=1e-5)


def test_image_encoded_once_per_sample(batched):
    batch, _, _, calls = batched
    assert len(calls) == 3 and [c[0] for c in calls] == batch["images"]


def test_masks_complementary_over_targets(batched):
    _, _, stats, _ = batched
    a, b = stats["mask_a"], stats["mask_b"]
    assert not (a & b).any()
    assert (a | b).sum() == stats["targets"]


def test_eos_padding_positions_are_targets(small_model, batched):
    tok, model = small_model
    batch, _, stats, _ = batched
    visual = [torch.zeros(c, model.config.llada.d_model) for c in stats["visual_tokens"]]
    _, labels, _ = build_inputs_embeds(model, batch["input_ids"], visual, batch["labels"])
    eos = labels == tok.pad_token_id
    assert eos.sum() >= 3 * 4  # at least the 4 extra pads per row
    assert ((stats["mask_a"] | stats["mask_b"]) == (labels != IGNORE_INDEX)).all()
    assert (stats["mask_a"] | stats["mask_b"])[eos].all()


def test_attend_padding_reproduces_upstream(small_model, batched, monkeypatch):
    """attend_padding=True lets tokens attend the zero padding (upstream): same masks, different loss."""
    tok, model = small_model
    batch, loss, stats, calls = batched
    cached = {id(image): visual for image, visual in calls}
    monkeypatch.setattr(model, "encode_image", lambda image, *a, **k: cached[id(image)], raising=False)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        loss_up, stats_up = diffusion_loss(model, batch, generator=gen, attend_padding=True)
    assert torch.equal(stats_up["mask_a"], stats["mask_a"])
    assert abs(loss_up.item() - loss.item()) > 1e-6


# ---- complementary_masks ---------------------------------------------------------------------------------------


def test_complementary_masks_pure():
    gen = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 50, (4, 300), generator=gen)
    labels[:, :100] = IGNORE_INDEX
    labels[1, 250:] = IGNORE_INDEX
    a, b, targets = complementary_masks(labels, torch.Generator().manual_seed(2))
    assert torch.equal(targets, labels != IGNORE_INDEX)
    assert not (a & b).any() and torch.equal(a | b, targets)
    a2, b2, _ = complementary_masks(labels, torch.Generator().manual_seed(2))
    assert torch.equal(a, a2) and torch.equal(b, b2)  # deterministic under the seed


def test_t_is_per_sample():
    labels = torch.zeros(3, 20000, dtype=torch.long)
    a, b, _ = complementary_masks(labels, torch.Generator().manual_seed(0), t=torch.tensor([0.0, 0.5, 1.0]))
    rate = a.float().mean(1)
    assert 1 <= a[0].sum() <= 60  # p = eps = 1e-3 (never 0)
    assert rate[1] == pytest.approx((1 - 1e-3) * 0.5 + 1e-3, abs=0.02)
    assert a[2].all() and not b[2].any()  # t = 1 masks everything
    # default: t ~ U(0, 1) per sample, drawn first from the generator
    t = sample_t(3, torch.Generator().manual_seed(5))
    a, _, _ = complementary_masks(labels, torch.Generator().manual_seed(5))
    assert a.float().mean(1) == pytest.approx(((1 - 1e-3) * t + 1e-3).tolist(), abs=0.02)


def test_at_least_one_position_masked_per_row():
    labels = torch.zeros(50, 8, dtype=torch.long)
    a, _, _ = complementary_masks(labels, torch.Generator().manual_seed(0), t=torch.zeros(50))
    assert (a.sum(1) >= 1).all()


# ---- build_inputs_embeds -----------------------------------------------------------------------------------------


def test_build_inputs_embeds_splices_pads_and_labels(small_model):
    _, model = small_model
    wte = model.model.transformer.wte
    ids = torch.tensor([[5, IMAGE_TOKEN_INDEX, 6, 7], [8, 9, 10, 11]])
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 6, 7], [IGNORE_INDEX, 9, 10, 11]])
    vis = torch.randn(3, wte.weight.shape[1])
    with torch.no_grad():
        embeds, out_labels, valid = build_inputs_embeds(model, ids, [vis, None], labels)
        assert embeds.shape[:2] == (2, 6)
        assert torch.equal(embeds[0, 1:4], vis) and torch.equal(embeds[0, 4], wte.weight[6])
        assert out_labels[0].tolist() == [IGNORE_INDEX] * 4 + [6, 7]
        assert out_labels[1].tolist() == [IGNORE_INDEX, 9, 10, 11, IGNORE_INDEX, IGNORE_INDEX]
        assert valid[0].all() and valid[1].tolist() == [True] * 4 + [False] * 2
        assert (embeds[1, 4:] == 0).all()
        embeds, out_labels, _ = build_inputs_embeds(model, ids, [vis, None], labels, max_length=5)
        assert embeds.shape[1] == 5 and out_labels[0, -1] == 6
    with pytest.raises(InputError, match="sample 1 has 0 <image>"):
        build_inputs_embeds(model, ids, [vis, vis], labels)


# ---- token dropout ---------------------------------------------------------------------------------------------


def test_drop_visual_tokens():
    x = torch.ones(100, 4)
    y = drop_visual_tokens(x, 0.3, torch.Generator().manual_seed(0))
    assert int((y.abs().sum(1) == 0).sum()) == 30 and drop_visual_tokens(x, 0.0) is x


def test_token_dropout_only_when_asked_and_training(small_model, monkeypatch):
    tok, model = small_model
    batch = make_batch(tok, sizes=[(400, 300)], answers=["Red."])
    fixed = torch.randn(500, model.config.llada.d_model)
    monkeypatch.setattr(model, "encode_image",
                        lambda *a, **k: type("V", (), {"tokens": fixed.clone()})(), raising=False)
    seen = []
    real_build = objective.build_inputs_embeds
    monkeypatch.setattr(objective, "build_inputs_embeds",
                        lambda m, ids, vis, *a, **k: seen.append(vis[0]) or real_build(m, ids, vis, *a, **k))
    zero_rows = lambda v: int((v.abs().sum(1) == 0).sum())  # noqa: E731
    with torch.no_grad():
        diffusion_loss(model, batch, token_dropout=0.0)
        diffusion_loss(model, batch, token_dropout=0.2)  # eval mode: no dropout
        monkeypatch.setattr(model, "training", True)
        diffusion_loss(model, batch, token_dropout=0.0)
        diffusion_loss(model, batch, token_dropout=0.2, generator=torch.Generator().manual_seed(0))
    assert [zero_rows(v) for v in seen] == [0, 0, 0, 100]


# ---- gradients -------------------------------------------------------------------------------------------------


def test_gradient_reaches_vision_tower_and_projector(small_model):
    tok, model = small_model
    batch = make_batch(tok, sizes=[(640, 480), (384, 384)], answers=["Red.", "Two."])
    params = dict(model.named_parameters())
    try:
        loss, _ = diffusion_loss(model, batch, generator=torch.Generator().manual_seed(0))
        loss.backward()
        for name in ("model.mm_projector.0.weight", "model.mm_projector.2.weight", "model.image_newline",
                     "model.transformer.wte.weight"):
            assert params[name].grad is not None and params[name].grad.abs().sum() > 0, name
        # every tower weight but post_layernorm, which LaViDa never applies (features skip it by design)
        tower = [(n, p) for n, p in params.items() if "vision_tower" in n and "post_layernorm" not in n]
        assert tower and all(p.grad is not None for _, p in tower)
        assert sum(p.grad.abs().sum() for _, p in tower) > 0
        mask_row = params["model.transformer.wte.weight"].grad[model.config.llada.mask_token_id]
        assert mask_row.abs().sum() > 0  # the mask token is substituted through wte, so it is trained
    finally:
        for p in model.parameters():  # the session model is shared: leave no gradients behind
            p.grad = None
