"""Choices the Slicer registration module offers and passes to the command line (standard library only).

Imported at the top of the module files, so it must stay importable on any Python Slicer ships.
"""

from .refine_levels import DEFAULT_REFINE, REFINE_CHOICES

#: ``deeplungreg register --refine``: test-time instance optimisation after the network, fastest first.
REFINE_LEVELS = list(REFINE_CHOICES)
#: The level the Slicer module selects unless the user changes it: the command line's default.
MODULE_DEFAULT_REFINE = DEFAULT_REFINE

#: ``--device``
DEVICES = ["auto", "cpu", "cuda"]
