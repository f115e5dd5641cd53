"""Vision→LM projector. LaViDa uses `mlp2x_gelu`: Linear(1152→4096) · GELU · Linear(4096→4096)."""

import re

from torch import nn

from llava.errors import ConfigError

SUPPORTED_PROJECTORS = ("linear", "mlp{N}x_gelu", "identity")


def build_vision_projector(projector_type: str, mm_hidden_size: int, hidden_size: int) -> nn.Module:
    """Build the projector named by `mm_projector_type`.

    `mlpNx_gelu` is a Sequential of N Linears with exact-erf GELUs between, so parameter keys sit at even indices
    (`0.weight`, `2.weight`, …) exactly as in LaViDa checkpoints.
    """
    if projector_type == "linear":
        return nn.Linear(mm_hidden_size, hidden_size)
    mlp = re.fullmatch(r"mlp([1-9]\d*)x_gelu", projector_type)
    if mlp:
        layers: list[nn.Module] = [nn.Linear(mm_hidden_size, hidden_size)]
        for _ in range(int(mlp.group(1)) - 1):
            layers += [nn.GELU(), nn.Linear(hidden_size, hidden_size)]
        return nn.Sequential(*layers)
    if projector_type == "identity":
        if mm_hidden_size != hidden_size:
            raise ConfigError(
                f"identity projector needs mm_hidden_size == hidden_size; got {mm_hidden_size} and {hidden_size}"
            )
        return nn.Identity()
    raise ConfigError(f"unknown mm_projector_type {projector_type!r}; supported: {', '.join(SUPPORTED_PROJECTORS)}")
