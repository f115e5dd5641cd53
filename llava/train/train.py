"""Train LaViDa-LLaDA (full or LoRA/QLoRA) with LaViDa's complementary-masking objective.

    python -m llava.train.train --model_name_or_path builtin:lavida-small --data_path playground/data/train.json \
        --image_folder playground/data --output_dir outputs/run --prune_method shirg --lora_enable True [...]
    torchrun --nproc_per_node 8 -m llava.train.train --deepspeed scripts/zero2.json --bf16 True [...]

Flags keep upstream LLaVA/LaViDa names and `--flag True/False` syntax. One plain loop drives three engines:
a single process, torch DDP (WORLD_SIZE > 1 under torchrun; gloo on CPU, nccl on CUDA), or DeepSpeed ZeRO when
`--deepspeed CONFIG.json` is given. Why not HF `Trainer`: the model is not a `PreTrainedModel` and batches carry
PIL images; more importantly the three properties this trainer guarantees are easiest to state and test with
the loop in hand:

* Data order and every random draw are pure functions of (seed, step, micro-batch index): the global batch of
  step s is a slice of a per-epoch permutation, split into micro-batches m = k * world + rank, and before
  micro-batch m the token-dropout / noise generator AND torch's global RNG (LoRA dropout) are seeded from
  (seed, s, m). So 2 processes with accumulation a compute exactly the micro-batch losses of 1 process with
  accumulation 2a (same global batch), and a resumed run replays the same draws without iterating the loader.
* Checkpoints (`checkpoint-N/`) are atomic folders with a manifest; resume restores model, optimizer, schedule,
  RNG and position, and ends with the weights of an uninterrupted run (bit-identical here).
* CPU works end to end (fp32; gloo), including DeepSpeed with torch's AdamW (`zero_allow_untested_optimizer`,
  DeepSpeed's own optimizers are refused: they JIT-compile on first use and ignore per-module learning rates).

Precision: fp32 on CPU (no fast bf16 here). On CUDA `--bf16 True` means bf16 autocast over fp32 weights
(torch engine) or DeepSpeed's bf16 mode (bf16 weights, fp32 master copy in the optimizer).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from llava.errors import CheckpointError, ConfigError, InputError, LavidaError
from llava.train import checkpoint as ckpt
from llava.train.data import DataCollatorForSupervisedDataset, DataError, LazySupervisedDataset
from llava.train.feature_cache import VisionFeatureCache
from llava.train.objective import diffusion_loss
from llava.utils import atomic_dir, free_port, logger

TUNABLE_PARTS = {
    # upstream's --mm_tunable_parts names -> the parameters they cover (image_newline goes with the LM, as upstream)
    "mm_vision_tower": ("model.vision_tower.",),
    "mm_mlp_adapter": ("model.mm_projector.",),
    "mm_language_model": ("model.transformer.", "model.image_newline"),
}
FINAL_DIR = "final"
LOG_NAME = "trainer_log.jsonl"


# ================================================================================================================
# arguments (upstream names; HfArgumentParser gives upstream's `--flag True` syntax)
# ================================================================================================================
@dataclass
class ModelArguments:
    model_name_or_path: str = field(default="builtin:lavida-small",
                                    metadata={"help": "local LaViDa folder or builtin:lavida-small"})
    config_overrides: Optional[str] = field(default=None, metadata={
        "help": "JSON object of config keys replacing the model's: the built-in small model's dims for training "
                "from scratch ('{\"d_model\": 64}'), or a checkpoint's keys such as image_aspect_ratio "
                "(a curriculum stage on single views); the trained model's config.json records them"})
    prune_method: str = field(default="pool", metadata={
        "help": "visual tokens seen in training: any registered method (shirg for SHIRG's LoRA stage, pool for "
                "LaViDa-style training)"})
    prune_options: Optional[str] = field(default=None, metadata={
        "help": "the method's options: JSON object or k=v,k=v (e.g. keep_ratio=0.707,fovea=center)"})
    keep_ratio: Optional[float] = field(default=None, metadata={"help": "shorthand for prune option keep_ratio"})
    mm_tunable_parts: Optional[str] = field(default=None, metadata={
        "help": "comma list of mm_vision_tower, mm_mlp_adapter, mm_language_model fully trained (default: all "
                "three without LoRA, none with LoRA)"})
    lora_enable: bool = False
    lora_r: Optional[int] = field(default=None, metadata={"help": "overrides r of --lora_config"})
    lora_alpha: Optional[int] = field(default=None, metadata={"help": "overrides lora_alpha of --lora_config"})
    lora_dropout: Optional[float] = field(default=None, metadata={"help": "overrides lora_dropout of --lora_config"})
    lora_config: Optional[str] = field(default=None, metadata={
        "help": "YAML with target_modules etc. (default: scripts/lora_shirg.yaml)"})
    bits: int = field(default=16, metadata={"help": "4 or 8: the frozen LM's linear layers in bitsandbytes"})


@dataclass
class DataArguments:
    data_path: Optional[str] = field(default=None, metadata={"help": "LLaVA JSON / JSONL or a yaml data list"})
    image_folder: Optional[str] = None
    strict_data: bool = field(default=False, metadata={"help": "missing or unreadable images are fatal"})
    dataloader_num_workers: int = 0
    inference_prompt: bool = field(default=False, metadata={
        "help": "tokenise prompts exactly as inference does (drops the newline after <image>, an upstream quirk); "
                "default keeps it, as LaViDa trained. Models trained from scratch need True"})


@dataclass
class TrainingArguments:
    output_dir: Optional[str] = None
    learning_rate: float = 2e-5
    mm_projector_lr: Optional[float] = None
    mm_vision_tower_lr: Optional[float] = None
    weight_decay: float = 1e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    min_lr_rate: float = field(default=0.0, metadata={"help": "cosine floor as a fraction of lr (LaViDa: 0.1)"})
    num_train_epochs: float = 1.0
    max_steps: int = -1
    per_device_train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    deepspeed: Optional[str] = field(default=None, metadata={"help": "ZeRO config JSON (scripts/zero2.json)"})
    bf16: bool = False
    gradient_checkpointing: bool = False
    model_max_length: int = 4096
    resume_from_checkpoint: Optional[str] = field(default=None, metadata={"help": "a checkpoint folder or latest"})
    overwrite_output_dir: bool = False
    save_steps: int = 500
    save_total_limit: Optional[int] = None
    logging_steps: int = 1
    seed: int = 42
    extra_pad_max: int = field(default=128, metadata={
        "help": "the collator appends e ~ U[-N, N) extra EOS targets to a batch when e > 0 (LaViDa: 128; 0: none). "
                "Short-answer data from scratch learns faster with few: every EOS is a target in the token mean"})
    token_dropout: float = field(default=0.1, metadata={"help": "share of visual tokens zeroed per image in training"})
    vision_feature_cache_gb: float = field(default=0.0, metadata={
        "help": "memoise the FROZEN vision tower's features per preprocessed view, up to this many GB in RAM per "
                "process (0: off); refused when any SigLIP parameter is trained"})
    local_rank: int = field(default=-1, metadata={"help": "set by the deepspeed launcher; the env var wins"})


def parse_args(argv: Optional[Sequence[str]] = None) -> tuple[ModelArguments, DataArguments, TrainingArguments]:
    from transformers import HfArgumentParser

    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    parser.prog = "python -m llava.train.train"
    args = list(sys.argv[1:] if argv is None else argv)
    margs, dargs, targs, rest = parser.parse_args_into_dataclasses(args=args, return_remaining_strings=True)
    if rest:
        raise InputError(f"unknown argument(s): {' '.join(rest)}")
    return margs, dargs, targs


def parse_prune_options(margs: ModelArguments):
    """(method, validated options) from --prune_method, --prune_options and --keep_ratio."""
    from shirg_patches import get_method

    method = get_method(margs.prune_method)
    given: dict = {}
    text = (margs.prune_options or "").strip()
    if text.startswith("{"):
        try:
            given = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"--prune_options is not valid JSON: {e}") from None
        if not isinstance(given, dict):
            raise InputError("--prune_options must be a JSON object")
    elif text:
        for part in text.split(","):
            key, eq, value = part.partition("=")
            if not eq or not key.strip():
                raise InputError(f"--prune_options {text!r}: expected k=v pairs separated by commas")
            given[key.strip()] = value.strip()
    if margs.keep_ratio is not None:
        given["keep_ratio"] = margs.keep_ratio
    return method, method.make_options(given)


def parse_config_overrides(margs: ModelArguments) -> Optional[dict]:
    """--config_overrides as a dict (None when not given); `load_pretrained_model` applies it (see
    `build_small_model` for how the built-in model merges a nested `vision_config`)."""
    if margs.config_overrides is None:
        return None
    try:
        overrides = json.loads(margs.config_overrides)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--config_overrides is not valid JSON: {e}") from None
    if not isinstance(overrides, dict):
        raise ConfigError("--config_overrides must be a JSON object of config keys")
    return overrides


def parse_tunable_parts(margs: ModelArguments) -> list[str]:
    if margs.mm_tunable_parts is None:
        return [] if margs.lora_enable else list(TUNABLE_PARTS)
    parts = [p.strip() for p in margs.mm_tunable_parts.split(",") if p.strip()]
    bad = [p for p in parts if p not in TUNABLE_PARTS]
    if bad:
        raise InputError(f"--mm_tunable_parts: unknown part {bad[0]!r}; choose from {', '.join(TUNABLE_PARTS)}")
    if not parts and not margs.lora_enable:
        raise InputError("--mm_tunable_parts is empty and --lora_enable is off: nothing would be trained")
    return parts


def read_deepspeed_config(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"--deepspeed {path}: no such file")
    try:
        cfg = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"--deepspeed {path} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"--deepspeed {path}: expected a JSON object")
    for block in ("optimizer", "scheduler"):
        if block in cfg:
            raise ConfigError(f"--deepspeed {path} has an {block!r} block: this trainer builds torch AdamW with "
                              "per-module learning rates and a warm-up + cosine schedule itself; remove the block")
    return cfg


def zero_stage(cfg: dict) -> int:
    """The ZeRO stage a DeepSpeed config asks for (0 when it has no zero_optimization block)."""
    return int((cfg.get("zero_optimization") or {}).get("stage", 0))


def validate_args(margs: ModelArguments, dargs: DataArguments, targs: TrainingArguments, need_output: bool = True):
    """Everything that can be checked before the model loads; returns (method, options, lora spec, parts)."""
    from llava.train.lora import DEFAULT_LORA_CONFIG, read_lora_config, require_bitsandbytes

    if need_output and not targs.output_dir:
        raise InputError("--output_dir is required")
    if need_output and not dargs.data_path:
        raise InputError("--data_path is required")
    method, options = parse_prune_options(margs)
    parts = parse_tunable_parts(margs)
    parse_config_overrides(margs)
    if margs.bits not in (4, 8, 16):
        raise InputError(f"--bits must be 4, 8 or 16, got {margs.bits}")
    if margs.bits < 16:
        require_bitsandbytes()
        if "mm_language_model" in parts:
            raise InputError("--bits 4/8 quantises the frozen LM; it cannot be combined with "
                             "--mm_tunable_parts mm_language_model")
    spec = None
    if margs.lora_enable:
        spec = read_lora_config(margs.lora_config or DEFAULT_LORA_CONFIG, margs.lora_r, margs.lora_alpha,
                                margs.lora_dropout)
    elif margs.lora_config:
        raise InputError("--lora_config is given but --lora_enable is off")
    if targs.deepspeed:
        ds_cfg = read_deepspeed_config(targs.deepspeed)
        if margs.bits < 16 and zero_stage(ds_cfg) == 3:
            raise InputError(f"--bits {margs.bits} with ZeRO stage 3 ({targs.deepspeed}): ZeRO-3 partitions every "
                             "parameter across ranks, and bitsandbytes' packed 4/8-bit weights cannot be split; use "
                             "ZeRO-2 (scripts/zero2.json), which shards only the trainable LoRA / projector state")
        try:
            import deepspeed  # noqa: F401
        except ImportError as e:
            raise InputError(f"--deepspeed needs the deepspeed package (pip install -e .[train]): {e}") from None
    for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps"):
        if getattr(targs, name) < 1:
            raise InputError(f"--{name} must be >= 1")
    if targs.save_steps < 0 or targs.warmup_steps < 0 or not 0 <= targs.warmup_ratio < 1:
        raise InputError("--save_steps and --warmup_steps must be >= 0 and --warmup_ratio in [0, 1)")
    if targs.extra_pad_max < 0:
        raise InputError(f"--extra_pad_max must be >= 0, got {targs.extra_pad_max}")
    if not 0 <= targs.token_dropout < 1:
        raise InputError(f"--token_dropout must be in [0, 1), got {targs.token_dropout}")
    if not targs.vision_feature_cache_gb >= 0:
        raise InputError(f"--vision_feature_cache_gb must be >= 0, got {targs.vision_feature_cache_gb}")
    if targs.max_steps <= 0 and targs.num_train_epochs <= 0:
        raise InputError("set --num_train_epochs > 0 or --max_steps > 0")
    return method, options, spec, parts


# ================================================================================================================
# distributed set-up
# ================================================================================================================
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return torch.distributed.is_available() and torch.distributed.is_initialized()

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def broadcast(self, obj):
        if not self.active:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list:
        if not self.active:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def mean(self, value: float) -> float:
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        torch.distributed.all_reduce(t)
        return float(t) / self.world


def init_distributed(use_deepspeed: bool) -> Dist:
    """DeepSpeed: its comm layer (needs RANK/WORLD_SIZE/MASTER_* even for one process, else it looks for MPI;
    set with setdefault so launchers win). Torch: a process group only when WORLD_SIZE > 1."""
    cuda = torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    if use_deepspeed:
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
            os.environ.setdefault(key, value)
        if "MASTER_PORT" not in os.environ:
            os.environ["MASTER_PORT"] = str(free_port())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if use_deepspeed:
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend)
    elif world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend)
    return Dist(rank, world, local_rank, device)


# ================================================================================================================
# the model being trained
# ================================================================================================================
@dataclass
class TrainSetup:
    tokenizer: object
    model: nn.Module
    method: object
    options: object
    parts: list[str]
    lora_spec: object = None
    peft_model: object = None
    lora_targets: list[str] = field(default_factory=list)
    lora_params: list[str] = field(default_factory=list)
    non_lora: list[str] = field(default_factory=list)  # fully trained parameters
    unused: dict = field(default_factory=dict)  # name -> why it is frozen although its part is tunable
    quantized: list[str] = field(default_factory=list)
    base_path: str = ""

    @property
    def trainable(self) -> list[str]:
        return self.lora_params + self.non_lora


def unused_parameters(model: nn.Module, method) -> dict[str, str]:
    """Parameters this objective never reaches, with the reason; they are frozen even inside a tunable part
    (DDP requires every trainable parameter to get a gradient, and an untouched parameter would only decay)."""
    mm = model.mm_config
    uses_newline = (method.select is None and method.encode is None and mm.image_aspect_ratio == "anyres"
                    and mm.mm_patch_merge_type == "spatial_unpad")
    out = {}
    for name, _ in model.named_parameters():
        if ".post_layernorm." in name and "vision_tower" in name:
            out[name] = "SigLIP post_layernorm: LaViDa takes features before it"
        elif name == "model.image_newline" and not uses_newline:
            out[name] = f"image_newline: --prune_method {method.name} does not use LaViDa's spatial_unpad merge"
    return out


def plan_trainable(model: nn.Module, parts: list[str], spec, method, lora_params: list[str]):
    """(non-LoRA trainable names, unused-by-this-method names) for the chosen parts and LoRA config."""
    from llava.train.lora import resolve_parameter_names

    names = [n for n, _ in model.named_parameters()]
    prefixes = tuple(p for part in parts for p in TUNABLE_PARTS[part])
    chosen = [n for n in names if n.startswith(prefixes) and ".lora_" not in n]
    if spec is not None:
        chosen += [n for n in resolve_parameter_names(model, spec.non_lora_trainable) if n not in chosen]
        wrapped = [n for n in chosen if ".base_layer." in n]
        if wrapped:
            raise InputError(f"{wrapped[0]} would be trained fully AND through LoRA; drop its part from "
                             "--mm_tunable_parts or its module from the LoRA targets")
    unused = unused_parameters(model, method)
    non_lora = [n for n in chosen if n not in unused]
    skipped = {n: r for n, r in unused.items() if n in chosen}
    return non_lora, skipped


def load_model_for_training(margs: ModelArguments, targs: TrainingArguments, method, options, spec, parts,
                            device: torch.device, dtype: torch.dtype = torch.float32) -> TrainSetup:
    from llava.model.builder import load_pretrained_model
    from llava.train.lora import apply_lora, lora_parameter_names, quantize_language_model

    tokenizer, model, _, _ = load_pretrained_model(margs.model_name_or_path, device="cpu", torch_dtype=dtype,
                                                   config_overrides=parse_config_overrides(margs))
    model.mm_config.tokenizer_model_max_length = targs.model_max_length
    setup = TrainSetup(tokenizer, model, method, options, parts, lora_spec=spec, base_path=margs.model_name_or_path)
    if margs.bits < 16:
        setup.quantized = quantize_language_model(model, margs.bits, device, compute_dtype=dtype)
    torch.manual_seed(targs.seed)  # LoRA's A init: identical on every rank
    if spec is not None:
        setup.peft_model, setup.lora_targets = apply_lora(model, spec, base_name=margs.model_name_or_path)
        setup.lora_params = lora_parameter_names(model)
    setup.non_lora, setup.unused = plan_trainable(model, parts, spec, method, setup.lora_params)
    trainable = set(setup.trainable)
    for name, p in model.named_parameters():
        p.requires_grad_(name in trainable)
    model.model.gradient_checkpointing = bool(targs.gradient_checkpointing)
    model.model.vision_tower.gradient_checkpointing = bool(targs.gradient_checkpointing)
    model.to(device)
    model.train()
    return setup


def count_parameters(model: nn.Module) -> tuple[int, int]:
    total = trainable = 0
    for p in model.parameters():
        n = p.numel() * (2 if getattr(p, "quant_type", None) else 1)  # 4-bit: two weights per stored byte
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def report_parameters(setup: TrainSetup) -> str:
    from llava.train.lora import count_trainable_at_lavida_dims

    trainable, total = count_parameters(setup.model)
    lines = [f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)"
             f" = LoRA {sum(dict(setup.model.named_parameters())[n].numel() for n in setup.lora_params):,}"
             f" ({len(setup.lora_targets)} modules) + non-LoRA {len(setup.non_lora)} tensors"]
    prefixes = [p for part in setup.parts for p in TUNABLE_PARTS[part]]
    real = count_trainable_at_lavida_dims(setup.lora_spec, prefixes)
    lines.append(f"same configuration at LaViDa-8B dims (meta device): trainable {real['trainable']:,} of "
                 f"{real['total']:,} ({100 * real['trainable'] / real['total']:.4f}%); LoRA {real['lora']:,}, "
                 f"non-LoRA {real['non_lora']:,}")
    if setup.unused:
        lines.append("frozen although tunable (no gradient ever reaches them): " + "; ".join(sorted(set(
            setup.unused.values()))))
    if setup.quantized:
        lines.append(f"quantised LM linear layers: {len(setup.quantized)}")
    return "\n".join(lines)


class TrainStep(nn.Module):
    """The loss as a module, so DDP and DeepSpeed wrap one forward. A batch that lost all its samples
    (unreadable images) or uses no image still touches every trainable parameter with a zero so that DDP's
    and ZeRO's gradient reduction sees the same parameters on every rank."""

    def __init__(self, model: nn.Module, method, options, token_dropout: float):
        super().__init__()
        self.model = model
        self.method = method
        self.options = options
        self.token_dropout = token_dropout

    def _zero(self, prefixes: tuple = ()) -> torch.Tensor:
        params = [p for n, p in self.model.named_parameters() if p.requires_grad and n.startswith(prefixes)]
        return sum((p.sum() * 0.0 for p in params), torch.zeros((), device=params[0].device if params else "cpu"))

    def forward(self, batch: Optional[dict], generator: torch.Generator):
        if batch is None:
            return self._zero(), {"samples": 0}
        loss, stats = diffusion_loss(self.model, batch, self.method.name, self.options, self.token_dropout, generator)
        if all(img is None for img in batch["images"]):
            loss = loss + self._zero(("model.vision_tower.", "model.mm_projector.", "model.image_newline"))
        return loss, {"samples": len(batch["images"]), "visual_tokens": stats["visual_tokens"]}


