"""LLaDA masked-diffusion sampler (semi-autoregressive blocks, confidence-based unmasking).

The answer starts as L mask tokens split into blocks. Blocks are decoded left to right; within a block
every step predicts all slots and commits the k most confident masked ones of the current block, k
following an unmask-count schedule. With the prefix cache the prompt is encoded once and each step
runs only the L response slots; without it each step re-runs [prompt; response] (upstream's full mode).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from llava.errors import InputError
from llava.utils import synced_now

from .modeling_llada import LLaDAModel, PrefixCache, PruneHook

SCHEDULES = ("linear", "shift", "cosine", "logit_normal")
REMASKING = ("low_confidence", "random", "entropy", "margin")
REMASKING_ALIASES = {"entrophy": "entropy"}  # upstream's spelling


def _schedule_curve(schedule: str, t: torch.Tensor, schedule_kwargs: dict) -> torch.Tensor:
    """Fraction of the block unmasked at time t, in float32 exactly as upstream evaluates it."""
    if schedule == "shift":
        alpha = schedule_kwargs.get("shift", 3.0)
        return alpha * t / (1 + (alpha - 1) * t)
    if schedule == "cosine":
        return 1 - 0.5 * (1 + torch.cos(math.pi * t))
    if schedule == "logit_normal":
        # logit(0) = -inf and logit(1) = +inf, which ndtr maps exactly to 0 and 1
        return torch.special.ndtr(torch.logit(t))
    return t


def canonical_schedule(schedule: Optional[str]) -> Optional[str]:
    """A schedule name as the sampler takes it: None (or "none", any case) is the even split."""
    if schedule is None or (isinstance(schedule, str) and schedule.lower() == "none"):
        return None
    if schedule not in SCHEDULES:
        raise InputError(f"unknown --schedule {schedule!r}; choose one of: none (the even split, default), "
                         f"{', '.join(SCHEDULES)}")
    return schedule


def _check_schedule(schedule: Optional[str], schedule_kwargs: Optional[dict]) -> dict:
    schedule = canonical_schedule(schedule)
    kwargs = dict(schedule_kwargs or {})
    unknown = sorted(set(kwargs) - {"shift"})
    if unknown:
        raise InputError(f"unknown schedule option(s) {', '.join(unknown)}; only 'shift' is supported")
    shift = kwargs.get("shift", 1.0)
    if not _finite_number(shift) or shift <= 0:
        raise InputError(f"--shift must be a positive finite number, got {kwargs['shift']!r}")
    if "shift" in kwargs and schedule != "shift":
        # it would be silently ignored
        raise InputError(f"--shift only applies to --schedule shift (the schedule is {schedule or 'none'}); "
                         "add --schedule shift or drop --shift")
    return kwargs


def _finite_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def check_sampling(
    temperature: float, remasking: str, schedule: Optional[str] = None, schedule_kwargs: Optional[dict] = None
) -> tuple[str, dict]:
    """Validate the sampler's options (the CLI calls this before loading the model); returns the canonical
    remasking name and the schedule options. A NaN or infinite temperature would make every Gumbel-max
    score NaN and the answer silently empty."""
    if not _finite_number(temperature) or temperature < 0:
        raise InputError(f"--temperature must be a finite number >= 0, got {temperature!r}")
    schedule_kwargs = _check_schedule(schedule, schedule_kwargs)
    canonical = REMASKING_ALIASES.get(remasking, remasking)
    if canonical not in REMASKING:
        raise InputError(f"unknown remasking {remasking!r}; choose one of: {', '.join(REMASKING)}")
    return canonical, schedule_kwargs


def num_transfer_tokens(
    masked: int, steps: int, schedule: Optional[str] = None, schedule_kwargs: Optional[dict] = None
) -> list[int]:
    """How many masked slots to commit at each of `steps` steps of a block holding `masked` masks.

    schedule=None (or "none"): even split, the first (masked % steps) steps take one extra.
    Any schedule name (including "linear"): cumulative counts trunc(f(t) * masked) on a float32 grid of
    min(steps, masked) + 1 points, per-step differences clamped to >= 1, then decremented cyclically from
    the front until they sum to `masked`, then reversed (step 0 is t near 1). The float32 arithmetic is
    load-bearing: shift 0.33 and shift 1/3 give different counts.

    Two deviations from upstream, neither affecting its working cases: when steps > masked the list is
    padded with zeros to `steps` (upstream indexes past it and crashes), and if float32 rounding makes
    the counts fall short of `masked` (e.g. shift 0.1, where f(1) < 1) the shortfall goes to the last step,
    so a block never ends with masks left.
    """
    kwargs = _check_schedule(schedule, schedule_kwargs)
    schedule = canonical_schedule(schedule)
    if steps < 1 or masked < 0:
        raise InputError(f"need steps >= 1 and masked >= 0, got steps={steps}, masked={masked}")
    if schedule is None:
        base, rem = divmod(masked, steps)
        return [base + 1 if i < rem else base for i in range(steps)]
    n = min(steps, masked)
    t = torch.linspace(0, 1, n + 1, dtype=torch.float32)
    cumulative = (_schedule_curve(schedule, t, kwargs) * masked).to(torch.int64)
    counts = (cumulative[1:] - cumulative[:-1]).clamp(min=1).tolist()
    j = 0
    while sum(counts) > masked:
        if counts[j] > 1:
            counts[j] -= 1
        j = (j + 1) % n
    counts.reverse()
    if counts:
        counts[-1] += masked - sum(counts)
    return counts + [0] * (steps - n)


MAX_DEFAULT_BLOCK = 128  # LaViDa's block length; shorter answers are one block


def default_block_length(gen_length: int) -> int:
    """The block length when none is given: min(128, gen_length)."""
    return min(MAX_DEFAULT_BLOCK, gen_length)


def steps_per_block(
    gen_length: int,
    block_length: Optional[int],
    steps: Optional[int] = None,
    step_per_block: Optional[int] = None,
    step_ratio: Optional[float] = None,
) -> int:
    """Diffusion steps S spent on each block.

    default:          S = block_length (one token per step)
    steps=N:          N is the total for the whole answer, S = N / num_blocks (must divide evenly, N <= gen_length)
    step_per_block=N: S = min(N, block_length)
    step_ratio=r:     S = floor(block_length * r), 0 < r <= 1
    At most one of the three may be given. Upstream ignores `steps`; here it is honoured.
    block_length=None is `default_block_length(gen_length)`, and an error about it says so.
    """
    if block_length is None:
        if gen_length < 1:
            raise InputError(f"--gen-length must be positive, got {gen_length}")
        block_length = default_block_length(gen_length)
        if gen_length % block_length:
            fits = max(d for d in range(1, block_length + 1) if gen_length % d == 0)
            raise InputError(
                f"--gen-length {gen_length} is not a multiple of the default block length {block_length} "
                f"(no --block-length was given); give a --block-length that divides it (e.g. --block-length {fits}) "
                f"or a --gen-length that is a multiple of {block_length}"
            )
    if gen_length < 1 or block_length < 1:
        raise InputError(f"--gen-length and --block-length must be positive, got {gen_length} and {block_length}")
    if gen_length % block_length:
        raise InputError(f"--gen-length {gen_length} is not divisible by --block-length {block_length}")
    options = {"steps": steps, "step_per_block": step_per_block, "step_ratio": step_ratio}
    given = [name for name, value in options.items() if value is not None]
    if len(given) > 1:
        raise InputError(f"give at most one of steps / step_per_block / step_ratio, got {' and '.join(given)}")
    num_blocks = gen_length // block_length
    if steps is not None:
        if not 1 <= steps <= gen_length or steps % num_blocks:
            raise InputError(
                f"--steps {steps} must be between 1 and --gen-length {gen_length} "
                f"and divisible by the {num_blocks} block(s)"
            )
        return steps // num_blocks
    if step_per_block is not None:
        if step_per_block < 1:
            raise InputError(f"--step-per-block must be >= 1, got {step_per_block}")
        return min(step_per_block, block_length)
    if step_ratio is not None:
        s = math.floor(block_length * step_ratio)
        if not 0 < step_ratio <= 1 or s < 1:
            raise InputError(f"--step-ratio {step_ratio} must be in (0, 1] and leave at least one step per block")
        return s
    return block_length


def sample_tokens(logits: torch.Tensor, temperature: float, generator: Optional[torch.Generator]) -> torch.Tensor:
    """argmax at temperature 0; otherwise float64 Gumbel-max, exp(logits) / (-log u)^temperature,
    which samples from softmax(logits / temperature)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.double()
    u = torch.rand(logits.shape, generator=generator, dtype=torch.float64, device=logits.device)
    return (logits.exp() / (-torch.log(u)) ** temperature).argmax(dim=-1)


