"""Loading and saving LaViDa-LLaDA checkpoints from local folders, and the built-in small model.

A checkpoint folder holds `config.json`, weights (`model.safetensors`, or shards listed in
`model.safetensors.index.json`, or `pytorch_model.bin`), and `tokenizer.json` +
`tokenizer_config.json`. Nothing is ever fetched from a hub.

The built-in small model is the same code with small dims: a 4-layer SigLIP (3 kept) with the
real 384/14 token geometry, a 4-layer LLaDA, and a byte-level BPE tokenizer trained here on a
fixed corpus with LLaDA's special tokens. It is deterministic given its seed.
"""
from __future__ import annotations

import json
import math
import pickle
import re
from pathlib import Path, PurePosixPath
from typing import Optional

import torch

from llava.constants import (
    DEFAULT_GRID_PINPOINTS,
    SIGLIP_IMAGE_SIZE,
    SIGLIP_MEAN,
    SIGLIP_PATCH_SIZE,
    SIGLIP_STD,
    SPECIAL_TOKENS,
    SYSTEM_PROMPT,
)
from llava.errors import CheckpointError, ConfigError, InputError
from llava.model.language_model.llava_llada import LlavaLLaDAConfig, LlavaLLaDAForCausalLM
from llava.utils import atomic_dir, give_mode_of, logger

SMALL_MODEL_NAME = "builtin:lavida-small"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
TORCH_WEIGHTS_NAME = "pytorch_model.bin"


