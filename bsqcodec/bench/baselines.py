"""Classical codecs through Pillow, for comparison: encode at a quality, or at a target PSNR (or other score)."""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, features

from ..metrics import METRICS, psnr


@dataclass(frozen=True)
class Codec:
    name: str
    fmt: str
    qmin: int
    qmax: int
    options: tuple = ()


JPEG = Codec("jpeg", "JPEG", 1, 100, (("optimize", True),))
WEBP = Codec("webp", "WEBP", 0, 100, (("method", 6),))
AVIF = Codec("avif", "AVIF", 0, 100, (("speed", 6),))
JXL = Codec("jxl", "JXL", 1, 99, (("effort", 7),))  # 100 means lossless there
LOSSY = (JPEG, WEBP, AVIF, JXL)


def available(codec: Codec) -> tuple[bool, str]:
    """Whether Pillow can write this codec here, and a note if not."""
    if codec is JXL:
        try:
            import pillow_jxl  # noqa: F401  (registers the JXL plugin)
        except ImportError:
            return False, "JPEG XL skipped: install the optional extra bsqcodec[jxl] (pillow-jxl-plugin)"
        return True, ""
    feature = {"JPEG": "jpg", "WEBP": "webp", "AVIF": "avif"}[codec.fmt]
    if not features.check(feature):
        return False, f"{codec.name} skipped: this Pillow has no {codec.fmt} encoder"
    return True, ""


def encode(arr: np.ndarray, codec: Codec, quality: int) -> bytes:
    if codec is JXL:
        import pillow_jxl  # noqa: F401  (registers the JXL plugin)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=codec.fmt, quality=int(quality), **dict(codec.options))
    return buf.getvalue()


def decode(data: bytes) -> np.ndarray:
    try:
        import pillow_jxl  # noqa: F401  (so that JPEG XL files open)
    except ImportError:
        pass
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def png_bytes(arr: np.ndarray) -> int:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", optimize=True)
    return len(buf.getvalue())


@dataclass
class Point:
    quality: int
    bytes: int
    psnr: float
    data: bytes
    scores: dict = field(default_factory=dict)  # metric name -> score, computed when first asked for

    def score(self, arr: np.ndarray, metric: str) -> float:
        if metric == "psnr":
            return self.psnr
        if metric not in self.scores:
            self.scores[metric] = METRICS[metric](arr, decode(self.data))
        return self.scores[metric]


def at_quality(arr: np.ndarray, codec: Codec, quality: int) -> Point:
    data = encode(arr, codec, quality)
    return Point(quality, len(data), psnr(arr, decode(data)), data)


def matched(arr: np.ndarray, codec: Codec, target: float, cache: dict[int, Point] | None = None,
            metric: str = "psnr") -> Point | None:
    """The smallest file of this codec whose score (PSNR, or another of metrics.METRICS) reaches target
    (None if no quality does).

    Binary search for the lowest quality that reaches the target (the score grows with quality), then a
    look at the neighbouring qualities, since size and score are not strictly monotone. `cache`
    (quality -> Point of this image and codec) lets several searches on one image share encodes.
    """
    cache = {} if cache is None else cache
    seen: dict[int, Point] = {}  # only this search's qualities decide, whatever else the cache holds

    def at(q: int) -> float:
        if q not in cache:
            cache[q] = at_quality(arr, codec, q)
        seen[q] = cache[q]
        return seen[q].score(arr, metric)

    lo, hi = codec.qmin, codec.qmax
    if at(hi) < target:
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        if at(mid) >= target:
            hi = mid
        else:
            lo = mid + 1
    for q in range(max(codec.qmin, lo - 2), min(codec.qmax, lo + 2) + 1):
        at(q)
    ok = [p for p in seen.values() if p.score(arr, metric) >= target]
    return min(ok, key=lambda p: (p.bytes, -p.score(arr, metric)))
