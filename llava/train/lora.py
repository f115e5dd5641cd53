"""LoRA targets from a YAML file, adapter save/load/merge, and QLoRA-style quantisation of the frozen LM.

LoRA config file (`scripts/lora_shirg.yaml` is the SHIRG stage's):

    r: 64                     # rank (fallback_r documents the cheaper setting; pass --lora_r to use it)
    lora_alpha: 128
    lora_dropout: 0.05
    fallback_r: 32            # informational
    target_modules:           # FULL module names, with {a,b} alternatives and {0-3} integer ranges
      - model.vision_tower.vision_tower.vision_model.encoder.layers.{0-3}.self_attn.{q_proj,k_proj,v_proj}
      - model.mm_projector.{0,2}
    non_lora_trainable: []    # optional: full names of modules/parameters trained fully next to LoRA

Matching rule (decided here, tested): every expanded name must be a Linear of the model, except that a name
whose only problem is a layer index past the end of its layer list (layers 4-5 of the built-in model's 3-layer
tower) is skipped with a warning — the same name with index 0 must exist, so a typo anywhere else is still
caught. A pattern with a typo, or one that matches a non-Linear module, is an error naming the pattern; so is a
config whose patterns leave no target at all. Unknown keys in the file are errors.

The adapter folder is PEFT's standard one (`adapter_config.json` + `adapter_model.safetensors`, keys
`base_model.model.<full name>.lora_{A,B}.weight`), so `peft.PeftModel.from_pretrained(base, folder)` reads it.
Next to it, `non_lora_trainables.safetensors` holds the fully trained non-LoRA parameters under their plain
state-dict names (upstream used a `.bin` with the same idea).
"""
from __future__ import annotations

import itertools
import json
import logging
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

import torch
from torch import nn

from llava.errors import CheckpointError, ConfigError, InputError
from llava.utils import give_mode_of, logger

# peft imports bitsandbytes, whose CPU backend logs a warning that its optional "kernels" package is missing on
# every import; they only speed up 4-bit matmuls on CPU (bitsandbytes then uses its built-in CPU path), so the
# notice is kept out of every adapter load, the demo's included; real errors from bitsandbytes still show.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
NON_LORA_WEIGHTS = "non_lora_trainables.safetensors"
DEFAULT_LORA_CONFIG = Path(__file__).resolve().parents[2] / "scripts" / "lora_shirg.yaml"
LORA_KEYS = {"r", "lora_alpha", "lora_dropout", "fallback_r", "target_modules", "non_lora_trainable", "bias"}


@dataclass
class LoraSpec:
    r: int = 64
    lora_alpha: int = 128
    lora_dropout: float = 0.05
    target_modules: list[str] = field(default_factory=list)
    non_lora_trainable: list[str] = field(default_factory=list)
    fallback_r: Optional[int] = None
    source: str = "<defaults>"


