"""Prune methods for LaViDa, one file each, behind one registry (`shirg_patches.registry`).

Importing the package imports LaViDa's own methods (`lavida.py`), SHIRG (`shirg.py`) and every
module in `baselines/`; each method file registers itself, so adding a method is adding one file
to `baselines/`. Infrastructure modules (scoring, fovea, heat-map) are imported by the methods
that use them, never eagerly. Lists of methods (CLI choices, bench,
cost model, tests, scripts) all read `REGISTRY`.
"""
from __future__ import annotations

import importlib
import pkgutil

from shirg_patches.context import EncodeRequest, PruneContext, Selection, VisualTokens, run_select
from shirg_patches.registry import REGISTRY, BudgetOptions, MethodOptions, NoOptions, PruneMethod, get_method, register

# LaViDa's own methods first, then SHIRG, then the baselines: the order every listing shows
_FIRST = ("lavida", "shirg")


def _discover() -> None:
    for name in _FIRST:
        importlib.import_module(f"{__name__}.{name}")
    baselines = importlib.import_module(f"{__name__}.baselines")
    for info in sorted(pkgutil.iter_modules(baselines.__path__), key=lambda i: i.name):
        if not info.ispkg:
            importlib.import_module(f"{baselines.__name__}.{info.name}")


_discover()

__all__ = ["REGISTRY", "BudgetOptions", "EncodeRequest", "MethodOptions", "NoOptions", "PruneContext",
           "PruneMethod", "Selection", "VisualTokens", "get_method", "register", "run_select"]