def confidence(
    logits: torch.Tensor, x0: torch.Tensor, remasking: str, generator: Optional[torch.Generator]
) -> torch.Tensor:
    """Per-slot confidence [B, T] (higher = commit first), from the un-tempered float64 softmax."""
    if remasking == "random":
        return torch.rand(x0.shape, generator=generator, dtype=torch.float64, device=x0.device)
    p = torch.softmax(logits.double(), dim=-1)
    if remasking == "low_confidence":
        return p.gather(-1, x0.unsqueeze(-1)).squeeze(-1)
    if remasking == "entropy":
        return (p * torch.log(p + 1e-10)).sum(-1)
    top2 = p.topk(2, dim=-1).values
    return top2[..., 0] - top2[..., 1]


@dataclass
class GenerationOutput:
    tokens: torch.Tensor  # [B, L] response ids only
    nfe: int  # forward passes, prefill included
    prefill_seconds: float = 0.0
    step_seconds: list[float] = field(default_factory=list)
    prefix_cache: Optional[PrefixCache] = None


@torch.no_grad()
def generate(
    model: LLaDAModel,
    prompt_embeds: torch.Tensor,
    *,
    gen_length: int = 128,
    block_length: int = 128,
    steps: Optional[int] = None,
    step_per_block: Optional[int] = None,
    step_ratio: Optional[float] = None,
    temperature: float = 0.0,
    remasking: str = "low_confidence",
    mask_id: Optional[int] = None,
    prefix_cache: bool = True,
    schedule: Optional[str] = None,
    schedule_kwargs: Optional[dict] = None,
    generator: Optional[torch.Generator] = None,
    prune_hook: Optional[PruneHook] = None,
    on_step: Optional[Callable[[int, torch.Tensor, Optional[PrefixCache]], None]] = None,
    prompt_lengths: Optional[Sequence[int]] = None,
) -> GenerationOutput:
    """Generate `gen_length` tokens after `prompt_embeds` [B, P, D].

    prefix_cache=True: one prompt-only `prefill` (where `prune_hook` may drop prompt tokens), then each step
    runs only the response slots against the fixed cache. prefix_cache=False: each step runs the full
    [prompt; response] sequence, the prompt also seeing the response. Steps whose block has no masks left
    are skipped and not counted. `on_step(step_index, tokens, cache)` is called after every executed step
    with the live [B, L] canvas (clone it to keep it). A `generator` must live on the prompt's device.

    `prompt_lengths` (one per row) marks a right-padded batch of prompts of different lengths (see
    `generate_batch`). Every row is sampled exactly as alone: its answer sits right after its own prompt,
    it sees only its real prompt tokens, and its unmask counts come from its own masks (per row, as
    always). A step runs while any row of the block still has masks; rows already done commit nothing,
    so at temperature 0 each row's answer equals its batch-1 answer (with temperature > 0 the random
    draws are shared by the batch, so samples differ from batch-1 ones).
    """
    S = steps_per_block(gen_length, block_length, steps, step_per_block, step_ratio)
    remasking, schedule_kwargs = check_sampling(temperature, remasking, schedule, schedule_kwargs)
    if prune_hook is not None and not prefix_cache:
        raise InputError("pruning inside the LM needs the prefix cache (prefix_cache=True)")
    mask_id = model.config.mask_token_id if mask_id is None else mask_id
    B, P, _ = prompt_embeds.shape
    device = prompt_embeds.device
    tokens = torch.full((B, gen_length), mask_id, dtype=torch.long, device=device)
    ragged = None
    if prompt_lengths is not None:
        if prune_hook is not None:
            raise InputError("pruning inside the LM runs one prompt at a time; it cannot take a padded batch")
        ragged = [int(n) for n in prompt_lengths]
        if len(ragged) != B or any(not 1 <= n <= P for n in ragged):
            raise InputError(f"prompt_lengths {ragged} must give one length in [1, {P}] per prompt of the batch")
        if all(n == P for n in ragged):
            ragged = None  # nothing padded: the plain batched path

    cache, nfe, prefill_seconds, step_seconds = None, 0, 0.0, []
    if prefix_cache:
        t0 = synced_now(device)
        cache = model.prefill(prompt_embeds, prune_hook) if ragged is None else model.prefill(
            prompt_embeds, lengths=ragged)
        prefill_seconds = synced_now(device) - t0
        nfe += 1

    for start in range(0, gen_length, block_length):
        end = start + block_length
        masked = (tokens[:, start:end] == mask_id).sum(dim=1).tolist()
        counts = torch.tensor([num_transfer_tokens(m, S, schedule, schedule_kwargs) for m in masked], device=device)
        for i in range(S):
            in_block = tokens[:, start:end] == mask_id
            if not in_block.any():
                continue
            t0 = synced_now(device)
            response = model.embed_tokens(tokens)
            if cache is not None:
                logits = model(response, prefix_cache=cache)
            elif ragged is None:
                logits = model(torch.cat([prompt_embeds, response], dim=1))[:, P:]
            else:
                logits = _uncached_ragged_logits(model, prompt_embeds, response, ragged)
            # slots outside the current block are never committed, so only its logits matter
            block_logits = logits[:, start:end]
            x0 = sample_tokens(block_logits, temperature, generator)
            conf = confidence(block_logits, x0, remasking, generator)
            conf = conf.masked_fill(~in_block, -math.inf)
            # top-k[i] per row; a stable sort breaks ties toward the earlier slot
            order = conf.argsort(dim=1, descending=True, stable=True)
            ranks = torch.empty_like(order).scatter_(1, order, torch.arange(block_length, device=device).expand(B, -1))
            commit = (ranks < counts[:, i : i + 1]) & in_block
            tokens[:, start:end] = torch.where(commit, x0, tokens[:, start:end])
            nfe += 1
            step_seconds.append(synced_now(device) - t0)
            if on_step is not None:
                on_step(len(step_seconds) - 1, tokens, cache)

    return GenerationOutput(tokens, nfe, prefill_seconds, step_seconds, cache)


