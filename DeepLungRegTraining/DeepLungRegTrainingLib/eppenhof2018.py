"""Method preset: supervised U-Net on synthetic deformations.

Eppenhof & Pluim, "Pulmonary CT registration through supervised learning with
convolutional neural networks", IEEE Transactions on Medical Imaging 38(5), 2018.

Gathers the paper's choices in one place; the generic pieces live in
:mod:`.synthesis` (Table I transforms), :mod:`.losses` (masked L1) and
:mod:`.training` (optimiser, snapshot averaging).
"""

from __future__ import annotations

METHOD = "eppenhof2018"
PAPER = "Eppenhof & Pluim, IEEE TMI 2018"
SYNTHESIS_PRESET = "eppenhof2018"
LOSS = "l1"                 # L1 of the displacement error inside the (warped) lung mask
OPTIMIZER = "adagrad"
LEARNING_RATE = 1e-2
SNAPSHOT_EVERY = 50         # iterations between weight snapshots
AVERAGE_LAST = 200          # final weights = mean of the last snapshots
GRID = 128                  # network input size after lung cropping
