"""Names of the test-time refinement levels (torch-free: the CLI parser and the Slicer module read them).

The levels themselves are defined in :mod:`DeepLungRegLib.refine`.
"""

#: Refine levels a user can choose (``register --refine``), fastest first.
REFINE_CHOICES = ("off", "fast", "full")
#: What ``register`` does when the user does not say.
DEFAULT_REFINE = "full"
#: One line per level for help texts and menus.
REFINE_DESCRIPTIONS = {
    "off": "network only (fastest, least accurate)",
    "fast": "network + optimisation on 6 and 3 mm images",
    "full": "network + optimisation down to 1.5 mm images (most accurate)",
}