# ================================================================================================================
# data order
# ================================================================================================================
class MicroBatchSampler:
    """This rank's micro-batches for steps [start, end) of one epoch; see the module docstring for the rule."""

    def __init__(self, n: int, micro: int, accum: int, world: int, rank: int, seed: int, epoch: int,
                 start: int, end: int):
        self.n, self.micro, self.accum, self.world, self.rank = n, micro, accum, world, rank
        self.seed, self.epoch, self.start, self.end = seed, epoch, start, end

    def __iter__(self):
        perm = epoch_permutation(self.n, self.seed, self.epoch)
        G = self.micro * self.accum * self.world
        for s in range(self.start, self.end):
            for k in range(self.accum):
                m = k * self.world + self.rank
                lo = s * G + m * self.micro
                yield perm[lo:lo + self.micro].tolist()

    def __len__(self) -> int:
        return (self.end - self.start) * self.accum


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, 0x5EED, epoch]).permutation(n)


def micro_seed(seed: int, step: int, micro: int) -> int:
    return int(np.random.SeedSequence([seed, step, micro]).generate_state(1, dtype=np.uint64)[0] >> 1)


# ================================================================================================================
# optimizer and schedule
# ================================================================================================================
def param_groups(model: nn.Module, targs: TrainingArguments) -> list[dict]:
    """AdamW groups: (vision tower | projector | rest) x (decay | no decay). Vision/projector lr apply by name
    (LoRA parameters inside them too), as upstream; 1-D tensors (biases, norm weights, image_newline) get no
    weight decay."""
    groups: dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if "vision_tower" in name and targs.mm_vision_tower_lr is not None:
            kind, lr = "vision_tower", targs.mm_vision_tower_lr
        elif "mm_projector" in name and targs.mm_projector_lr is not None:
            kind, lr = "mm_projector", targs.mm_projector_lr
        else:
            kind, lr = "base", targs.learning_rate
        wd = 0.0 if p.ndim < 2 else targs.weight_decay
        key = (kind, wd)
        groups.setdefault(key, {"params": [], "lr": lr, "weight_decay": wd, "name": f"{kind}/wd{wd:g}"})
        groups[key]["params"].append(p)
    if not groups:
        raise InputError("no parameter is trainable with these flags")
    return list(groups.values())


