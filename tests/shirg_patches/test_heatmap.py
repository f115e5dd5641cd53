import pytest
import torch
from PIL import Image

from llava.constants import FOVEA_TOKENS, SHIRG_KEPT
from llava.errors import InputError
from shirg_patches.heatmap import save_heatmap


def _image(size=(640, 480)):
    return Image.new("RGB", size, (200, 180, 160))


def test_writes_png_and_creates_parent_dirs(tmp_path):
    path = tmp_path / "a" / "b" / "heat.png"
    kept = torch.sort(torch.randperm(FOVEA_TOKENS, generator=torch.Generator().manual_seed(0))[:SHIRG_KEPT]).values
    out = save_heatmap(path, _image(), (96, 16, 544, 464), kept, scores=torch.rand(FOVEA_TOKENS), title="demo")
    assert out == path
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width > 0
    assert [p.name for p in path.parent.iterdir()] == ["heat.png"]


def test_extreme_aspect_without_scores(tmp_path):
    path = tmp_path / "thin.png"
    save_heatmap(path, _image((14, 4000)), (0, 0, 14, 4000), torch.arange(10))
    with Image.open(path) as im:
        assert im.format == "PNG"


def test_directory_path_is_input_error(tmp_path):
    with pytest.raises(InputError, match="directory"):
        save_heatmap(tmp_path, _image(), (0, 0, 448, 448), torch.arange(10))


def test_failure_leaves_nothing(tmp_path):
    with pytest.raises(ValueError):
        save_heatmap(tmp_path / "x.png", _image(), (0, 0, 448, 448), torch.tensor([5000]))
    with pytest.raises(InputError, match="not supported"):
        save_heatmap(tmp_path / "x.nope", _image(), (0, 0, 448, 448), torch.arange(10))
    assert list(tmp_path.iterdir()) == []
