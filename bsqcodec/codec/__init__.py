"""Images to files and back: the encoder's searches, the token loop, worker processes, the second stage
in a file, image and output-file I/O. `codec.codec` is the one module that composes model and format.

Imports the leaves, `format` and `model`; never `train`, `bench` or `cli`.
"""