def lr_factor(step: int, warmup: int, total: int, min_lr_rate: float = 0.0) -> float:
    """Linear warm-up then cosine to min_lr_rate (HF's `cosine` / `cosine_with_min_lr`; step 0 has lr 0
    when warming up, as there)."""
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return min_lr_rate + (1.0 - min_lr_rate) * cosine


def make_optimizer(model: nn.Module, targs: TrainingArguments, total_steps: int):
    optimizer = torch.optim.AdamW(param_groups(model, targs), lr=targs.learning_rate,
                                  betas=(targs.adam_beta1, targs.adam_beta2), eps=targs.adam_epsilon)
    warmup = targs.warmup_steps or math.ceil(targs.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup, total_steps, targs.min_lr_rate))
    return optimizer, scheduler, warmup


# ================================================================================================================
# engines: torch (single process / DDP) and DeepSpeed, one interface
# ================================================================================================================
class TorchEngine:
    name = "torch"

    def __init__(self, step_module: TrainStep, optimizer, scheduler, targs: TrainingArguments, dist: Dist,
                 accum: int):
        self.module, self.optimizer, self.scheduler = step_module, optimizer, scheduler
        self.targs, self.dist, self.accum = targs, dist, accum
        self.wrapped = step_module
        if dist.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [dist.device.index] if dist.device.type == "cuda" else None
            self.wrapped = DistributedDataParallel(step_module, device_ids=ids, find_unused_parameters=False)
        self.autocast = dist.device.type == "cuda" and targs.bf16
        self.params = [p for p in step_module.parameters() if p.requires_grad]

    def micro_step(self, batch, generator, last: bool) -> float:
        sync = contextlib.nullcontext() if last or self.wrapped is self.module else self.wrapped.no_sync()
        cast = torch.autocast("cuda", dtype=torch.bfloat16) if self.autocast else contextlib.nullcontext()
        with sync:
            with cast:
                loss, _ = self.wrapped(batch, generator)
            (loss / self.accum).backward()
        return float(loss.detach())

    def optimizer_step(self) -> Optional[float]:
        norm = None
        if self.targs.max_grad_norm > 0:
            norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.targs.max_grad_norm))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save_state(self, folder: Path) -> None:
        if self.dist.main:
            torch.save(self.optimizer.state_dict(), folder / "optimizer.pt")
            torch.save(self.scheduler.state_dict(), folder / "scheduler.pt")

    def load_state(self, folder: Path, setup: TrainSetup) -> None:
        load_model_state(setup, folder)
        try:
            self.optimizer.load_state_dict(ckpt.torch_load(folder / "optimizer.pt"))
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"{folder / 'optimizer.pt'} does not fit this model's trainable parameters: {e}") \
                from None
        self.scheduler.load_state_dict(ckpt.torch_load(folder / "scheduler.pt"))

    def full_state_dict(self) -> Optional[dict]:
        return None