def read_lora_config(path: str | Path, r: Optional[int] = None, alpha: Optional[int] = None,
                     dropout: Optional[float] = None) -> LoraSpec:
    """The YAML file, with command-line r/alpha/dropout (when given) taking precedence."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise InputError(f"--lora_config {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with target_modules, r, lora_alpha, lora_dropout")
    unknown = sorted(set(raw) - LORA_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(LORA_KEYS))}")
    if raw.get("bias", "none") != "none":
        raise ConfigError(f"{path}: bias {raw['bias']!r} is not supported (only 'none')")
    targets = raw.get("target_modules")
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) and t for t in targets):
        raise ConfigError(f"{path}: target_modules must be a non-empty list of module-name patterns")
    extra = raw.get("non_lora_trainable") or []
    if not isinstance(extra, list) or not all(isinstance(t, str) and t for t in extra):
        raise ConfigError(f"{path}: non_lora_trainable must be a list of names")
    spec = LoraSpec(
        r=int(r if r is not None else raw.get("r", 64)),
        lora_alpha=int(alpha if alpha is not None else raw.get("lora_alpha", 128)),
        lora_dropout=float(dropout if dropout is not None else raw.get("lora_dropout", 0.05)),
        target_modules=list(targets), non_lora_trainable=list(extra), fallback_r=raw.get("fallback_r"),
        source=str(path),
    )
    if spec.r < 1 or spec.lora_alpha <= 0 or not 0 <= spec.lora_dropout < 1:
        raise InputError(f"LoRA r must be >= 1, alpha > 0 and dropout in [0, 1); got r={spec.r}, "
                         f"alpha={spec.lora_alpha}, dropout={spec.lora_dropout}")
    return spec


# ---- pattern expansion and matching ------------------------------------------------------------------------------
_BRACES = re.compile(r"\{([^{}]*)\}")


def expand_pattern(pattern: str) -> list[str]:
    """`a.{0-2}.{x,y}` -> [a.0.x, a.0.y, a.1.x, ...]; `{N-M}` is an inclusive integer range."""
    parts, choices, pos = [], [], 0
    for m in _BRACES.finditer(pattern):
        parts.append(pattern[pos:m.start()])
        body = m.group(1)
        rng = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", body)
        if rng:
            lo, hi = int(rng.group(1)), int(rng.group(2))
            if hi < lo:
                raise ConfigError(f"LoRA target pattern {pattern!r}: empty range {{{body}}}")
            options = [str(i) for i in range(lo, hi + 1)]
        else:
            options = [o.strip() for o in body.split(",")]
            if not all(options):
                raise ConfigError(f"LoRA target pattern {pattern!r}: empty alternative in {{{body}}}")
        choices.append(options)
        pos = m.end()
    tail = pattern[pos:]
    if "{" in tail or "}" in tail or any("{" in p or "}" in p for p in parts):
        raise ConfigError(f"LoRA target pattern {pattern!r}: unbalanced or nested braces")
    parts.append(tail)
    out = []
    for combo in itertools.product(*choices):
        out.append("".join(p + c for p, c in itertools.zip_longest(parts, combo, fillvalue="")))
    return out


def _missing_layer(modules: dict[str, nn.Module], name: str) -> Optional[str]:
    """Why `name` is absent when the reason is only a layer index past the end of a layer list, else None."""
    comps = name.split(".")
    for i in range(1, len(comps) + 1):
        prefix = ".".join(comps[:i])
        if prefix in modules:
            continue
        parent = ".".join(comps[:i - 1])
        container = modules.get(parent)
        if isinstance(container, nn.ModuleList) and comps[i - 1].isdigit() and int(comps[i - 1]) >= len(container):
            same_in_layer0 = ".".join(comps[:i - 1] + ["0"] + comps[i:])
            if same_in_layer0 in modules:
                return f"{parent} has {len(container)} layers"
        return None
    return None


def _is_linear(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    # Quantised Linear layers (LoRA on them is what QLoRA means). A model can only hold them once bitsandbytes
    # is imported, so it is looked up, not imported: importing it on a CPU-only machine prints a kernel warning
    # into every LoRA load (the demo's SHIRG + LoRA step).
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return False
    return isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def resolve_targets(model: nn.Module, patterns: Iterable[str]) -> list[str]:
    """Full names of the Linear modules the patterns name, in model order (see the module docstring's rule)."""
    modules = dict(model.named_modules())
    found: dict[str, None] = {}
    for pattern in patterns:
        names = expand_pattern(pattern)
        hits, skipped = [], []
        for name in names:
            if name in modules:
                if not _is_linear(modules[name]):
                    raise ConfigError(f"LoRA target pattern {pattern!r}: {name} is a {type(modules[name]).__name__}, "
                                      "LoRA needs a Linear layer")
                hits.append(name)
                continue
            reason = _missing_layer(modules, name)
            if reason is None:
                raise ConfigError(f"LoRA target pattern {pattern!r} matches no module: {name!r} does not exist in "
                                  f"this model (check the spelling; names are full module names such as "
                                  f"'model.mm_projector.0')")
            skipped.append((name, reason))
        if skipped:
            logger.warning("LoRA target pattern %r: skipping %d name(s) for layers this model does not have (%s)%s",
                           pattern, len(skipped), skipped[0][1],
                           "; the pattern matches nothing here" if not hits else "")
        found.update(dict.fromkeys(hits))
    if not found:
        raise ConfigError("the LoRA target patterns leave no module to adapt in this model")
    order = {n: i for i, n in enumerate(modules)}
    return sorted(found, key=order.__getitem__)


def resolve_parameter_names(model: nn.Module, patterns: Iterable[str]) -> list[str]:
    """Parameters named by module or parameter patterns (a module means all its parameters); zero matches = error."""
    params = [n for n, _ in model.named_parameters()]
    out: dict[str, None] = {}
    for pattern in patterns:
        hits = []
        for name in expand_pattern(pattern):
            hits += [p for p in params if p == name or p.startswith(name + ".")]
        if not hits:
            raise ConfigError(f"non_lora_trainable pattern {pattern!r} matches no parameter of this model")
        out.update(dict.fromkeys(hits))
    return list(out)


# ---- applying LoRA ------------------------------------------------------------------------------------------------
def lora_config(spec: LoraSpec, targets: list[str], base_name: Optional[str] = None):
    from peft import LoraConfig

    return LoraConfig(r=spec.r, lora_alpha=spec.lora_alpha, lora_dropout=spec.lora_dropout, bias="none",
                      target_modules=list(targets), base_model_name_or_path=base_name)


def apply_lora(model: nn.Module, spec: LoraSpec, base_name: Optional[str] = None):
    """Inject LoRA layers into `model` IN PLACE -> (peft wrapper for saving, resolved target names).

    Train on `model` itself: the wrapper's `.model` attribute is our model, not our model's `.model`, so the
    training code never goes through it. Every non-LoRA parameter is frozen by peft; the caller unfreezes
    the chosen non-LoRA trainables afterwards.
    """
    from peft import get_peft_model

    targets = resolve_targets(model, spec.target_modules)
    peft_model = get_peft_model(model, lora_config(spec, targets))
    # recorded in adapter_config.json for the reader (peft would reset a name given before wrapping)
    peft_model.peft_config["default"].base_model_name_or_path = base_name
    return peft_model, targets


def lora_parameter_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters() if ".lora_A." in n or ".lora_B." in n]


