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
import os
import shutil
import uuid
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import torch

from llava.constants import SPECIAL_TOKENS, SYSTEM_PROMPT
from llava.errors import CheckpointError, ConfigError
from llava.model.language_model.llava_llada import LlavaLLaDAConfig, LlavaLLaDAForCausalLM
from llava.utils import logger

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
        return json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{cfg_file} is not valid JSON: {e}") from None


def _load_safetensors(file: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not file.is_file():
        raise CheckpointError(f"weights file {file} is missing")
    try:
        return load_file(str(file))
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise CheckpointError(f"cannot read {file}: {e}") from None


def read_state_dict(model_path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder (single file or sharded), on CPU."""
    path = Path(model_path)
    index = path / WEIGHTS_INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index: {e}") from None
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise CheckpointError(f"{path}: shard(s) listed in {WEIGHTS_INDEX_NAME} are missing: {', '.join(missing)}")
        state = {}
        for shard in shards:
            state.update(_load_safetensors(path / shard))
        return state
    if (path / WEIGHTS_NAME).is_file():
        return _load_safetensors(path / WEIGHTS_NAME)
    if (path / TORCH_WEIGHTS_NAME).is_file():
        try:
            return torch.load(path / TORCH_WEIGHTS_NAME, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"cannot read {path / TORCH_WEIGHTS_NAME}: {e}") from None
    raise CheckpointError(
        f"{str(path)!r} has no weights ({WEIGHTS_NAME}, {WEIGHTS_INDEX_NAME} or {TORCH_WEIGHTS_NAME})"
    )


def load_tokenizer(model_path: str | Path):
    from transformers import AutoTokenizer

    path = Path(model_path)
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer.model").is_file():
        raise CheckpointError(f"{str(path)!r} has no tokenizer.json")
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot load the tokenizer from {path}: {e}") from None


def _empty_weights_context():
    """Build big models without allocating/initialising parameters twice (buffers stay real)."""
    try:
        from accelerate import init_empty_weights
    except ImportError:
        return nullcontext()
    return init_empty_weights()


def _summarise(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Assign checkpoint tensors to the model; missing keys are an error, unexpected a warning."""
    expected = model.state_dict()
    missing = sorted(k for k in expected if k not in state)
    unexpected = sorted(k for k in state if k not in expected)
    if missing:
        raise CheckpointError(f"{source} lacks {len(missing)} weight(s): {_summarise(missing)}")
    if unexpected:
        logger.warning("%s has %d unused weight(s): %s", source, len(unexpected), _summarise(unexpected))
    bad = [k for k in expected if tuple(state[k].shape) != tuple(expected[k].shape)]
    if bad:
        k = bad[0]
        raise CheckpointError(
            f"{source}: {len(bad)} weight(s) have the wrong shape, e.g. {k} is {tuple(state[k].shape)}, "
            f"model expects {tuple(expected[k].shape)}"
        )
    model.load_state_dict({k: state[k] for k in expected}, strict=True, assign=True)


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
    `vision_kwargs`. `model_base` (LoRA merge) is not supported yet.
    """
    if model_base is not None:
        raise ConfigError("model_base (LoRA base + delta) loading is not supported yet")
    if "llada" not in model_name:
        raise ConfigError(f"model_name {model_name!r}: only the LaViDa-LLaDA path (llava_llada) is implemented")
    device = torch.device(device)
    dtype = torch_dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if str(model_path) == SMALL_MODEL_NAME:
        tokenizer, model = build_small_model(config_overrides=config_overrides)
    else:
        raw = read_config(model_path)
        raw.update(config_overrides or {})
        config = LlavaLLaDAConfig.from_dict(raw)
        state = read_state_dict(model_path)
        tokenizer = load_tokenizer(model_path)
        with _empty_weights_context():
            model = LlavaLLaDAForCausalLM(config)
        load_weights(model, state, str(model_path))
        del state
    model = model.to(device=device, dtype=dtype).eval()
    image_processor = siglip_image_processor(model.model.vision_tower.image_size)
    return tokenizer, model, image_processor, model.config.mm.tokenizer_model_max_length


def siglip_image_processor(size: int):
    """An HF image processor with LaViDa's preprocessing (bicubic resize, mean/std 0.5), for
    callers that expect upstream's 4-tuple; this package itself uses `llava.mm_utils`."""
    try:  # transformers 5 names the torchvision-free processor separately
        from transformers import SiglipImageProcessorPil as SiglipImageProcessor
    except ImportError:
        from transformers import SiglipImageProcessor

    return SiglipImageProcessor(size={"height": size, "width": size}, image_mean=[0.5] * 3, image_std=[0.5] * 3)


def save_pretrained(model: LlavaLLaDAForCausalLM, tokenizer, folder: str | Path) -> Path:
    """Write config + safetensors + tokenizer; a temp folder renamed at the end, so a failure
    never leaves a half-written checkpoint behind."""
    from safetensors.torch import save_file

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(f"{str(folder)!r} exists and is not a folder")
    folder.parent.mkdir(parents=True, exist_ok=True)
    # mkdir (not mkdtemp, which is always 0700) so the checkpoint gets the usual umask permissions
    tmp = folder.parent / f"{folder.name}.tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    old = tmp.with_name(tmp.name + "-old")  # unique because tmp is
    try:
        (tmp / CONFIG_NAME).write_text(json.dumps(model.config.to_dict(), indent=2))
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        tokenizer.save_pretrained(str(tmp))
        # Move the old checkpoint aside (not delete) until the new one is in place, so a failure
        # of the final rename puts it back instead of losing it.
        if folder.exists():
            os.replace(folder, old)
        try:
            os.replace(tmp, folder)
        except BaseException:
            if old.exists():
                os.replace(old, folder)
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
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


def _tokenizer_corpus() -> list[str]:
    words = _CORPUS_WORDS.split()
    lines = [SYSTEM_PROMPT, "Answer the question using a single word or phrase.", "Describe the image in detail."]
    for i, w in enumerate(words):  # fixed, deterministic sentences
        lines.append(f"What is the {w} in the image? The {w} is {i} and {words[(i * 7) % len(words)]}.")
        lines.append(f"{w.capitalize()} {words[(i * 3) % len(words)]} {i * 13 % 101}% {w}.")
    return lines


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
        "image_grid_pinpoints": [[384, 768], [768, 384], [768, 768], [1152, 384], [384, 1152]],
        "mm_spatial_pool_mode": "bilinear", "tokenizer_model_max_length": 8192,
        # not an upstream checkpoint, so no numerics to match: the faster kernel (eager is tested too)
        "mm_vision_attn_implementation": "sdpa",
        "vision_config": {
            "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 256,
            "patch_size": 14, "image_size": 384, "num_channels": 3, "hidden_act": "gelu_pytorch_tanh",
            "layer_norm_eps": 1e-6,
        },
    }


def build_small_model(seed: int = 0, config_overrides: Optional[dict] = None):
    """(tokenizer, model) of the built-in small LaViDa: random weights, LLaDA-style init.
    `config_overrides` replaces config keys (e.g. `mm_patch_merge_type`) before building."""
    tokenizer = build_small_tokenizer()
    config = LlavaLLaDAConfig.from_dict({**small_model_config(tokenizer), **(config_overrides or {})})
    gen = torch.Generator().manual_seed(seed)
    model = LlavaLLaDAForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("image_newline"):
                p.normal_(0.0, 1.0 / math.sqrt(p.numel()), generator=gen)
            elif p.dim() >= 2:
                p.normal_(0.0, 0.02, generator=gen)
            elif name.endswith("bias"):
                p.zero_()
            else:  # norm weights
                p.fill_(1.0)
    return tokenizer, model.eval()
