"""Analytic FLOP / byte cost model of LaViDa and SHIRG at the real 8B scale.

CPU benchmarks run on tiny models; this module says what the same stages cost with the real dims
on a real GPU, so measured ratios can be read against the GPU picture. Pure arithmetic, stdlib only.

Counting conventions (batch size 1):
* FLOPs: matmuls only, a multiply-add = 2 FLOPs. A linear on T tokens is 2·T·in·out; attention is
  4·Tq·Tk·width (QKᵀ plus AV). Norms, activations, softmax, RoPE and biases are ignored (< 1 %).
* Weight bytes: every weight a forward uses is read once per forward (no reuse across forwards:
  8B of weights do not fit in any cache). The embedding table is a gather, so only the T rows
  looked up are read. Each separate SigLIP call re-reads the tower weights.
* Activation bytes: each matmul reads its input and writes its output once; norms, activations,
  residual adds and RoPE are assumed fused into neighbouring kernels. LM attention is a fused
  (flash) kernel: it reads Q, K, V and writes O, scores never reach memory — so a cached step
  reads the whole K/V cache once per layer. SigLIP attention is eager with an fp32 softmax
  (LaViDa's SigLIP runs eager attention): its score matrix is written and read once in fp32 and the
  probabilities written and read once in the activation dtype.
* LM head: logits only for the response slots (prompt logits are unused; upstream computes
  them in the prefill and in uncached steps, which would add 2·T·d·vocab FLOPs). Prompt
  embeddings are built once per answer: a step gathers only its Q response ids.
* Time: roofline per stage, max(flops / peak, bytes / bandwidth) at the datasheet peaks. It is a
  lower bound (real kernels reach roughly 50-80 % of either peak); composite rows (a whole
  answer) add their stages' times.
"""
from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field

from llava.constants import LLADA_EMBEDDING_SIZE, POOLED_GRID, SIGLIP_GRID, SIGLIP_PATCH_SIZE, TOKEN_BUDGET