def plain_name(name: str) -> str:
    """State-dict name with peft's wrapper segment removed (`x.q_proj.base_layer.weight` -> `x.q_proj.weight`)."""
    return name.replace(".base_layer.", ".")


def sort_target_modules(config_file: Path) -> None:
    """Rewrite peft's `target_modules` sorted: peft keeps them as a set, so the saved order follows Python's
    per-process string hashing and two identical runs would write different adapter_config.json files."""
    cfg = json.loads(config_file.read_text())
    if isinstance(cfg.get("target_modules"), list):
        cfg["target_modules"] = sorted(cfg["target_modules"])
        config_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def save_adapter(peft_model, model: nn.Module, folder: Path, non_lora: list[str],
                 state_dict: Optional[dict] = None) -> None:
    """Write PEFT's adapter files and `non_lora_trainables.safetensors` into an existing folder.

    `state_dict` (our model's full state, names as in `model`) replaces reading the parameters, for ZeRO-3
    where they are partitioned."""
    from safetensors.torch import save_file

    if state_dict is None:
        state_dict = {n: p for n, p in model.named_parameters()}
    lora = {f"base_model.model.{n}": state_dict[n] for n in lora_parameter_names(model)}
    peft_model.save_pretrained(str(folder), state_dict=lora, safe_serialization=True, save_embedding_layers=False)
    (folder / "README.md").unlink(missing_ok=True)  # peft's model-card stub says nothing about this model
    sort_target_modules(folder / ADAPTER_CONFIG)
    extra = {plain_name(n): state_dict[n].detach().contiguous().cpu() for n in non_lora}
    save_file(extra, str(folder / NON_LORA_WEIGHTS), metadata={"format": "pt"})
    give_mode_of(folder / ADAPTER_CONFIG, *folder.glob("*.safetensors"))


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None