def _uncached_ragged_logits(model, prompt_embeds, response, lengths) -> torch.Tensor:
    """Full recompute for a right-padded batch: row b is [prompt_b; response_b; padding], so each real token
    has its batch-1 slot and position; returns the response logits [B, L, V]."""
    B, P, D = prompt_embeds.shape
    L = response.shape[1]
    full = torch.cat([prompt_embeds, prompt_embeds.new_zeros(B, L, D)], dim=1)
    for b, n in enumerate(lengths):
        full[b, n : n + L] = response[b]
    logits = model(full, lengths=[n + L for n in lengths])
    return torch.stack([logits[b, n : n + L] for b, n in enumerate(lengths)])


def pad_prompts(prompts: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
    """Prompt embeddings of different lengths ([P_b, D] or [1, P_b, D] each) -> right-padded [B, P_max, D]
    (zeros in the padding) and the real lengths."""
    if not prompts:
        raise InputError("generate_batch needs at least one prompt")
    rows = [p.reshape(-1, p.shape[-1]) for p in prompts]
    lengths = [r.shape[0] for r in rows]
    out = rows[0].new_zeros(len(rows), max(lengths), rows[0].shape[-1])
    for b, r in enumerate(rows):
        out[b, : lengths[b]] = r
    return out, lengths


@torch.no_grad()
def generate_batch(model: LLaDAModel, prompts: Sequence[torch.Tensor], **kwargs) -> GenerationOutput:
    """`generate` for B prompts of possibly different lengths: right-pads them (`pad_prompts`) and samples all
    rows together. The layout keeps every real token at its batch-1 slot and RoPE position and the LM attends
    per sample to real keys only, so at temperature 0 row b's tokens equal `generate` on prompt b alone
    (checked bit for bit on CPU by the tests). Same keyword arguments as `generate` except `prune_hook`
    (in-LM pruning runs one prompt at a time)."""
    embeds, lengths = pad_prompts(prompts)
    return generate(model, embeds, prompt_lengths=lengths, **kwargs)
