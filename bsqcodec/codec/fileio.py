"""Writing outputs safely: never overwrite without force, never leave a half-written file."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ..errors import BsqError, OutputExistsError


def check_output(path: Path, force: bool) -> None:
    if path.exists() and not force:
        raise OutputExistsError(f"{path} exists (use --force to overwrite)")
    if path.is_dir():
        raise BsqError(f"{path} is a directory")
    if not path.parent.exists():
        raise BsqError(f"{path.parent}: no such directory")


def write_atomic(path: Path, data: bytes, force: bool) -> None:
    """Write to a temporary file beside path, then rename it into place."""
    check_output(path, force)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a finished output gets the usual mode
        if not force and path.exists():
            raise OutputExistsError(f"{path} exists (use --force to overwrite)")
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_bytes(path: Path, limit: int = 1 << 32) -> bytes:
    if not path.exists():
        raise BsqError(f"{path}: no such file")
    if path.is_dir():
        raise BsqError(f"{path} is a directory")
    try:
        if path.stat().st_size > limit:
            raise BsqError(f"{path} is too large")
        return path.read_bytes()
    except OSError as e:
        raise BsqError(f"{path}: cannot read ({e.strerror})") from None
