"""Fixtures of the evaluation tests: a fixture data root and a "sharp" small model.

The built-in small model's random LM weights (std 0.02) answer every question with one repeated token, which
would make "batch B equals batch 1" and "resumed equals uninterrupted" hold trivially. Scaling its LM weights by
10 gives answers that change with the image, the question and the position, so those comparisons mean something.
"""

import pytest
import torch

from llava.model.builder import build_small_model, save_pretrained
from tests.cli_helpers import call_main
from tests.llava.eval.fixtures import write_fixture_root

SHARPEN = 10.0


def sharp_small_model():
    """(tokenizer, model): the built-in small model with its LM's matrices scaled by `SHARPEN`."""
    tok, model = build_small_model()
    with torch.no_grad():
        for p in model.get_model().transformer.parameters():
            if p.dim() >= 2:
                p.mul_(SHARPEN)
    return tok, model


@pytest.fixture(scope="session")
def sharp_model():
    return sharp_small_model()


@pytest.fixture(scope="session")
def sharp_checkpoint(sharp_model, tmp_path_factory):
    """A read-only checkpoint folder of `sharp_model` (load it with `--model-path`)."""
    tok, model = sharp_model
    return save_pretrained(model, tok, tmp_path_factory.mktemp("sharp") / "lavida-sharp")


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    """A read-only fixture data root (chartqa/, docvqa/, vqav2/, entitygrid/); copy it before damaging it."""
    return write_fixture_root(tmp_path_factory.mktemp("evaldata"))


@pytest.fixture
def run_eval(capsys):
    """`run_eval(*argv) -> (exit code, stdout, stderr)` of `llava.eval.evaluate.main` in this process."""
    from llava.eval.evaluate import main

    def call(*argv):
        code = call_main(main, argv)
        out, err = capsys.readouterr()
        return code, out, err

    return call
