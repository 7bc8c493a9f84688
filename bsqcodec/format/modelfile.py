"""A model file's config and identity, read with the standard library alone (no torch).

A model file is a safetensors file: an 8-byte little-endian header length, a JSON header (each tensor's
dtype, shape and byte range, and `__metadata__` holding the format name, the integer prior's version
and the config as JSON), then the tensors' bytes, little-endian. The model's identity is the SHA-256 of
its canonical serialization (weights.canonical_hash), computed here from the raw bytes, so `bsqc
presets` and the registry of installed models never wait for torch.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from pathlib import Path

from ..config import INTPRIOR_VERSION, LookConfig, ModelConfig, SecondConfig, SecondLookConfig
from ..errors import ModelError

MODELS_DIR = Path(__file__).parent.parent / "models"
FORMAT = "bsqcodec-model-1"
SECOND_FORMAT = "bsqcodec-second-1"  # a second-stage model (formats/bsq.md section 11)
LOOK_FORMAT = "bsqcodec-look-1"  # another decoder of a first-stage model's tokens (formats/bsq.md section 9)
SECOND_LOOK_FORMAT = "bsqcodec-second-look-1"  # another decoder of second stages (formats/bsq.md section 11)
KINDS = {FORMAT: ModelConfig, SECOND_FORMAT: SecondConfig, LOOK_FORMAT: LookConfig, SECOND_LOOK_FORMAT: SecondLookConfig}
MAX_HEADER = 1 << 24
# safetensors dtype -> (torch's name, as the canonical hash spells it; bytes per element)
DTYPES = {"BOOL": ("torch.bool", 1), "U8": ("torch.uint8", 1), "I8": ("torch.int8", 1), "I16": ("torch.int16", 2),
          "I32": ("torch.int32", 4), "I64": ("torch.int64", 8), "F16": ("torch.float16", 2),
          "BF16": ("torch.bfloat16", 2), "F32": ("torch.float32", 4), "F64": ("torch.float64", 8)}


class Identity:
    """The name and hash of a loaded model of any kind (each has .config.name and .sha256), and for those
    made for another model (second stages, looks: .config.base_hash), that model's hash."""

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def hash_hex(self) -> str:
        return self.sha256.hex()

    @property
    def base_hash(self) -> bytes:
        return bytes.fromhex(self.config.base_hash)


def _header(f, path, size: int) -> tuple[dict, int]:
    raw = f.read(8)
    if len(raw) < 8:
        raise ModelError(f"cannot read model file {path}: too short")
    n = struct.unpack("<Q", raw)[0]
    if n > min(MAX_HEADER, size - 8):
        raise ModelError(f"cannot read model file {path}: bad header length")
    try:
        header = json.loads(f.read(n))
    except (UnicodeDecodeError, ValueError):
        raise ModelError(f"cannot read model file {path}: bad header") from None
    if not isinstance(header, dict):
        raise ModelError(f"cannot read model file {path}: bad header")
    return header, 8 + n


def config_of(path, meta) -> ModelConfig | SecondConfig:
    """The config a model file's metadata holds (a second-stage model's by its format), after checking its
    format and integer prior version."""
    meta = meta or {}
    if not isinstance(meta, dict) or meta.get("format") not in KINDS:
        raise ModelError(f"{path} is not a bsqcodec model file")
    version = meta.get("intprior", "1")  # files from before the key existed are version 1
    if version != INTPRIOR_VERSION:
        raise ModelError(f"{path} needs integer prior arithmetic version {version}; this bsqcodec "
                         f"implements version {INTPRIOR_VERSION} (formats/intprior.md)")
    kind = KINDS[meta["format"]]
    try:
        return kind.from_dict(json.loads(meta["config"]))
    except (KeyError, TypeError, ValueError, ArithmeticError) as e:
        raise ModelError(f"bad model file {path}: bad config ({e})") from None


def summary(path: str | os.PathLike) -> tuple[ModelConfig | SecondConfig, bytes]:
    """(config, canonical SHA-256) of a model file; ModelError for anything that is not a readable one."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            header, start = _header(f, path, size)
            config = config_of(path, header.pop("__metadata__", None))
            entries = []
            for name in sorted(header):
                t = header[name]
                try:
                    dtype, width = DTYPES[t["dtype"]]
                    shape = tuple(int(d) for d in t["shape"])
                    a, b = (int(v) for v in t["data_offsets"])
                except (KeyError, TypeError, ValueError):
                    raise ModelError(f"cannot read model file {path}: bad entry for {name!r}") from None
                if not 0 <= a <= b <= size - start or b - a != math.prod(shape) * width:
                    raise ModelError(f"cannot read model file {path}: tensor {name!r} out of bounds")
                f.seek(start + a)
                entries.append((name, dtype, shape, f.read(b - a)))
    except OSError as e:
        raise ModelError(f"cannot read model file {path}: {e.strerror or e}") from None
    return config, digest(config, entries)


def format_of(config) -> str:
    return next(f for f, kind in KINDS.items() if isinstance(config, kind))


def digest(config: ModelConfig | SecondConfig, entries) -> bytes:
    """The canonical SHA-256 of a model (formats/bsq.md sections 6 and 11): its format, its config, then each
    tensor in name order as (name, type name as torch spells it, shape tuple, little-endian bytes)."""
    h = hashlib.sha256()
    h.update(format_of(config).encode())
    h.update(json.dumps(config.to_dict(), sort_keys=True, separators=(",", ":")).encode())
    for name, dtype, shape, data in sorted(entries, key=lambda e: e[0]):
        h.update(f"\n{name}|{dtype}|{tuple(shape)}\n".encode())
        h.update(data)
    return h.digest()


def installed(models_dir: Path = MODELS_DIR) -> tuple[dict[str, tuple[str, bytes, ModelConfig | SecondConfig]], dict[str, str]]:
    """({preset name: (file, hash, config)} of every readable model file in models_dir, {file stem: error} of the rest)."""
    out, broken = {}, {}
    for p in sorted(Path(models_dir).glob("*.safetensors")):
        try:
            config, h = summary(p)
        except ModelError as e:  # a broken file affects only the files that need it
            broken[p.stem] = str(e)
            continue
        out[config.name] = (str(p), h, config)
    return out, broken