def fill_deepspeed_config(cfg: dict, targs: TrainingArguments, dist: Dist, bf16: bool, hidden: int) -> dict:
    """Fill "auto" values from the flags (as HF's integration does). A batch size or precision that contradicts
    the flags is an error, as is any "auto" left unresolved."""
    cfg = json.loads(json.dumps(cfg))
    micro, accum = targs.per_device_train_batch_size, targs.gradient_accumulation_steps
    top = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": accum,
           "train_batch_size": micro * accum * dist.world, "gradient_clipping": targs.max_grad_norm}
    for key, value in top.items():
        current = cfg.get(key, "auto")
        if current == "auto":
            cfg[key] = value
        elif key != "gradient_clipping" and current != value:
            raise ConfigError(f"--deepspeed config sets {key}={current!r} but the flags give {value!r}; use \"auto\"")
    for block, value in (("bf16", bf16), ("fp16", False)):
        node = cfg.setdefault(block, {})
        current = node.get("enabled", "auto")
        if current == "auto":
            node["enabled"] = value
        elif bool(current) != value:
            raise ConfigError(f"--deepspeed config sets {block}.enabled={current!r} but this run is "
                              f"{'bf16' if bf16 else 'fp32'} (fp16 is not supported); use \"auto\"")
    zero = cfg.setdefault("zero_optimization", {})
    for key, value in (("reduce_bucket_size", hidden * hidden),
                       ("stage3_prefetch_bucket_size", int(0.9 * hidden * hidden)),
                       ("stage3_param_persistence_threshold", 10 * hidden)):
        if zero.get(key) == "auto":
            zero[key] = value
    left = [k for k, v in _walk(cfg) if v == "auto"]
    if left:
        raise ConfigError(f"--deepspeed config: cannot fill \"auto\" for {', '.join(left)}")
    cfg["zero_allow_untested_optimizer"] = True  # torch AdamW, not DeepSpeed's (JIT-built) optimizers
    cfg.setdefault("steps_per_print", 10**9)
    return cfg


