"""Errors raised by bsqcodec. Every failure a user can cause is a BsqError subclass."""


class BsqError(Exception):
    """Base class of every error bsqcodec raises on purpose."""


class FormatError(BsqError):
    """A .bsq file is malformed: bad magic, truncated, or inconsistent fields."""


class ChecksumError(FormatError):
    """A CRC-32 in a .bsq file does not match its contents."""


class VersionError(FormatError):
    """A .bsq file has a major version this decoder does not know."""


class ModelNotFoundError(BsqError):
    """The model named by a file or a preset is not installed."""


class ModelError(BsqError):
    """A model file is unreadable or inconsistent."""


class ImageError(BsqError):
    """An input image cannot be read or is out of the supported range."""


class LimitError(BsqError):
    """A dimension or size is over a documented limit."""


class OutputExistsError(BsqError):
    """The output file exists and --force was not given."""


class TargetError(BsqError):
    """No rung of the quality ladder meets a --target-size or --target-psnr."""