# ---------------------------------------------------------------------------------------------
# reading a checkpoint folder
# ---------------------------------------------------------------------------------------------
def read_config(model_path: str | Path) -> dict:
    path = Path(model_path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder {str(path)!r} does not exist")
    cfg_file = path / CONFIG_NAME
    if not cfg_file.is_file():
        raise CheckpointError(f"{str(path)!r} has no {CONFIG_NAME}; is it a LaViDa checkpoint folder?")
    try:
        raw = json.loads(cfg_file.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{cfg_file} is not UTF-8 text: {e}") from None
    except (json.JSONDecodeError, RecursionError) as e:
        raise ConfigError(f"{cfg_file} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{cfg_file} must hold a JSON object (key: value), not a {type(raw).__name__}")
    return raw


def _safetensors_error(file: Path, e: Exception) -> CheckpointError:
    # safetensors raises its own error types for truncated/corrupt files
    return CheckpointError(f"cannot read {file}: {e}")


def weight_files(model_path: str | Path) -> list[Path]:
    """The weight files of a checkpoint folder, in load order; every one of them exists."""
    path = Path(model_path)
    index = path / WEIGHTS_INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_bytes().decode("utf-8"))["weight_map"]
        except (ValueError, KeyError, TypeError, RecursionError) as e:  # ValueError: bad JSON or UTF-8
            raise CheckpointError(f"{index} is not a valid safetensors index: {e!r}") from None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: 'weight_map' must be a non-empty object of tensor name -> shard file")
        bad = next(((k, v) for k, v in weight_map.items() if not isinstance(v, str) or not v), None)
        if bad:
            raise CheckpointError(f"{index}: shard of {bad[0]!r} must be a file name, got {bad[1]!r}")
        shards = sorted(set(weight_map.values()))
        outside = [s for s in shards if not _inside_folder(s)]
        if outside:
            raise CheckpointError(
                f"{index} points outside the checkpoint folder: {', '.join(map(repr, outside))}; shard paths "
                "must be relative paths inside it"
            )
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise CheckpointError(f"{path}: shard(s) listed in {WEIGHTS_INDEX_NAME} are missing: {', '.join(missing)}")
        return [path / s for s in shards]
    for name in (WEIGHTS_NAME, TORCH_WEIGHTS_NAME):
        if (path / name).is_file():
            return [path / name]
    raise CheckpointError(
        f"{str(path)!r} has no weights ({WEIGHTS_NAME}, {WEIGHTS_INDEX_NAME} or {TORCH_WEIGHTS_NAME})"
    )


def _inside_folder(name: str) -> bool:
    """A shard path from an index stays inside the folder: relative, no `..`, no drive (checked on the
    text, so a symlinked shard inside the folder, as in a hub cache snapshot, still loads)."""
    parts = PurePosixPath(name.replace("\\", "/")).parts
    return bool(parts) and not PurePosixPath(name).is_absolute() and ".." not in parts and ":" not in parts[0]


def _read_torch_bin(file: Path) -> dict[str, torch.Tensor]:
    try:  # mmap: tensors are paged in as they are copied out, not read up front
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:  # torch's weights-only refusal: a page of advice; keep the reason
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        reason = next((line for line in lines if "GLOBAL" in line or "Unsupported" in line), lines[-1] if lines else "")
        raise CheckpointError(
            f"cannot read {file}: it holds pickled Python objects besides tensors, which are not loaded (unsafe to "
            f"unpickle): {reason.rstrip('.')}. Convert it to safetensors where you trust its source"
        ) from None
    except Exception as e:
        raise CheckpointError(f"cannot read {file}: {e}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{file} holds a {type(state).__name__}, not a dict of tensor name -> tensor")
    bad = next((k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise CheckpointError(
            f"{file}: entry {bad!r} is not a tensor ({type(state[bad]).__name__}); a weights file maps names "
            "to tensors only"
        )
    return state


def checkpoint_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """name -> shape of every tensor in the files, from the safetensors headers only (no data
    read), so a bad checkpoint fails before gigabytes are loaded."""
    from safetensors import safe_open

    shapes = {}
    for file in files:
        if file.suffix != ".safetensors":
            shapes.update({k: tuple(v.shape) for k, v in _read_torch_bin(file).items()})
            continue
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
        except Exception as e:
            raise _safetensors_error(file, e) from None
    return shapes


def checkpoint_dtypes(files: list[Path]) -> dict[str, str]:
    """name -> dtype name ("F32", "BF16", "I64", ... as safetensors spells them; torch's for `.bin`), from
    the headers only."""
    from safetensors import safe_open

    dtypes = {}
    for file in files:
        if file.suffix != ".safetensors":
            dtypes.update({k: str(v.dtype).removeprefix("torch.") for k, v in _read_torch_bin(file).items()})
            continue
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                dtypes.update({k: f.get_slice(k).get_dtype() for k in f.keys()})
        except Exception as e:
            raise _safetensors_error(file, e) from None
    return dtypes


def _is_float_dtype(name: str) -> bool:
    return name.upper().startswith(("F", "BF"))  # F16/F32/F64/F8_*, BF16; torch: float*, bfloat16


def iter_checkpoint(
    files: list[Path],
    keys: Optional[set] = None,
    dtype: Optional[torch.dtype] = None,
    device: str | torch.device = "cpu",
):
    """Yield (name, tensor) file by file, each copied out of the file, cast to `dtype` (floating
    tensors only, as `Module.to` does) and moved to `device` as it is read. `keys` restricts
    which tensors are read.

    A safetensors file is re-opened per tensor: its tensors are views of a file mapping whose
    touched pages count as resident until the file is closed, so keeping it open for a whole
    shard would cost a second copy of that shard. Re-opening costs microseconds."""
    from safetensors import safe_open

    device = torch.device(device)

    def convert(t: torch.Tensor) -> torch.Tensor:
        target = dtype if dtype is not None and t.is_floating_point() else t.dtype
        return t.to(device=device, dtype=target, copy=True)  # copy: never alias the file mapping

    def opened(file: Path):
        try:
            return safe_open(str(file), framework="pt", device="cpu")
        except Exception as e:
            raise _safetensors_error(file, e) from None

    for file in files:
        if file.suffix != ".safetensors":
            state = _read_torch_bin(file)
            for k in list(state):
                t = state.pop(k)
                if keys is None or k in keys:
                    yield k, convert(t)
            continue
        with opened(file) as f:
            names = [k for k in f.keys() if keys is None or k in keys]
        for k in names:
            with opened(file) as f:
                try:
                    t = f.get_tensor(k)
                except Exception as e:
                    raise _safetensors_error(file, e) from None
                out = convert(t)
                del t
            yield k, out


def read_state_dict(model_path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder (single file or sharded), on CPU, as stored."""
    return dict(iter_checkpoint(weight_files(model_path)))


def load_tokenizer(model_path: str | Path):
    from transformers import AutoTokenizer

    path = Path(model_path)
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer.model").is_file():
        raise CheckpointError(f"{str(path)!r} has no tokenizer.json")
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot load the tokenizer from {path}: {e}") from None


def _summarise(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def build_empty_model(config: LlavaLLaDAConfig) -> LlavaLLaDAForCausalLM:
    """The model on the meta device: shapes only, so building allocates and initialises
    nothing that the checkpoint is about to overwrite."""
    with torch.device("meta"):
        return LlavaLLaDAForCausalLM(config)


def check_weights(expected: dict[str, tuple], found: dict[str, tuple], source: str) -> None:
    """Compare name -> shape maps; missing or mis-shaped tensors are errors, unused ones a warning."""
    missing = sorted(k for k in expected if k not in found)
    unexpected = sorted(k for k in found if k not in expected)
    if missing:
        raise CheckpointError(f"{source} lacks {len(missing)} weight(s): {_summarise(missing)}")
    if unexpected:
        logger.warning("%s has %d unused weight(s): %s", source, len(unexpected), _summarise(unexpected))
    bad = [k for k in expected if tuple(found[k]) != tuple(expected[k])]
    if bad:
        k = bad[0]
        raise CheckpointError(
            f"{source}: {len(bad)} weight(s) have the wrong shape, e.g. {k} is {tuple(found[k])}, "
            f"model expects {tuple(expected[k])}"
        )


# Non-persistent buffers are derived values that checkpoints do not store; each one a model
# registers needs a rule here to be re-created after a meta-device build.
_BUFFER_RULES = {
    # SigLIP embeddings: the patch index of each position embedding
    "position_ids": lambda shape, dtype, device: torch.arange(shape[-1], dtype=dtype, device=device).expand(shape),
}


def materialize_buffers(model: torch.nn.Module, device: torch.device) -> None:
    """Re-create the buffers still on meta; a buffer without a rule is a bug, never left empty."""
    for module_name, module in model.named_modules():
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf is None or not buf.is_meta:
                continue
            rule = _BUFFER_RULES.get(name)
            if rule is None:
                raise RuntimeError(f"no rule to re-create buffer {module_name}.{name} after a meta-device build")
            setattr(module, name, rule(tuple(buf.shape), buf.dtype, device))
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"tensors left on the meta device after loading: {_summarise(left)}")


def load_weights(
    model: torch.nn.Module,
    files: list[Path],
    source: str,
    dtype: Optional[torch.dtype] = None,
    device: str | torch.device = "cpu",
    shapes: Optional[dict[str, tuple]] = None,
) -> None:
    """Fill a (meta-device) model from checkpoint files: check names and shapes from the headers
    first (`shapes`, if already read), then stream the tensors in, cast as they are read, and
    assign them (no second copy)."""
    state_dict = model.state_dict()
    expected = {k: tuple(v.shape) for k, v in state_dict.items()}
    check_weights(expected, checkpoint_shapes(files) if shapes is None else shapes, source)
    found = checkpoint_dtypes(files)
    bad = sorted(k for k, v in state_dict.items() if v.is_floating_point() and not _is_float_dtype(found[k]))
    if bad:
        raise CheckpointError(
            f"{source}: {len(bad)} weight(s) are not floating point, e.g. {bad[0]} is {found[bad[0]]}"
        )
    del state_dict
    state = dict(iter_checkpoint(files, keys=set(expected), dtype=dtype, device=device))
    model.load_state_dict(state, strict=True, assign=True)
    del state
    materialize_buffers(model, torch.device(device))


def load_pretrained_model(
    model_path: str | Path,
    model_base: Optional[str] = None,
    model_name: str = "llava_llada",
    device: str | torch.device = "cpu",
    torch_dtype: Optional[torch.dtype] = None,
    config_overrides: Optional[dict] = None,
):
    """Load a LaViDa-LLaDA folder -> (tokenizer, model, image_processor, context_len), like upstream.

    `model_path` may also be `builtin:lavida-small`. dtype defaults to fp32 on CPU (this CPU has
    no fast bf16) and bf16 on CUDA. `config_overrides` plays the role of upstream's
    `vision_kwargs`. With `model_base` (upstream's convention), `model_path` is a LoRA adapter
    folder written by `llava.train.train` (PEFT's adapter files + `non_lora_trainables.safetensors`):
    the base loads from `model_base`, the adapter is applied and merged into its weights, and the
    tokenizer and config are the base's. Peak host memory is about one copy of the weights (in the
    target dtype; on CUDA, about one tensor).
    """
    if model_base is not None:
        from llava.train.lora import load_lora_adapter  # needs peft; only adapter loading pulls it in

        tokenizer, model, image_processor, context_len = load_pretrained_model(
            model_base, None, model_name, device, torch_dtype, config_overrides)
        model = load_lora_adapter(model, model_path, merge=True).eval()
        return tokenizer, model, image_processor, context_len
    if "llada" not in model_name:
        raise ConfigError(f"model_name {model_name!r}: only the LaViDa-LLaDA path (llava_llada) is implemented")
    device = torch.device(device)
    dtype = torch_dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if str(model_path) == SMALL_MODEL_NAME:
        tokenizer, model = build_small_model(config_overrides=config_overrides)
        model = model.to(device=device, dtype=dtype)
    else:
        raw = read_config(model_path)
        raw.update(config_overrides or {})
        try:
            config = LlavaLLaDAConfig.from_dict(raw)
        except ConfigError as e:
            raise ConfigError(f"{Path(model_path) / CONFIG_NAME}: {e}") from None
        files = weight_files(model_path)
        shapes = checkpoint_shapes(files)  # unreadable files fail before anything is built
        tokenizer = load_tokenizer(model_path)
        model = build_empty_model(config)
        load_weights(model, files, str(model_path), dtype=dtype, device=device, shapes=shapes)
    model.eval()
    image_processor = siglip_image_processor(model.model.vision_tower.image_size)
    return tokenizer, model, image_processor, model.config.mm.tokenizer_model_max_length


def siglip_image_processor(size: int):
    """An HF image processor with LaViDa's preprocessing (bicubic resize, mean/std 0.5), for
    callers that expect upstream's 4-tuple; this package itself uses `llava.mm_utils`."""
    try:  # transformers 5 names the torchvision-free processor separately
        from transformers import SiglipImageProcessorPil as SiglipImageProcessor
    except ImportError:
        from transformers import SiglipImageProcessor

    return SiglipImageProcessor(size={"height": size, "width": size},
                                image_mean=list(SIGLIP_MEAN), image_std=list(SIGLIP_STD))


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(value: int | str) -> int:
    """Bytes from an int or a string like "5GB", "500MB", "2GiB" (GB = 10^9, GiB = 2^30, as
    Hugging Face reads `max_shard_size`)."""
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*", str(value))
        unit = m.group(2).upper() if m else None
        if unit not in _SIZE_UNITS:
            raise InputError(f"max shard size {value!r} is not a size; use e.g. 5GB, 500MB, 2GiB or a byte count")
        n = int(float(m.group(1)) * _SIZE_UNITS[unit])
    if n <= 0:
        raise InputError(f"max shard size {value!r} must be positive")
    return n


def plan_shards(sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    """Greedy, in the given order: a new shard starts when the next tensor would overflow the
    current one; a tensor bigger than `max_bytes` gets a shard of its own."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, n in sizes.items():
        if shards[-1] and used + n > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += n
    return shards


def save_pretrained(
    model: LlavaLLaDAForCausalLM, tokenizer, folder: str | Path, max_shard_size: int | str = "5GB"
) -> Path:
    """Write config + safetensors (sharded above `max_shard_size`, with the standard
    `model.safetensors.index.json`) + tokenizer. Everything goes into a temp folder renamed at
    the end, so a failure never leaves a half-written checkpoint nor loses the old one. One
    shard at a time is copied to CPU, so saving from a GPU needs one shard of host memory."""
    import safetensors.torch  # looked up at call time (tests patch save_file)

    max_bytes = parse_size(max_shard_size)
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(f"{str(folder)!r} exists and is not a folder")
    state = model.state_dict()
    sizes = {k: v.numel() * v.element_size() for k, v in state.items()}
    shards = plan_shards(sizes, max_bytes)
    names = [WEIGHTS_NAME] if len(shards) == 1 else [
        f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    with atomic_dir(folder) as tmp:
        (tmp / CONFIG_NAME).write_text(json.dumps(model.config.to_dict(), indent=2))
        for name, keys in zip(names, shards):
            part = {k: state[k].detach().contiguous().cpu() for k in keys}
            safetensors.torch.save_file(part, str(tmp / name), metadata={"format": "pt"})
            give_mode_of(tmp / CONFIG_NAME, tmp / name)
            del part
        if len(shards) > 1:
            weight_map = {k: name for name, keys in zip(names, shards) for k in keys}
            index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
            (tmp / WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2))
        tokenizer.save_pretrained(str(tmp))
    return folder


# ---------------------------------------------------------------------------------------------
# the built-in small model
# ---------------------------------------------------------------------------------------------
_CORPUS_WORDS = (
    "what is the value of the tallest bar shortest chart title color shape red green blue yellow "
    "orange purple black white grey circle square triangle left right top bottom centre center "
    "how many are there in this image picture photo describe detail text label number answer "
    "question the a an of and or is are was it this that which where when who why yes no "
    "one two three four five six seven eight nine ten zero hundred percent year month sales "
    "revenue growth total average maximum minimum first second third largest smallest"
)


def _entitygrid_lines() -> list[str]:
    """EntityGrid-QA's question templates and answer words, repeated so BPE merges every answer into ONE token
    as answers are written (bare; the word answers also after a space, as the questions use them): a multi-token
    answer (`hexagon` was 5 tokens) cannot fit the 4 answer slots the trained demo model decodes, and each extra
    slot is one more parallel guess for the diffusion sampler."""
    from llava.eval.entitygrid import COLOURS, LABELS, PLURAL, POSITIONS, SHAPES

    lines = []
    for k, colour in enumerate(COLOURS):
        for j, shape in enumerate(SHAPES):
            other = f"{list(COLOURS)[(k + 3) % len(COLOURS)]} {SHAPES[(j + 2) % len(SHAPES)]}"
            pos, label = POSITIONS[(k + j) % len(POSITIONS)], LABELS[(k * len(SHAPES) + j) % len(LABELS)]
            lines += [f"What is the label on the {colour} {shape}?", f"What colour is the shape labelled {label}?",
                      f"What shape is labelled {label}?", f"How many {PLURAL[shape]} are there?",
                      f"How many {colour} shapes are there?",
                      f"Is the {colour} {shape} {'left or right' if pos in ('left', 'right') else 'above or below'} "
                      f"of the {other}?"]
    for word in (*COLOURS, *SHAPES, *POSITIONS):
        lines += [word] * 8 + [f"The answer is {word}."] * 8
    return lines


def _tokenizer_corpus() -> list[str]:
    words = _CORPUS_WORDS.split()
    lines = [SYSTEM_PROMPT, "Answer the question using a single word or phrase.", "Describe the image in detail."]
    for i, w in enumerate(words):  # fixed, deterministic sentences
        lines.append(f"What is the {w} in the image? The {w} is {i} and {words[(i * 7) % len(words)]}.")
        lines.append(f"{w.capitalize()} {words[(i * 3) % len(words)]} {i * 13 % 101}% {w}.")
    return lines + _entitygrid_lines()


def build_small_tokenizer(vocab_size: int = 512):
    """Byte-level BPE with LLaDA's special tokens, trained here in milliseconds, no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tokenizer_corpus(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        mask_token="<|mdm_mask|>",
        model_max_length=8192,
    )


def small_model_config(tokenizer) -> dict:
    """A LaViDa-shaped config.json with small dims; token geometry (384/14, 448 fovea) is real."""
    vocab = len(tokenizer)
    return {
        # LLaDA keys
        "d_model": 128, "n_layers": 4, "n_heads": 4, "n_kv_heads": 4, "mlp_hidden_size": 344,
        "vocab_size": vocab, "embedding_size": int(math.ceil(vocab / 64) * 64),
        "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "max_sequence_length": 8192,
        "block_type": "llama", "layer_norm_type": "rms", "activation_type": "silu", "weight_tying": False,
        "mask_token_id": tokenizer.mask_token_id, "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        # multimodal keys (upstream names)
        "mm_vision_tower": SMALL_MODEL_NAME, "mm_projector_type": "mlp2x_gelu", "mm_hidden_size": 64,
        "mm_patch_merge_type": "spatial_unpad", "image_aspect_ratio": "anyres",
        "image_grid_pinpoints": [list(p) for p in DEFAULT_GRID_PINPOINTS],
        "mm_spatial_pool_mode": "bilinear", "tokenizer_model_max_length": 8192,
        # not an upstream checkpoint, so no numerics to match: the faster kernel (eager is tested too)
        "mm_vision_attn_implementation": "sdpa",
        "vision_config": {
            "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 256,
            "patch_size": SIGLIP_PATCH_SIZE, "image_size": SIGLIP_IMAGE_SIZE, "num_channels": 3,
            "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6,
        },
    }


# Weight init of the built-in model (LLaDA/OLMo's config key `init_fn`): "normal" is LLaDA's N(0, 0.02), right
# for its 4096 width (about 1/sqrt(4096)) but 6x too small at width 64, where attention then stays uniform for
# hundreds of steps; "fan_in" is N(0, 1/sqrt(fan_in)), the same rule scaled to the width (train-tiny uses it).
SMALL_INIT_FNS = ("normal", "fan_in")


def build_small_model(seed: int = 0, config_overrides: Optional[dict] = None):
    """(tokenizer, model) of the built-in small LaViDa: random weights, LLaDA-style init (`init_fn`, above).
    `config_overrides` replaces config keys (e.g. `mm_patch_merge_type`) before building; a nested
    `vision_config` is merged key by key, so `{"vision_config": {"hidden_size": 96}}` keeps the other vision keys."""
    tokenizer = build_small_tokenizer()
    base, overrides = small_model_config(tokenizer), dict(config_overrides or {})
    if isinstance(overrides.get("vision_config"), dict):
        overrides["vision_config"] = {**base["vision_config"], **overrides["vision_config"]}
    merged = {**base, **overrides}
    init_fn = merged.get("init_fn", "normal")
    if init_fn not in SMALL_INIT_FNS:
        raise ConfigError(f"config key 'init_fn': {init_fn!r} is not one of {', '.join(SMALL_INIT_FNS)}")
    config = LlavaLLaDAConfig.from_dict(merged)
    gen = torch.Generator().manual_seed(seed)
    model = LlavaLLaDAForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("image_newline"):
                p.normal_(0.0, 1.0 / math.sqrt(p.numel()), generator=gen)
            elif p.dim() >= 2:
                p.normal_(0.0, 0.02 if init_fn == "normal" else 1.0 / math.sqrt(p[0].numel()), generator=gen)
            elif name.endswith("bias"):
                p.zero_()
            else:  # norm weights
                p.fill_(1.0)
    return tokenizer, model.eval()
