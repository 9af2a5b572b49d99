"""Registry of registration methods.

A *method* is one named unit of our literature (its paper in its module docstring) that
knows how to build its network from a model file's metadata and how to predict a
displacement (fixed -> moving, LPS mm on a lattice) from a preprocessed pair; its
training recipe lives in :mod:`DeepLungRegTrainingLib.recipes` under the same name.

This module is deliberately free of heavy imports (no torch, no SimpleITK): the Slicer
module lists the methods before its dependencies are installed. :func:`get_method`
imports the method's own module on demand.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from ..errors import InputError


@dataclass(frozen=True)
class MethodInfo:
    """What can be said about a method without importing it."""

    name: str          # registry key, stored as ``method`` in model metadata
    title: str         # one line for menus
    paper: str         # short citation
    module: str        # module (relative to this package) implementing :class:`.base.Method`


#: Every registered method, in the order menus show them.
METHODS: dict[str, MethodInfo] = {
    m.name: m for m in (
        MethodInfo("eppenhof2018", "Supervised U-Net on synthetic B-spline deformations",
                   "Eppenhof & Pluim, IEEE TMI 38(5), 2019 (online 2018)", "eppenhof2018"),
        MethodInfo("eppenhof2018tps", "CNN predicting a thin-plate-spline grid (fast, coarse)",
                   "Eppenhof et al., SPIE Medical Imaging 2018", "eppenhof2018tps"),
        MethodInfo("eppenhof2019", "Progressively trained U-Net on synthetic B-spline deformations",
                   "Eppenhof et al., IEEE TMI 2019", "eppenhof2019"),
        MethodInfo("hering2021", "Multilevel U-Nets with NGF, curvature, volume-change and keypoint losses",
                   "Hering et al., Medical Image Analysis 72, 2021", "hering2021"),
        MethodInfo("sokooti2017", "RegNet: multi-scale patch CNN on synthetic smoothed random displacements",
                   "Sokooti et al., MICCAI 2017, LNCS 10433", "sokooti2017"),
    )
}


def method_names() -> list[str]:
    """Registry keys, in menu order."""
    return list(METHODS)


def method_info(name: str) -> MethodInfo:
    """The registry entry of ``name``; an unknown name is an :class:`InputError` naming the known ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise InputError(f"unknown registration method {name!r}; known: {', '.join(METHODS)}") from None


def get_method(name: str):
    """The :class:`.base.Method` instance registered as ``name`` (imports its module)."""
    info = method_info(name)
    module = importlib.import_module(f"{__name__}.{info.module}")
    return module.METHOD
