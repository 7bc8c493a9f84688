"""`bsqc bench`: bsqcodec against classical codecs (through Pillow) at matched quality.

Imports the leaves, `format`, `model` and `codec`; never `train` or `cli`.
"""