def load_adapter_weights(model: nn.Module, folder: str | Path) -> None:
    """Copy a saved adapter's LoRA and non-LoRA weights into a model that already has the same LoRA layers
    (resuming); every LoRA parameter of the model must be in the file."""
    folder = Path(folder)
    lora = _read_safetensors(folder / ADAPTER_WEIGHTS)
    params = dict(model.named_parameters())
    wanted = {n: n.replace(".default.", ".") for n in lora_parameter_names(model)}
    missing = [n for n, key in wanted.items() if f"base_model.model.{key}" not in lora]
    if missing:
        raise CheckpointError(f"{folder / ADAPTER_WEIGHTS} lacks {len(missing)} LoRA weight(s), e.g. {missing[0]}")
    with torch.no_grad():
        for n, key in wanted.items():
            _copy_checked(params[n], lora[f"base_model.model.{key}"], n, folder / ADAPTER_WEIGHTS)
    load_non_lora(model, folder)


def load_non_lora(model: nn.Module, folder: Path) -> None:
    path = Path(folder) / NON_LORA_WEIGHTS
    if not path.is_file():
        return
    state = _read_safetensors(path)
    params = {plain_name(n): p for n, p in model.named_parameters()}
    unknown = [k for k in state if k not in params]
    if unknown:
        raise CheckpointError(f"{path}: parameter {unknown[0]!r} does not exist in the model")
    with torch.no_grad():
        for k, t in state.items():
            _copy_checked(params[k], t, k, path)


def _copy_checked(param: torch.Tensor, value: torch.Tensor, name: str, source: Path) -> None:
    if tuple(param.shape) != tuple(value.shape):
        raise CheckpointError(f"{source}: {name} has shape {tuple(value.shape)}, the model expects "
                              f"{tuple(param.shape)}")
    param.copy_(value.to(param.dtype))


def load_lora_adapter(model: nn.Module, adapter: str | Path, merge: bool = True) -> nn.Module:
    """Apply a saved adapter folder to a loaded base model; with `merge`, fold it into the weights and return
    the plain model (inference then runs exactly the base model's code)."""
    from peft import LoraConfig, get_peft_model

    folder = Path(adapter)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (folder / name).is_file():
            raise CheckpointError(f"{str(folder)!r} is not a LoRA adapter folder: {name} is missing")
    try:
        cfg = LoraConfig.from_pretrained(str(folder))
    except Exception as e:
        raise CheckpointError(f"cannot read {folder / ADAPTER_CONFIG}: {e}") from None
    targets = sorted(cfg.target_modules) if not isinstance(cfg.target_modules, str) else [cfg.target_modules]
    modules = dict(model.named_modules())
    absent = [t for t in targets if t not in modules]
    if absent:
        raise CheckpointError(f"{folder / ADAPTER_CONFIG}: target module {absent[0]!r} does not exist in the base "
                              "model; was the adapter trained on a different base?")
    cfg.inference_mode = not merge
    cfg.base_model_name_or_path = None  # informational only; peft would warn that our model has no hub name
    peft_model = get_peft_model(model, cfg)
    load_adapter_weights(model, folder)
    if merge:
        model = peft_model.merge_and_unload()
    return model


# ---- QLoRA: quantise the frozen LM's linear layers ---------------------------------------------------------------
def require_bitsandbytes():
    try:
        import bitsandbytes as bnb
    except Exception as e:  # ImportError, or a broken install raising anything at import
        raise InputError(f"--bits 4/8 needs the bitsandbytes package (pip install bitsandbytes): {e}") from None
    return bnb