def _walk(node, prefix=""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, f"{prefix}{k}.")
    else:
        yield prefix[:-1], node


class DeepSpeedEngine:
    name = "deepspeed"
    TAG = "deepspeed"

    def __init__(self, step_module: TrainStep, optimizer, scheduler, config: dict, setup: TrainSetup):
        import deepspeed

        self.stage = zero_stage(config)
        if self.stage == 3:
            register_zero3_external_parameters(step_module)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=step_module, optimizer=optimizer, lr_scheduler=scheduler, config=config)
        self.module = step_module

    def micro_step(self, batch, generator, last: bool) -> float:
        if self.engine.is_gradient_accumulation_boundary() != last:
            raise RuntimeError("DeepSpeed's accumulation boundary and the trainer's disagree")
        loss, _ = self.engine(batch, generator)
        self.engine.backward(loss)
        self.engine.step()
        return float(loss.detach())

    def optimizer_step(self) -> Optional[float]:
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save_state(self, folder: Path) -> None:
        self.engine.save_checkpoint(str(folder), tag=self.TAG, save_latest=False,
                                    exclude_frozen_parameters=True)

    def load_state(self, folder: Path, setup: TrainSetup) -> None:
        try:
            path, _ = self.engine.load_checkpoint(str(folder), tag=self.TAG, load_module_strict=False,
                                                  load_optimizer_states=True, load_lr_scheduler_states=True)
        except Exception as e:  # DeepSpeed raises plain exceptions with the file in the message
            raise CheckpointError(f"cannot load DeepSpeed state from {folder / self.TAG}: {e}") from None
        if path is None:
            raise CheckpointError(f"{folder / self.TAG} holds no DeepSpeed checkpoint")

    def full_state_dict(self) -> Optional[dict]:
        """ZeRO-3 partitions parameters: gather them (every rank must call; rank 0 gets the tensors)."""
        if self.stage != 3:
            return None
        state = self.engine._zero3_consolidated_16bit_state_dict()
        return None if state is None else {k[len("model."):]: v for k, v in state.items()}


