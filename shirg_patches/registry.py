"""The `--prune_method` registry: CLI name -> how the visual tokens are produced.

Each method file registers itself at import (timm style) and owns everything specific to it:
its options dataclass, how it selects, which views it encodes (`encode`, default: LaViDa's
any-res views) and whether it acts inside the LM (`prefill_hook`). The core only dispatches.
Every method is decided once, before the diffusion steps, so the prefix K/V cache stays valid
for the whole answer.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

from llava.constants import ANYRES_VIEWS, SIGLIP_IMAGE_SIZE, TOKEN_BUDGET
from llava.errors import InputError
from shirg_patches.context import EncodeRequest, PruneContext, PruneHook, SelectFn, VisualTokens


# ---- typed options -----------------------------------------------------------------------------
def option(default: Any, help: str = "", flag: Optional[str] = None, choices: Optional[tuple] = None):
    """A method option: a dataclass field the CLI turns into `--<flag>` (default: the field name)."""
    return field(default=default, metadata={"help": help, "flag": flag, "choices": choices})


@dataclass(frozen=True)
class MethodOptions:
    """Base of every method's options. Subclasses add fields with `option(...)` and check them in
    `validate`, which raises `InputError` (it runs on construction, so a bad value never reaches
    the model)."""

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        pass

    def budget_for(self, candidates: int) -> int:
        raise InputError(f"{type(self).__name__} declares no token budget")

    def budget_note(self, candidates: int) -> Optional[str]:
        """A line for the report when `budget_for` did not keep what the options say (e.g. a clamped default)."""
        return None

    def describe(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def specs(cls) -> list["OptionSpec"]:
        hints = typing.get_type_hints(cls)
        return [OptionSpec(f.name, f.metadata.get("flag") or f.name, _plain_type(hints[f.name]), f.default,
                           f.metadata.get("help", ""), f.metadata.get("choices"))
                for f in dataclasses.fields(cls)]


@dataclass(frozen=True)
class OptionSpec:
    name: str
    flag: str
    type: type
    default: Any
    help: str
    choices: Optional[tuple]

    def parse(self, text: str) -> Any:
        """A string (CLI or `name:option=value`) -> the field's type, with a clear error."""
        try:
            value = self.type(text)
        except (TypeError, ValueError):
            raise InputError(f"--{self.flag} expects {self.type.__name__}, got {text!r}") from None
        return value


@dataclass(frozen=True)
class NoOptions(MethodOptions):
    """For methods without options."""


@dataclass(frozen=True)
class BudgetOptions(MethodOptions):
    """Options of methods that prune LaViDa's unpooled any-res tokens to a fixed count."""

    # None: SHIRG's count (TOKEN_BUDGET), or every candidate of an image that has fewer (said in the report)
    budget: Optional[int] = option(None, f"tokens kept by pruning baselines (default: SHIRG's count, {TOKEN_BUDGET}, "
                                         "or every candidate when an image has fewer)")

    def validate(self) -> None:
        if self.budget is None:
            return
        if isinstance(self.budget, bool) or not isinstance(self.budget, int) or self.budget < 1:
            raise InputError(f"--budget must be at least 1, got {self.budget}")

    def budget_for(self, candidates: int) -> int:
        if self.budget is None:
            return min(TOKEN_BUDGET, candidates)
        if self.budget > candidates:  # the upper bound depends on the image, so it is checked here
            raise InputError(f"--budget {self.budget} must be between 1 and the {candidates} candidate tokens "
                             "of this image; give a smaller --budget, or leave it out to keep up to "
                             f"{TOKEN_BUDGET}")
        return self.budget

    def budget_note(self, candidates: int) -> Optional[str]:
        if self.budget is None and candidates < TOKEN_BUDGET:
            return (f"the default budget {TOKEN_BUDGET} is more than this image's {candidates} candidate tokens, "
                    f"so all {candidates} are kept (give --budget to keep fewer)")
        return None


def _plain_type(hint):
    """`Optional[X]` -> X: the type a flag's text is parsed into (None is the flag left out)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    return args[0] if union and len(args) == 1 else hint


# ---- methods ------------------------------------------------------------------------------------
EncodeFn = Callable[[Any, "PruneMethod", EncodeRequest, Any], VisualTokens]  # (model, method, request, timer)
PrefillHookFactory = Callable[[PruneContext, VisualTokens, int, int, int], PruneHook]
HeatmapFn = Callable[[str, Any, VisualTokens], None]  # (png path, image, visual tokens)


@dataclass(frozen=True)
class PruneMethod:
    """How one `--prune_method` produces its visual tokens.

    options:        the method's options dataclass.
    select:         `select(ctx) -> indices | Selection`; None keeps every token (LaViDa's merge).
    encode:         the method's own view encoder; None = LaViDa's any-res views, pooled per `pool`.
    pool:           any-res only: True/False force LaViDa's 27->14 pooling, None lets the flag decide.
    needs_attention / needs_keys: what the SigLIP tower must return besides features.
    prefill_hook:   `factory(ctx, visual, start, end, n_layers) -> hook` for methods that select
                    inside the LM during prefill; None selects before the LM.
    tower_views:    (views, side px) per SigLIP call, for the cost model and the docs.
    accepts_empty_question: the method has a defined behaviour without a question.
    heatmap:        draws the method's choice for `--save_heatmap`, or None.
    """

    name: str
    summary: str
    options: type = NoOptions
    select: Optional[SelectFn] = None
    encode: Optional[EncodeFn] = None
    pool: Optional[bool] = None
    needs_attention: bool = False
    needs_keys: bool = False
    prefill_hook: Optional[PrefillHookFactory] = None
    tower_views: tuple = ((ANYRES_VIEWS, SIGLIP_IMAGE_SIZE),)
    accepts_empty_question: bool = False
    heatmap: Optional[HeatmapFn] = None

    @property
    def budgeted(self) -> bool:
        """Prunes LaViDa's any-res candidates to a budget (the baselines)."""
        return self.select is not None and self.encode is None

    def make_options(self, given: "Mapping[str, Any] | MethodOptions | None" = None) -> MethodOptions:
        """A dict (or None, or an options object) -> this method's validated options; keys that
        are not this method's options are an error naming the method."""
        if isinstance(given, self.options):
            return given
        if isinstance(given, MethodOptions):
            raise InputError(f"--prune_method {self.name} takes {self.options.__name__}, got {type(given).__name__}")
        given = dict(given or {})
        names = {s.name: s for s in self.options.specs()}
        unknown = [k for k in given if k not in names]
        if unknown:
            takes = ", ".join(sorted(names)) or "no options"
            raise InputError(f"option {unknown[0]!r} does not apply to --prune_method {self.name} (it takes: {takes})")
        parsed = {k: names[k].parse(v) if isinstance(v, str) and names[k].type is not str else v
                  for k, v in given.items()}
        return self.options(**parsed)


REGISTRY: dict[str, PruneMethod] = {}


def register(method: PruneMethod) -> PruneMethod:
    if method.name in REGISTRY:
        raise ValueError(f"prune method {method.name!r} registered twice")
    REGISTRY[method.name] = method
    return method


def get_method(name: "str | PruneMethod") -> PruneMethod:
    if isinstance(name, PruneMethod):
        return name
    try:
        return REGISTRY[name]
    except KeyError:
        raise InputError(f"unknown --prune_method {name!r}; choose one of: {', '.join(sorted(REGISTRY))}") from None
