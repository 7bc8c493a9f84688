"""Training: data crops, the tokenizer's and prior's loops, the second stage's loop, perceptual and
adversarial terms, and export of a run into a model file.

Imports the leaves, `format`, `model` and `codec`; never `bench` or `cli`.
"""