def register_zero3_external_parameters(step_module: TrainStep) -> None:
    """ZeRO-3 gathers a parameter when its owning module's forward runs. These are read outside that: the LM
    head in `lm_logits`, `image_newline` in the merge, SigLIP's position table when interpolated."""
    import deepspeed

    model = step_module.model
    names = ["model.transformer.ff_out.weight", "model.transformer.wte.weight", "model.image_newline",
             "model.vision_tower.vision_tower.vision_model.embeddings.position_embedding.weight"]
    params = dict(model.named_parameters())
    for name in names:
        if name in params:
            deepspeed.zero.register_external_parameter(step_module, params[name])


# ================================================================================================================
# saving and loading the model part of a checkpoint
# ================================================================================================================
def export_model(setup: TrainSetup, folder: Path, state: Optional[dict] = None) -> None:
    """Write the model into the (existing, empty) folder: a PEFT adapter folder + non-LoRA trainables + the
    base's config and tokenizer, or a full `save_pretrained` checkpoint."""
    from llava.model.builder import CONFIG_NAME, save_pretrained
    from llava.train.lora import save_adapter

    model = setup.model
    if setup.peft_model is not None:
        save_adapter(setup.peft_model, model, folder, setup.non_lora, state_dict=state)
        (folder / CONFIG_NAME).write_text(json.dumps(model.config.to_dict(), indent=2))
        setup.tokenizer.save_pretrained(str(folder))
        return
    if setup.quantized:
        raise InputError("a full checkpoint of a quantised model is not supported; use --lora_enable with --bits")
    if state is not None:  # ZeRO-3: the gathered tensors stand in for the partitioned parameters
        model = _StateView(model, state)
    save_pretrained(model, setup.tokenizer, folder)  # replaces the empty folder atomically


class _StateView:
    def __init__(self, model, state):
        self.config, self._state = model.config, state

    def state_dict(self):
        return self._state


def load_model_state(setup: TrainSetup, folder: Path) -> None:
    """Restore the trained weights of a checkpoint folder into the (identically configured) model."""
    from llava.model.builder import iter_checkpoint, weight_files
    from llava.train.lora import load_adapter_weights

    if setup.peft_model is not None:
        load_adapter_weights(setup.model, folder)
        return
    params = dict(setup.model.named_parameters())
    wanted = set(setup.non_lora)
    got = set()
    with torch.no_grad():
        for name, tensor in iter_checkpoint(weight_files(folder), keys=wanted):
            if tuple(tensor.shape) != tuple(params[name].shape):
                raise CheckpointError(f"{folder}: {name} has shape {tuple(tensor.shape)}, expected "
                                      f"{tuple(params[name].shape)}")
            params[name].copy_(tensor)
            got.add(name)
    if wanted - got:
        raise CheckpointError(f"{folder} lacks trained weight {sorted(wanted - got)[0]}")


