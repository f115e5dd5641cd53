"""Shared, session-scoped fixtures: the built-in small LaViDa model is built once per test session.

Tests that use these fixtures must not mutate them (use `monkeypatch` for temporary attribute changes).
"""
import pytest

from llava.model.builder import build_small_model, save_pretrained


@pytest.fixture(scope="session")
def small_model():
    """(tokenizer, model) of `llava.model.builder.build_small_model()` (seed 0, fp32, eval mode)."""
    return build_small_model()


@pytest.fixture(scope="session")
def small_tokenizer(small_model):
    return small_model[0]


@pytest.fixture(scope="session")
def small_checkpoint(small_model, tmp_path_factory):
    """A read-only checkpoint folder of the small model; copy it before damaging it."""
    tok, model = small_model
    return save_pretrained(model, tok, tmp_path_factory.mktemp("ckpt") / "lavida-small")
