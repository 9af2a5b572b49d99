"""Choices the Slicer registration module offers and passes to the command line (standard library only).

Imported at the top of the module files, so it must stay importable on any Python Slicer ships.
"""

#: ``deeplungreg register --refine``: test-time instance optimisation after the network, fastest first.
REFINE_LEVELS = ["off", "fast", "full"]
#: The level the Slicer module selects unless the user changes it (the command line has its own default).
MODULE_DEFAULT_REFINE = "fast"

#: ``--device``
DEVICES = ["auto", "cpu", "cuda"]