# ================================================================================================================
# the run
# ================================================================================================================
def run_shape(targs: TrainingArguments, dist: Dist, n: int) -> dict:
    micro, accum = targs.per_device_train_batch_size, targs.gradient_accumulation_steps
    G = micro * accum * dist.world
    per_epoch = n // G
    if per_epoch == 0:
        raise DataError(f"{n} usable records are fewer than one global batch ({micro} per device x {accum} "
                        f"accumulation x {dist.world} processes = {G}); lower the batch or add data")
    total = targs.max_steps if targs.max_steps > 0 else math.ceil(targs.num_train_epochs * per_epoch)
    return {"world_size": dist.world, "micro_batch": micro, "grad_accum": accum, "global_batch": G,
            "steps_per_epoch": per_epoch, "total_steps": total, "seed": targs.seed, "dataset_len": n}


def check_resume_shape(state: dict, shape: dict, folder: Path) -> None:
    """A resumed run must be the same run: batch geometry, seed, data and total steps (the warm-up and cosine
    schedule are functions of the total, so a new --max_steps would silently change every later lr)."""
    for key in ("world_size", "micro_batch", "grad_accum", "seed", "dataset_len", "steps_per_epoch", "total_steps"):
        if state.get("shape", {}).get(key) != shape[key]:
            hint = (" (to train on from it, pass the checkpoint folder as --model_name_or_path with a new "
                    "--output_dir)" if key == "total_steps" else "")
            raise CheckpointError(f"{folder} was written with {key}={state.get('shape', {}).get(key)} but this run "
                                  f"has {key}={shape[key]}; resuming would not continue the same run{hint}")


def save_checkpoint(out: Path, step: int, setup: TrainSetup, engine, dist: Dist, state: dict) -> Path:
    """checkpoint-<step>: model, engine state, RNG per rank, then trainer_state.json (manifest) last;
    built in a temp folder that rank 0 renames when every rank has written its part."""
    path = out / f"checkpoint-{step}"
    rngs = dist.gather(ckpt.rng_state())
    full = engine.full_state_dict()  # collective under ZeRO-3
    ctx = atomic_dir(path) if dist.main else contextlib.nullcontext(None)
    with ctx as tmp:
        tmp = Path(dist.broadcast(str(tmp) if tmp is not None else None))
        if dist.main:
            export_model(setup, tmp, full)  # may replace tmp by a same-named folder: write the rest after it
        dist.barrier()
        engine.save_state(tmp)
        dist.barrier()
        if dist.main:
            for r, rng in enumerate(rngs):
                torch.save(rng, tmp / f"rng_state_{r}.pth")
            ckpt.write_state(tmp, state)
    dist.barrier()
    return path


def append_log(out: Path, entry: dict, name: str = LOG_NAME) -> None:
    """Append one entry to the JSONL log `out/name`."""
    with open(out / name, "a") as f:
        f.write(json.dumps(entry) + "\n")


def truncate_log(out: Path, step: int, name: str = LOG_NAME) -> None:
    """Drop the entries of the JSONL log `out/name` past `step`: a resumed run logs those steps again."""
    path = out / name
    if path.is_file():
        keep = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
        path.write_text("".join(line + "\n" for line in keep))