def quantize_language_model(model: nn.Module, bits: int, device: torch.device,
                            compute_dtype: torch.dtype = torch.float32) -> list[str]:
    """Replace every Linear inside the LLaDA blocks with bitsandbytes' 4-bit (NF4, double quantisation, as
    upstream's `--bits 4`) or 8-bit (LLM.int8) layer; returns the replaced names. The LM head
    (`transformer.ff_out`) stays in full precision: the model reads its weight directly for the logits, and the
    vision tower and projector are never quantised (they are what LoRA trains). The weights are quantised when
    moved to `device`, so this runs on the model's final device."""
    bnb = require_bitsandbytes()
    if bits not in (4, 8):
        raise InputError(f"--bits must be 4, 8 or 16, got {bits}")
    replaced = []
    blocks = model.model.transformer.blocks
    for bi, block in enumerate(blocks):
        for name, child in list(block.named_children()):
            if not isinstance(child, nn.Linear):
                continue
            w = child.weight.data
            if bits == 4:
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=compute_dtype, quant_type="nf4", compress_statistics=True)
                q.weight = bnb.nn.Params4bit(w.to("cpu").clone(), requires_grad=False, quant_type="nf4",
                                             compress_statistics=True)
            else:
                q = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=child.bias is not None,
                                        has_fp16_weights=False, threshold=6.0)
                q.weight = bnb.nn.Int8Params(w.to("cpu").clone(), requires_grad=False, has_fp16_weights=False)
            if child.bias is not None:
                q.bias = nn.Parameter(child.bias.data.clone(), requires_grad=False)
            setattr(block, name, q.to(device))
            replaced.append(f"model.transformer.blocks.{bi}.{name}")
    return replaced


# ---- parameter counts at the real LaViDa-8B dims (meta device: nothing allocated) --------------------------------
def lavida_8b_config() -> dict:
    """config.json keys of LaViDa-LLaDA-8B (SigLIP-so400m 27 layers, 26 kept; 1152->4096->4096 projector;
    LLaDA 4096 x 32, MLP 12288, vocab 126464)."""
    from llava.constants import EOS_TOKEN_ID, LLADA_EMBEDDING_SIZE, MASK_TOKEN_ID

    return {
        "d_model": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 32, "mlp_hidden_size": 12288,
        "vocab_size": LLADA_EMBEDDING_SIZE, "embedding_size": LLADA_EMBEDDING_SIZE, "rope_theta": 500000.0,
        "mask_token_id": MASK_TOKEN_ID, "eos_token_id": EOS_TOKEN_ID, "pad_token_id": EOS_TOKEN_ID,
        "mm_vision_tower": "google/siglip-so400m-patch14-384", "mm_hidden_size": 1152,
        "mm_projector_type": "mlp2x_gelu", "mm_patch_merge_type": "spatial_unpad", "image_aspect_ratio": "anyres",
    }


def count_trainable_at_lavida_dims(spec: Optional[LoraSpec], tunable_prefixes: Iterable[str] = ()) -> dict:
    """Build LaViDa-8B on the meta device, apply the same LoRA spec and tunable parts, count parameters."""
    from llava.model.builder import build_empty_model
    from llava.model.language_model.llava_llada import LlavaLLaDAConfig

    model = build_empty_model(LlavaLLaDAConfig.from_dict(lavida_8b_config()))
    total = sum(p.numel() for p in model.parameters())
    lora = 0
    if spec is not None:
        with torch.device("meta"):
            apply_lora(model, spec)
        lora = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    prefixes = tuple(tunable_prefixes)
    full = sum(p.numel() for n, p in model.named_parameters() if ".lora_" not in n and n.startswith(prefixes)) \
        if prefixes else 0
    return {"total": total, "lora": lora, "non_lora": full, "trainable": lora + full}