@dataclass(frozen=True)
class VisionDims:
    """SigLIP-so400m-patch14-384 with its last layer and pooling head dropped (26 layers)."""

    hidden: int = 1152
    layers: int = 26
    heads: int = 16
    mlp: int = 4304
    patch: int = SIGLIP_PATCH_SIZE
    channels: int = 3
    positions: int = SIGLIP_GRID * SIGLIP_GRID  # learned position table (27×27); larger views interpolate it
    score_bytes: int = 4  # eager fp32 softmax materialises the score matrix

    def tokens(self, side: int) -> int:
        """Patch tokens for a square view (Conv2d stride = patch, no padding)."""
        return (side // self.patch) ** 2

    def layer_params(self) -> int:
        """q/k/v/out and fc1/fc2 with biases, two LayerNorms (weight + bias)."""
        h, m = self.hidden, self.mlp
        return 4 * (h * h + h) + (h * m + m) + (m * h + h) + 2 * 2 * h

    def embed_params(self) -> int:
        """Patch Conv2d (with bias) plus the learned position table."""
        return self.channels * self.patch**2 * self.hidden + self.hidden + self.positions * self.hidden

    def params(self) -> int:
        """Parameters a forward uses (post_layernorm is loaded but unused by LaViDa, so excluded)."""
        return self.embed_params() + self.layers * self.layer_params()


@dataclass(frozen=True)
class ProjectorDims:
    """mlp2x_gelu: Linear(1152→4096) · GELU · Linear(4096→4096), both with bias."""

    d_in: int = 1152
    hidden: int = 4096
    d_out: int = 4096

    def params(self) -> int:
        return self.d_in * self.hidden + self.hidden + self.hidden * self.d_out + self.d_out


@dataclass(frozen=True)
class LMDims:
    """LLaDA-8B: llama-style blocks, SwiGLU MLP (gate, up, down), RMSNorm, untied head, no biases."""

    d_model: int = 4096
    layers: int = 32
    heads: int = 32
    kv_heads: int = 32
    mlp: int = 12288
    vocab: int = LLADA_EMBEDDING_SIZE
    tied_head: bool = False

    @property
    def kv_width(self) -> int:
        return self.kv_heads * (self.d_model // self.heads)

    def layer_params(self) -> int:
        d = self.d_model
        return 2 * d * d + 2 * d * self.kv_width + 3 * d * self.mlp + 2 * d

    def params(self) -> int:
        embed = self.vocab * self.d_model
        head = 0 if self.tied_head else embed
        return embed + self.layers * self.layer_params() + self.d_model + head


@dataclass(frozen=True)
class ModelDims:
    vision: VisionDims = field(default_factory=VisionDims)
    projector: ProjectorDims = field(default_factory=ProjectorDims)
    lm: LMDims = field(default_factory=LMDims)
    dtype_bytes: int = 2  # bf16 weights and activations


@dataclass(frozen=True)
class Gpu:
    name: str
    peak_flops: float  # dense bf16, FLOP/s
    bandwidth: float  # HBM, bytes/s


GPUS = {
    "a100": Gpu("A100-80GB", 312e12, 2.0e12),
    "h100": Gpu("H100-SXM", 989e12, 3.35e12),
}


@dataclass(frozen=True)
class Cost:
    """FLOPs and bytes of one stage; weight and activation traffic kept apart for the memory story."""

    flops: float = 0.0
    weight_bytes: float = 0.0
    act_bytes: float = 0.0

    @property
    def bytes(self) -> float:
        return self.weight_bytes + self.act_bytes

    @property
    def intensity(self) -> float:
        """FLOPs per byte moved; below the GPU's peak_flops / bandwidth the stage is memory-bound."""
        return self.flops / self.bytes if self.bytes else float("inf")

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.flops + other.flops, self.weight_bytes + other.weight_bytes,
                    self.act_bytes + other.act_bytes)

    def times(self, k: int) -> Cost:
        return Cost(k * self.flops, k * self.weight_bytes, k * self.act_bytes)

    def seconds(self, gpu: Gpu) -> float:
        return max(self.flops / gpu.peak_flops, self.bytes / gpu.bandwidth)

    def bound(self, gpu: Gpu) -> str:
        return "compute" if self.flops / gpu.peak_flops >= self.bytes / gpu.bandwidth else "memory"


def total(costs: Iterable[Cost]) -> Cost:
    out = Cost()
    for c in costs:
        out = out + c
    return out


# ---------------------------------------------------------------------------------------------
# Op-level formulas


def linear(tokens: int, d_in: int, d_out: int, dtype_bytes: int, bias: bool = False) -> Cost:
    """y = x Wᵀ (+ b): reads x and W (and b), writes y."""
    weights = d_in * d_out + (d_out if bias else 0)
    return Cost(
        flops=2 * tokens * d_in * d_out,
        weight_bytes=weights * dtype_bytes,
        act_bytes=tokens * (d_in + d_out) * dtype_bytes,
    )


def attention(q_tokens: int, kv_tokens: int, width: int, kv_width: int, dtype_bytes: int,
              heads: int = 0, score_bytes: int = 0) -> Cost:
    """softmax(QKᵀ)V for Tq queries over Tk keys; score_bytes > 0 means an eager kernel that
    materialises the [heads, Tq, Tk] scores (write + read) and probabilities (write + read)."""
    act = (2 * q_tokens * width + 2 * kv_tokens * kv_width) * dtype_bytes
    if score_bytes:
        act += heads * q_tokens * kv_tokens * 2 * (score_bytes + dtype_bytes)
    return Cost(flops=4 * q_tokens * kv_tokens * width, act_bytes=act)


def norm_weights(width: int, dtype_bytes: int, bias: bool = False) -> Cost:
    """A norm's only counted traffic is its weight (its activation pass is fused)."""
    return Cost(weight_bytes=(2 if bias else 1) * width * dtype_bytes)


# ---------------------------------------------------------------------------------------------
# Stage formulas


def siglip_call(dims: ModelDims, views: int, side: int) -> Cost:
    """One tower call on `views` square views of `side` px, batched (weights read once)."""
    v, b = dims.vision, dims.dtype_bytes
    t = views * v.tokens(side)
    embed = linear(t, v.channels * v.patch**2, v.hidden, b, bias=True) + Cost(
        weight_bytes=v.positions * v.hidden * b
    )
    per_layer = total([
        norm_weights(v.hidden, b, bias=True).times(2),
        linear(t, v.hidden, v.hidden, b, bias=True).times(4),
        attention(v.tokens(side), v.tokens(side), v.hidden, v.hidden, b, v.heads, v.score_bytes).times(views),
        linear(t, v.hidden, v.mlp, b, bias=True),
        linear(t, v.mlp, v.hidden, b, bias=True),
    ])
    return embed + per_layer.times(v.layers)


def shirg_selection(dims: ModelDims, tokens: int) -> Cost:
    """SHIRG v2 scores over the foveal tokens: recompute the last kept layer's q/k, the scores
    QKᵀ (materialised in fp32, since the attention *received* needs a column sum of the softmax),
    then two matrix-vector cosines in LM space (question relevance, diversity). Top-K is free."""
    v, b = dims.vision, dims.dtype_bytes
    qk = linear(tokens, v.hidden, v.hidden, b, bias=True).times(2)
    scores = Cost(
        flops=2 * tokens * tokens * v.hidden,
        act_bytes=2 * tokens * v.hidden * b + v.heads * tokens * tokens * 2 * v.score_bytes,
    )
    d_lm = dims.projector.d_out
    cosines = Cost(flops=2 * 2 * tokens * d_lm, act_bytes=2 * tokens * d_lm * b)
    return qk + scores + cosines


def projector(dims: ModelDims, tokens: int) -> Cost:
    p, b = dims.projector, dims.dtype_bytes
    return linear(tokens, p.d_in, p.hidden, b, bias=True) + linear(tokens, p.hidden, p.d_out, b, bias=True)


def lm_forward(dims: ModelDims, q_tokens: int, kv_tokens: int, logit_tokens: int,
               embed_tokens: int = 0) -> Cost:
    """One LLaDA forward: `q_tokens` run through the blocks and attend to `kv_tokens` keys
    (kv_tokens - q_tokens of them come from the prefix cache); `embed_tokens` text ids are
    gathered from the embedding table; logits for `logit_tokens` slots."""
    lm, b = dims.lm, dims.dtype_bytes
    d, t = lm.d_model, q_tokens
    per_layer = total([
        norm_weights(d, b).times(2),
        linear(t, d, d, b),  # q
        linear(t, d, lm.kv_width, b).times(2),  # k, v (their outputs are what a cache keeps)
        attention(t, kv_tokens, d, lm.kv_width, b),
        linear(t, d, d, b),  # attn_out
        linear(t, d, lm.mlp, b).times(2),  # gate, up
        linear(t, lm.mlp, d, b),  # down
    ])
    cost = per_layer.times(lm.layers) + norm_weights(d, b)
    cost = cost + Cost(weight_bytes=embed_tokens * d * b, act_bytes=embed_tokens * d * b)
    if logit_tokens:
        cost = cost + linear(logit_tokens, d, lm.vocab, b)
    return cost


# ---------------------------------------------------------------------------------------------
# Methods


def square_hd_tokens(side: int) -> int:
    """LM image tokens for a square HD image (5 views, spatial_unpad): base side² plus a
    2side×2side grid with one newline per row (upstream's spatial_unpad merge)."""
    return side * side + 2 * side * (2 * side + 1)


@dataclass(frozen=True)
class Method:
    """What a method costs outside the LM and how many visual tokens the LM gets."""

    name: str
    tower_calls: tuple[tuple[int, int], ...]  # (views, side px) per SigLIP call
    lm_visual_tokens: int
    scored_tokens: int = 0  # tokens SHIRG scores; 0 = no modelled selection stage

    def projected_tokens(self, dims: ModelDims) -> int:
        return sum(views * dims.vision.tokens(side) for views, side in self.tower_calls)


def registry_methods() -> dict[str, Method]:
    """Every registered prune method's cost profile, from what its registration declares: the
    SigLIP calls it makes (`tower_views`), and the LM tokens it yields for a square HD image --
    LaViDa's pooled / unpooled merge counts, or the budget. A method with its own views and a
    selection scores its last view (SHIRG: the 1024 foveal tokens); the baselines' own selection
    cost is not modelled."""
    from shirg_patches import REGISTRY

    out = {}
    for name, m in REGISTRY.items():
        if m.select is not None:
            tokens = TOKEN_BUDGET
        else:
            tokens = square_hd_tokens(POOLED_GRID if m.pool is not False else SIGLIP_GRID)
        scored = ((m.tower_views[-1][1] // SIGLIP_PATCH_SIZE) ** 2) if (m.encode and m.select) else 0
        out[name] = Method(name, tuple(m.tower_views), tokens, scored_tokens=scored)
    return out


@dataclass(frozen=True)
class Row:
    stage: str
    method: str
    cost: Cost
    seconds: float  # stage roofline, or the sum of its parts' rooflines for a whole answer
    bound: str  # "compute" / "memory" for a stage, "mixed" for a sum of stages


def method_rows(method: Method, dims: ModelDims, gpu: Gpu, gen_length: int, steps: int,
                text_tokens: int) -> list[Row]:
    """Every stage of one answer for `method`; P = visual + text prompt tokens, Q = gen_length."""
    p, q = method.lm_visual_tokens + text_tokens, gen_length
    stages = [("siglip", total(siglip_call(dims, v, s) for v, s in method.tower_calls))]
    if method.scored_tokens:
        stages.append(("select", shirg_selection(dims, method.scored_tokens)))
    stages += [
        ("projector", projector(dims, method.projected_tokens(dims))),
        ("prefill", lm_forward(dims, p, p, 0, embed_tokens=text_tokens)),
        ("step cached", lm_forward(dims, q, p + q, q, embed_tokens=q)),
        ("step uncached", lm_forward(dims, p + q, p + q, q, embed_tokens=q)),
    ]
    rows = [Row(name, method.name, c, c.seconds(gpu), c.bound(gpu)) for name, c in stages]
    by = {r.stage: r for r in rows}
    front = [r for r in rows if r.stage in ("siglip", "select", "projector")]

    def composite(name: str, parts: list[tuple[Row, int]]) -> Row:
        cost = total(r.cost.times(k) for r, k in parts)
        return Row(name, method.name, cost, sum(r.seconds * k for r, k in parts), "mixed")

    lm_cached = [(by["prefill"], 1), (by["step cached"], steps)]
    lm_uncached = [(by["step uncached"], steps)]
    rows += [
        composite("LM answer cached", lm_cached),
        composite("LM answer uncached", lm_uncached),
        composite("total cached", [(r, 1) for r in front] + lm_cached),
        composite("total uncached", [(r, 1) for r in front] + lm_uncached),
    ]
    return rows


# ---------------------------------------------------------------------------------------------
# CLI

_HEADER = ("stage", "method", "GFLOPs", "GB moved", "FLOP/B", "est. ms", "bound")


def _cells(row: Row) -> tuple[str, ...]:
    c = row.cost
    return (row.stage, row.method, f"{c.flops / 1e9:,.1f}", f"{c.bytes / 1e9:,.3f}",
            f"{c.intensity:,.1f}", f"{row.seconds * 1e3:,.2f}", row.bound)


def format_table(rows: list[Row]) -> str:
    cells = [_HEADER] + [_cells(r) for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(_HEADER))]
    left = {0, 1, 6}

    def fmt(line: tuple[str, ...]) -> str:
        padded = (s.ljust(w) if i in left else s.rjust(w) for i, (s, w) in enumerate(zip(line, widths)))
        return "  ".join(padded)

    lines = [fmt(cells[0]), "  ".join("-" * w for w in widths)]
    lines += [fmt(line) for line in cells[1:]]
    return "\n".join(line.rstrip() for line in lines)


def write_csv(path: str, rows: list[Row], gpu: Gpu) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["stage", "method", "flops", "bytes", "weight_bytes", "act_bytes",
                    "intensity", "est_ms", "bound", "gpu"])
        for r in rows:
            c = r.cost
            w.writerow([r.stage, r.method, c.flops, c.bytes, c.weight_bytes, c.act_bytes,
                        c.intensity, r.seconds * 1e3, r.bound, gpu.name])


# ---------------------------------------------------------------------------------------------
# Training memory per GPU (bf16 mixed precision as DeepSpeed runs it: bf16 weights and gradients,
# fp32 master copy + AdamW m and v = 12 B per trainable parameter, complementary masking = 2 LM rows
# per sample). Activations are what autograd keeps for the backward, in bf16:
# * LLaDA block, per token: attn_norm in/out, q k v (fused attention keeps them + its output), the
#   attention output, ff_norm in/out, gate, SiLU(gate), up, their product = 7·d + 4·mlp values. With
#   gradient checkpointing only each block's input (d) is kept, plus one block recomputed in the backward.
# * LM head: the objective computes logits only on its supervised slots, each answer target once across the
#   two copies (answer_tokens·vocab, transient).
# * SigLIP (eager attention, fp32 softmax), per token per layer: LN1 in/out, q k v, attention output,
#   LN2 in/out, fc1 out, GELU out = 8·h + 2·mlp values, plus per head a T×T fp32 softmax output and its
#   bf16 copy. Kept for all 26 layers whenever the backward reaches the tower (full training, or LoRA
#   inside it); the trainer checkpoints only the LLaDA blocks.


NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit weights + 8-bit absmax per 64 + fp32 per 256 absmax (double quant)


@dataclass(frozen=True)
class TrainMode:
    name: str
    method: str  # prune method: its views and LM visual tokens
    trainable: int
    lm_linear_bytes: float  # bytes per weight of the LLaDA block linears (2 = bf16, NF4_BYTES = 4-bit)
    vision_backward: bool
    zero3: bool = True  # bitsandbytes 4-bit weights cannot be partitioned by ZeRO-3


def shirg_lora_params(dims: ModelDims, r: int = 64) -> int:
    """scripts/lora_shirg.yaml: SigLIP layers 0-3 q/k/v, 4-5 q/k, projector .0 and .2, rank r."""
    h, p = dims.vision.hidden, dims.projector
    return 16 * r * (h + h) + r * (p.d_in + p.hidden) + r * (p.hidden + p.d_out)


def model_params(dims: ModelDims) -> int:
    """Everything the trainer can train: SigLIP (26 layers, no post_layernorm), projector, LLaDA, image_newline."""
    return dims.vision.params() + dims.projector.params() + dims.lm.params() + dims.lm.d_model


def lm_linear_params(dims: ModelDims) -> int:
    return dims.lm.layers * (dims.lm.layer_params() - 2 * dims.lm.d_model)


def train_modes(dims: ModelDims) -> list[TrainMode]:
    lora = shirg_lora_params(dims)
    return [TrainMode("full (pool)", "pool", model_params(dims), 2, True),
            TrainMode("LoRA (shirg)", "shirg", lora, 2, True),
            TrainMode("LoRA+4bit (shirg)", "shirg", lora, NF4_BYTES, True, zero3=False)]


def train_activation_bytes(dims: ModelDims, method: Method, text_tokens: int, answer_tokens: int,
                           checkpointing: bool, vision_backward: bool = True) -> dict[str, float]:
    """Activation bytes kept for the backward of ONE sample: LM body, LM head logits, SigLIP."""
    lm, v, b = dims.lm, dims.vision, dims.dtype_bytes
    rows = 2 * (method.lm_visual_tokens + text_tokens + answer_tokens)
    block = (7 * lm.d_model + 4 * lm.mlp) * b
    body = rows * (lm.layers * lm.d_model * b + block) if checkpointing else rows * lm.layers * block
    head = answer_tokens * lm.vocab * b  # the head runs on the supervised slots only
    vision = 0.0
    if vision_backward:
        for views, side in method.tower_calls:
            t = v.tokens(side)
            per_layer = t * (8 * v.hidden + 2 * v.mlp) * b + v.heads * t * t * (v.score_bytes + b)
            vision += views * v.layers * per_layer
    return {"lm": body, "head": head, "vision": vision, "total": body + head + vision}


def train_memory_rows(dims: ModelDims, world: int = 8, micro_batch: int = 4, text_tokens: int = 60,
                      answer_tokens: int = 64) -> list[dict]:
    """Per-GPU bytes for each training mode: weights, gradients + optimizer, activations, ZeRO-2 / ZeRO-3."""
    methods = registry_methods()
    total_params = model_params(dims)
    rows = []
    for mode in train_modes(dims):
        linear = lm_linear_params(dims)
        weights = (total_params - linear) * 2 + linear * mode.lm_linear_bytes
        grads, optim = 2 * mode.trainable, 12 * mode.trainable
        method = methods[mode.method]
        act = {ck: train_activation_bytes(dims, method, text_tokens, answer_tokens, ck, mode.vision_backward)
               for ck in (False, True)}
        gathered = 2 * max(dims.lm.vocab * dims.lm.d_model, dims.lm.layer_params())  # ZeRO-3's largest module
        batch_act = micro_batch * act[True]["total"]
        zero2 = weights + (grads + optim) / world + batch_act
        zero3 = (weights + grads + optim) / world + gathered + batch_act if mode.zero3 else None
        rows.append({"mode": mode.name, "method": mode.method, "trainable": mode.trainable,
                     "params": total_params, "weights": weights, "grads": grads, "optimizer": optim,
                     "act_ckpt": act[True], "act_full": act[False], "zero2": zero2, "zero3": zero3,
                     "world": world, "micro_batch": micro_batch})
    return rows


def format_train_memory(rows: list[dict], gpu_bytes: float = 80e9) -> str:
    g = 1e9
    r0 = rows[0]
    head = (f"Training memory per GPU at LaViDa-8B dims ({r0['params'] / 1e9:.3f} B parameters), bf16 weights/grads, "
            f"fp32 AdamW state (12 B per trainable), {r0['world']} GPUs, micro-batch {r0['micro_batch']} with "
            "gradient checkpointing on the LLaDA blocks; GB = 1e9 bytes")
    cols = f"{'mode':<19}{'trainable':>15}{'weights':>9}{'grad+opt':>10}{'act/sample':>12}{'act/s ckpt':>12}" \
           f"{'  of which vision':>18}{'ZeRO-2/GPU':>12}{'ZeRO-3/GPU':>12}"
    lines = [head, cols]
    for r in rows:
        z3 = "n/a" if r["zero3"] is None else f"{r['zero3'] / g:.1f}"
        fits = lambda x: "" if x is None or x <= gpu_bytes else "!"  # noqa: E731
        lines.append(f"{r['mode']:<19}{r['trainable']:>15,}{r['weights'] / g:>9.1f}"
                     f"{(r['grads'] + r['optimizer']) / g:>10.1f}{r['act_full']['total'] / g:>12.1f}"
                     f"{r['act_ckpt']['total'] / g:>12.1f}{r['act_ckpt']['vision'] / g:>18.1f}"
                     f"{r['zero2'] / g:>11.1f}{fits(r['zero2']) or ' '}{z3:>11}{fits(r['zero3']) or ' '}")
    lines.append(f"! = over {gpu_bytes / g:.0f} GB. act/sample includes the transient logits of the supervised slots "
                 "(each answer target once); ZeRO-3 adds the largest gathered module (the 126k x 4096 LM head).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m llava.eval.costmodel", description=__doc__.split("\n")[0])
    ap.add_argument("--gen-length", type=int, default=32, help="response slots Q (README speed setting: 32)")
    ap.add_argument("--steps", type=int, default=16, help="diffusion steps S per answer")
    ap.add_argument("--text-tokens", type=int, default=60,
                    help="text tokens in the prompt (system + question)")
    ap.add_argument("--gpu", choices=sorted(GPUS), default="a100")
    methods = registry_methods()
    ap.add_argument("--methods", default="pool,full,shirg", help=f"comma list of {', '.join(methods)}")
    ap.add_argument("--csv", metavar="PATH", help="also write every row to this CSV file")
    ap.add_argument("--train", action="store_true", help="only the training-memory table (8 x 80 GB)")
    args = ap.parse_args(argv)
    if args.train:
        print(format_train_memory(train_memory_rows(ModelDims(), text_tokens=args.text_tokens)))
        return 0

    names = [n.strip() for n in args.methods.split(",") if n.strip()]
    unknown = [n for n in names if n not in methods]
    if unknown:
        ap.error(f"unknown method(s) {unknown}; choose from {list(methods)}")
    dims, gpu = ModelDims(), GPUS[args.gpu]

    def run(name: str) -> list[Row]:
        return method_rows(methods[name], dims, gpu, args.gen_length, args.steps, args.text_tokens)

    per_method = {n: run(n) for n in names}
    rows = [r for n in names for r in per_method[n]]

    print(f"LaViDa cost model on {gpu.name} ({gpu.peak_flops / 1e12:.0f} TFLOP/s bf16, "
          f"{gpu.bandwidth / 1e12:.2f} TB/s; ridge {gpu.peak_flops / gpu.bandwidth:.0f} FLOP/B), batch 1, "
          f"gen_length {args.gen_length}, steps {args.steps}, text tokens {args.text_tokens}")
    print(f"params: SigLIP-26L {dims.vision.params() / 1e6:.1f} M, "
          f"projector {dims.projector.params() / 1e6:.1f} M, "
          f"LLaDA {dims.lm.params() / 1e9:.3f} B ({dims.lm.params() * dims.dtype_bytes / 1e9:.2f} GB bf16)")
    print("LM visual tokens: " + ", ".join(
        f"{n} {methods[n].lm_visual_tokens} (SigLIP {methods[n].projected_tokens(dims)})" for n in names))
    print()
    print(format_table(rows))
    print()

    ref = {r.stage: r.seconds for r in (per_method.get("pool") or run("pool"))}
    print(f"Summary (est. ms per answer on {gpu.name}, vision + LM; ratio to pool at the same setting):")
    for n in names:
        t = {r.stage: r.seconds for r in per_method[n]}
        c, u = t["total cached"], t["total uncached"]
        print(f"  {n:<10} cached {c * 1e3:8.1f} ms ({c / ref['total cached']:.2f}x pool)   "
              f"uncached {u * 1e3:8.1f} ms ({u / ref['total uncached']:.2f}x pool)   "
              f"cache speed-up {u / c:.2f}x")
    step = next(r.cost for r in per_method[names[0]] if r.stage == "step cached")
    print(f"A cached step moves {step.bytes / 1e9:.1f} GB ({step.weight_bytes / 1e9:.1f} GB of it weights) "
          f"for "
          f"{step.flops / 1e9:.0f} GFLOPs: {step.intensity:.0f} FLOP/B against a ridge of "
          f"{gpu.peak_flops / gpu.bandwidth:.0f}, so at batch 1 the step is {step.bound(gpu)}-bound.")
    if args.csv:
        write_csv(args.csv, rows, gpu)
        print(f"wrote {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