def prepare_output_dir(out: Path, targs: TrainingArguments, resume: Optional[Path]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for stale in ckpt.stale_temp_folders(out):
        logger.warning("removing %s: a save interrupted by a killed run", stale)
        shutil.rmtree(stale, ignore_errors=True)
    existing = ckpt.list_checkpoints(out)
    if existing and resume is None:
        if not targs.overwrite_output_dir:
            raise InputError(f"--output_dir {out} already holds {existing[-1][1].name}; pass "
                             "--resume_from_checkpoint latest to continue or --overwrite_output_dir True to restart")
        for _, p in existing:
            shutil.rmtree(p)
        for name in (FINAL_DIR, LOG_NAME):
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()


def train(margs: ModelArguments, dargs: DataArguments, targs: TrainingArguments) -> dict:
    """The whole run; returns a summary (also written to the log)."""
    method, options, spec, parts = validate_args(margs, dargs, targs)
    out = Path(targs.output_dir)
    resume = ckpt.resolve_resume(targs.resume_from_checkpoint, out)
    resume_state = ckpt.verify_checkpoint(resume) if resume is not None else None
    ds_config = read_deepspeed_config(targs.deepspeed) if targs.deepspeed else None

    dist = init_distributed(ds_config is not None)
    if not dist.main:
        logger.setLevel(logging.WARNING)
    cuda = dist.device.type == "cuda"
    if targs.bf16 and not cuda:
        logger.warning("--bf16 ignored: no CUDA device, training in fp32 (this CPU has no fast bf16)")
    bf16 = bool(targs.bf16 and cuda)
    if dist.main:
        prepare_output_dir(out, targs, resume)
    dist.barrier()

    dtype = torch.bfloat16 if bf16 and ds_config is not None else torch.float32
    setup = load_model_for_training(margs, targs, method, options, spec, parts, dist.device, dtype)
    if dist.main:
        logger.info("%s", report_parameters(setup))
    gb = targs.vision_feature_cache_gb
    cache = VisionFeatureCache(setup.model, gb * 1e9) if gb else None
    dataset = LazySupervisedDataset(dargs.data_path, setup.tokenizer, dargs.image_folder, targs.model_max_length,
                                    strict=dargs.strict_data, seed=targs.seed,
                                    inference_prompt=dargs.inference_prompt)
    collator = DataCollatorForSupervisedDataset(setup.tokenizer.pad_token_id, targs.model_max_length, targs.seed,
                                                extra_pad_range=(-targs.extra_pad_max, targs.extra_pad_max))
    shape = run_shape(targs, dist, len(dataset))
    total = shape["total_steps"]
    optimizer, scheduler, warmup = make_optimizer(setup.model, targs, total)
    step_module = TrainStep(setup.model, method, options, targs.token_dropout)
    if ds_config is not None:
        cfg = fill_deepspeed_config(ds_config, targs, dist, bf16, setup.model.config.llada.d_model)
        engine = DeepSpeedEngine(step_module, optimizer, scheduler, cfg, setup)
    else:
        engine = TorchEngine(step_module, optimizer, scheduler, targs, dist, targs.gradient_accumulation_steps)

    start = 0
    if resume_state is not None:
        check_resume_shape(resume_state, shape, resume)
        engine.load_state(resume, setup)
        rng = ckpt.torch_load(resume / f"rng_state_{dist.rank}.pth", weights_only=False)
        ckpt.set_rng_state(rng)
        start = int(resume_state["global_step"])
        if dist.main:
            truncate_log(out, start)
            logger.info("resumed from %s at step %d of %d", resume, start, total)
    if dist.main:
        logger.info("engine %s, %d process(es), device %s, %s; %d samples, global batch %d, %d steps/epoch, "
                    "%d steps (warm-up %d)", engine.name, dist.world, dist.device, "bf16" if bf16 else "fp32",
                    len(dataset), shape["global_batch"], shape["steps_per_epoch"], total, warmup)

    G, per_epoch, accum = shape["global_batch"], shape["steps_per_epoch"], shape["grad_accum"]
    step, t0, samples = start, time.perf_counter(), 0
    last_loss = None
    while step < total:
        epoch, in_epoch = divmod(step, per_epoch)
        end = min(per_epoch, in_epoch + (total - step))
        dataset.set_epoch(epoch)
        sampler = MicroBatchSampler(len(dataset), shape["micro_batch"], accum, dist.world, dist.rank, targs.seed,
                                    epoch, in_epoch, end)
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collator,
                                             num_workers=dargs.dataloader_num_workers)
        batches = iter(loader)
        for _ in range(in_epoch, end):
            t_step = time.perf_counter()
            lr = engine.lr()  # the rate this step uses (DeepSpeed advances the schedule inside its last micro-step)
            losses = []
            for k in range(accum):
                batch = next(batches)
                seed = micro_seed(targs.seed, step, k * dist.world + dist.rank)
                torch.manual_seed(seed)
                generator = torch.Generator().manual_seed(seed)
                losses.append(engine.micro_step(batch, generator, last=k == accum - 1))
            norm = engine.optimizer_step()
            step += 1
            samples += G
            last_loss = dist.mean(sum(losses) / len(losses))
            if dist.main and (step % targs.logging_steps == 0 or step == total):
                entry = {"step": step, "epoch": round(step / per_epoch, 4), "loss": round(last_loss, 6),
                         "lr": lr, "grad_norm": None if norm is None else round(norm, 6),
                         "step_seconds": round(time.perf_counter() - t_step, 3)}
                logger.info("%s", json.dumps(entry))
                append_log(out, entry)
            if targs.save_steps and step % targs.save_steps == 0:
                state = {"global_step": step, "epoch": step // per_epoch, "step_in_epoch": step % per_epoch,
                         "samples_seen": step * G, "shape": shape, "engine": engine.name,
                         "mode": "lora" if setup.peft_model is not None else "full",
                         "args": {**asdict(margs), **asdict(dargs), **asdict(targs)}}
                path = save_checkpoint(out, step, setup, engine, dist, state)
                if dist.main:
                    ckpt.prune_checkpoints(out, targs.save_total_limit)
                    logger.info("saved %s", path)
    seconds = time.perf_counter() - t0
    full = engine.full_state_dict()
    if dist.main:
        with atomic_dir(out / FINAL_DIR) as tmp:
            export_model(setup, tmp, full)
    dist.barrier()
    summary = {"steps": total, "resumed_from": start, "seconds": round(seconds, 2),
               "samples_per_s": round(samples / seconds, 3) if seconds > 0 else None, "final_loss": last_loss,
               "output": str(out / FINAL_DIR), "engine": engine.name, "world_size": dist.world}
    if cache is not None:
        summary["vision_feature_cache"] = cache.stats()
        cache.uninstall()
    if dist.main:
        logger.info("done: %s", json.dumps(summary))
    return summary


def setup_logging(rank: int = 0) -> None:
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="[%(name)s] %(message)s",
                        stream=sys.stderr)
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)


def main(argv: Optional[Sequence[str]] = None) -> int:
    setup_logging(int(os.environ.get("RANK", "0")))
    try:
        margs, dargs, targs = parse_args(argv)
        train(margs, dargs, targs)
    except LavidaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
