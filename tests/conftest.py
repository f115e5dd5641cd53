"""Shared, session-scoped fixtures: the built-in small LaViDa model is built once per test session.

Tests that use these fixtures must not mutate them (use `monkeypatch` for temporary attribute changes).
"""

import pytest

import llava.model.builder as builder
from llava.model.builder import build_small_model, save_pretrained
from tests.cli_helpers import call_main


@pytest.fixture(scope="session")
def small_model():
    """(tokenizer, model) of `llava.model.builder.build_small_model()` (seed 0, fp32, eval mode)."""
    return build_small_model()


@pytest.fixture(scope="session")
def trained_model():
    """(tokenizer, model) of the committed trained built-in model (`make train-tiny`), fp32, eval mode."""
    from llava.eval.run import TRAINED_MODEL
    from llava.model.builder import load_pretrained_model

    tok, model, _, _ = load_pretrained_model(TRAINED_MODEL)
    return tok, model


@pytest.fixture(scope="session")
def small_tokenizer(small_model):
    return small_model[0]


@pytest.fixture(scope="session")
def small_checkpoint(small_model, tmp_path_factory):
    """A read-only checkpoint folder of the small model; copy it before damaging it."""
    tok, model = small_model
    return save_pretrained(model, tok, tmp_path_factory.mktemp("ckpt") / "lavida-small")


@pytest.fixture
def run_cli(small_model, monkeypatch, capsys):
    """`run_cli(*argv) -> (exit code, stdout, stderr)` for `llava.eval.run.main` on the session model (unless
    argv names a --model-path).

    `main` configures logging itself; root handlers are cleared around the call so its stderr
    handler really writes to the captured stderr, as in a terminal.
    """
    from llava.eval.run import main

    real = builder.build_small_model

    def cached(*args, **kwargs):  # the default small model is the session one; anything else is built
        return small_model if not args and not any(kwargs.values()) else real(*args, **kwargs)

    monkeypatch.setattr(builder, "build_small_model", cached)

    def call(*argv):
        argv = list(argv)
        if "--model-path" not in argv:  # the CLI's default is the trained model; these tests use the session one
            argv = ["--model-path", builder.SMALL_MODEL_NAME, *argv]
        code = call_main(main, argv)
        out, err = capsys.readouterr()
        return code, out, err

    return call
