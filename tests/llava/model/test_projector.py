"""Projector: LaViDa key layout (`mm_projector.0.*`, `.2.*`), exact GELU, unknown types rejected."""

import pytest
import torch
from torch import nn

from llava.errors import ConfigError
from llava.model.multimodal_projector.builder import build_vision_projector


@pytest.mark.shapes
def test_mlp2x_gelu_keys_and_shapes():
    projector = build_vision_projector("mlp2x_gelu", 24, 40)
    shapes = {k: tuple(v.shape) for k, v in projector.state_dict().items()}
    assert shapes == {"0.weight": (40, 24), "0.bias": (40,), "2.weight": (40, 40), "2.bias": (40,)}
    assert isinstance(projector[1], nn.GELU) and projector[1].approximate == "none"
    assert projector(torch.randn(2, 5, 24)).shape == (2, 5, 40)


def test_mlp3x_gelu_and_linear_and_identity():
    assert sorted(build_vision_projector("mlp3x_gelu", 8, 16).state_dict()) == [
        "0.bias", "0.weight", "2.bias", "2.weight", "4.bias", "4.weight"
    ]
    assert sorted(build_vision_projector("linear", 8, 16).state_dict()) == ["bias", "weight"]
    identity = build_vision_projector("identity", 8, 8)
    x = torch.randn(3, 8)
    assert identity(x) is x and not list(identity.parameters())


@pytest.mark.parametrize("name", ["mlp2x_relu", "mlp0x_gelu", "pooler", "MLP2x_gelu", ""])
def test_unknown_type(name):
    with pytest.raises(ConfigError, match="supported: linear, mlp{N}x_gelu, identity"):
        build_vision_projector(name, 8, 16)


def test_identity_size_mismatch():
    with pytest.raises(ConfigError, match="identity projector"):
        build_vision_projector("identity", 8, 16)
