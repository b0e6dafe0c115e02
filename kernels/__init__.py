"""Triton kernels of cdiff, installed as ``cdiff.kernels``.

Importing this package does not import Triton; each op module does, when it is used.
Every op has a plain PyTorch reference in ``cdiff`` that its test compares against.
"""
