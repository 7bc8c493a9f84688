"""Bytes on disk: the .bsq container (formats/bsq.md), the range coder, and model files' identity.

Imports only the package's leaves (errors, config) and constriction; no torch.
"""
