"""The networks and their integer-exact inference: tokenizer (patch autoencoder + BSQ), prior, second
stage, looks, and the registry of shipped model files (weights).

Imports the leaves and `format`; never `codec`, `train`, `bench` or `cli`.
"""
