"""bsqcodec: a learned image codec with an integer-exact autoregressive prior.

    >>> import bsqcodec
    >>> data = bsqcodec.encode(image)          # PIL image or (H, W, 3) uint8 array -> bytes
    >>> image = bsqcodec.decode(data)          # bytes -> PIL.Image.Image
    >>> Image.open("photo.bsq")                # importing bsqcodec registers a Pillow plugin
"""

from . import pillow_plugin as _pillow_plugin
from .errors import BsqError

_pillow_plugin.register()


def __getattr__(name: str):
    """encode and decode import the codec (and torch) when first used, so light commands stay light."""
    if name in ("encode", "decode"):
        from .codec import codec

        return getattr(codec, name)
    raise AttributeError(f"module 'bsqcodec' has no attribute {name!r}")


__version__ = "0.7.5"
__all__ = ["encode", "decode", "BsqError", "__version__"]
