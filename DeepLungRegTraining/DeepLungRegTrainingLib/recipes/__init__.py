"""Training recipes, one per registration method (same registry keys as
:mod:`DeepLungRegLib.methods`): how to generate training pairs, the loss, the optimiser and the
method's configuration defaults. The generic loop (:mod:`..training`) runs any of them."""

from __future__ import annotations

import importlib

from DeepLungRegLib.errors import InputError
from DeepLungRegLib.methods import get_method, method_names

from .base import Recipe


def get_recipe(method: str) -> Recipe:
    """The recipe registered for ``method`` (an :class:`InputError` for unknown or untrainable methods)."""
    info = get_method(method)
    if not info.recipe:
        raise InputError(f"method {method!r} has no training recipe")
    return importlib.import_module(info.recipe).RECIPE


def trainable_methods() -> list[str]:
    return [m for m in method_names() if get_method(m).recipe]
