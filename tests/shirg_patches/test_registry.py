"""The registry contract: a method is one registration (options, select) and the core, the CLI and
the contract check pick it up with no other change; typed options reject what does not apply."""
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image

from llava.errors import InputError
from llava.eval.run import build_parser, prune_options
from shirg_patches import (
    REGISTRY,
    BudgetOptions,
    PruneContext,
    PruneMethod,
    Selection,
    get_method,
    register,
    run_select,
)
from shirg_patches.registry import option


@dataclass(frozen=True)
class EveryOtherOptions(BudgetOptions):
    offset: int = option(0, "every-other: start at this index", flag="every_other_offset")

    def validate(self) -> None:
        super().validate()
        if self.offset not in (0, 1):
            raise InputError(f"--every_other_offset must be 0 or 1, got {self.offset}")


def select_every_other(ctx: PruneContext) -> torch.Tensor:
    return torch.arange(ctx.options.offset, ctx.num_tokens, 2)[: ctx.budget].flip(0)  # unsorted on purpose


@pytest.fixture
def toy_method():
    method = register(PruneMethod("every_other", "toy: every other candidate", EveryOtherOptions,
                                  select=select_every_other))
    yield method
    del REGISTRY["every_other"]


def test_a_new_method_is_one_registration(toy_method, small_model):
    tok, model = small_model
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8))
    with torch.no_grad():
        v = model.encode_image(image, "every_other", None, {"budget": 50, "offset": 1, "seed": 0})
    assert v.lm_token_count == 50 and torch.equal(v.kept, torch.arange(1, 100, 2))  # sorted by the core
    args = build_parser().parse_args(["--prune_method", "every_other", "--every_other_offset", "1", "--budget", "7"])
    assert prune_options(args) == {"offset": 1, "budget": 7}


def test_flags_of_another_method_are_rejected(toy_method):
    args = build_parser().parse_args(["--prune_method", "random", "--every_other_offset", "1"])
    with pytest.raises(InputError, match="--every_other_offset only applies to --prune_method every_other"):
        prune_options(args)


@pytest.mark.parametrize("given,message", [
    ({"offset": 2}, "must be 0 or 1"),
    ({"budget": 0}, "at least 1"),
    ({"keep_ratio": 0.5}, "'keep_ratio' does not apply to --prune_method every_other"),
    ({"offset": "x"}, "expects int"),
])
def test_typed_options_validate(toy_method, given, message):
    with pytest.raises(InputError, match=message):
        toy_method.make_options(given)


@pytest.mark.parametrize("candidates, kept, note", [
    (3699, 980, None), (980, 980, None),
    (810, 810, "the default budget 980 is more than this image's 810 candidate tokens, so all 810 are kept"),
])
def test_default_budget_is_clamped_to_the_candidates(candidates, kept, note):
    opts = BudgetOptions()
    assert opts.budget is None and opts.budget_for(candidates) == kept
    said = opts.budget_note(candidates)
    assert said is None if note is None else said.startswith(note)


def test_explicit_budget_is_not_clamped():
    opts = BudgetOptions(budget=980)
    assert opts.budget_for(3699) == 980 and opts.budget_note(810) is None
    with pytest.raises(InputError, match="--budget 980 must be between 1 and the 810 candidate tokens of this image"):
        opts.budget_for(810)


def test_budget_flag_parses_as_int():
    args = build_parser().parse_args(["--prune_method", "random", "--budget", "300"])
    assert prune_options(args) == {"budget": 300}


def test_string_options_are_parsed_by_type():
    opts = get_method("shirg").make_options({"keep_ratio": "0.8", "fovea": "saliency"})
    assert opts.keep_ratio == 0.8 and opts.fovea == "saliency"


@pytest.mark.parametrize("indices,message", [
    (torch.arange(9), "returned 9 tokens"),
    (torch.tensor([0, 0, 1, 2, 3, 4, 5, 6, 7, 8]), "duplicate"),
    (torch.arange(1, 11) * 10, "out of range"),
])
def test_run_select_is_the_one_contract_check(indices, message):
    ctx = PruneContext(features=torch.zeros(100, 4), vision_features=torch.zeros(100, 2), view_shapes=[(10, 10)],
                       budget=10)
    with pytest.raises(RuntimeError, match=message):
        run_select(lambda _: indices, ctx)


def test_run_select_permutes_merged_tokens_with_their_indices():
    ctx = PruneContext(features=torch.zeros(10, 1), vision_features=torch.zeros(10, 1), view_shapes=[(2, 5)], budget=3)
    sel = run_select(lambda _: Selection(torch.tensor([7, 2, 5]), torch.tensor([[7.0], [2.0], [5.0]])), ctx)
    assert sel.indices.tolist() == [2, 5, 7] and sel.tokens[:, 0].tolist() == [2.0, 5.0, 7.0]


def test_core_names_no_method():
    from pathlib import Path

    import llava.model.llava_arch as arch

    text = Path(arch.__file__).read_text().lower().replace("shirg_patches", "")
    for name, method in REGISTRY.items():
        if method.select is not None:  # LaViDa's own pool/full are the core's defaults, not plug-ins
            assert f'"{name}"' not in text and f"'{name}'" not in text, name
    assert "fovea" not in text and "topv" not in text and "shirg" not in text
