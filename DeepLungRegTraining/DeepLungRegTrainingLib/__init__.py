"""DeepLungRegTraining: train registration networks from synthetic deformations of your own scans.

Pure-Python library (no Slicer import); shares the network, preprocessing, model file
format and metrics of :mod:`DeepLungRegLib`.
"""
