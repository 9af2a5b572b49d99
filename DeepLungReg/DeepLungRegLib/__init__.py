"""DeepLungReg: deep-learning deformable registration of inhale/exhale lung CT.

Pure-Python library (no Slicer import). Inside the library every point and vector is in
physical LPS millimetres, as in ITK/SimpleITK; conversion to Slicer's RAS happens only at
the Slicer edge (``DeepLungReg.py`` and :mod:`DeepLungRegLib.io` landmark readers).
"""

__version__ = "0.1.0"
