"""Image quality and rate-distortion metrics: PSNR, MS-SSIM, SSIMULACRA2 and the Bjontegaard delta rate."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang, Simoncelli, Bovik 2003


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """RGB PSNR in dB of two uint8 images (inf if identical); works in row blocks to bound memory."""
    if a.shape != b.shape:
        raise ValueError("images differ in shape")
    sq = 0
    for r in range(0, a.shape[0], 256):
        d = a[r : r + 256].astype(np.int32) - b[r : r + 256].astype(np.int32)
        sq += int((d * d).sum(dtype=np.int64))
    return float("inf") if sq == 0 else 10 * math.log10(255.0**2 * a.size / sq)


def ssimulacra2(a: np.ndarray, b: np.ndarray) -> float:
    """SSIMULACRA2 of two uint8 RGB images (100: identical; higher is better), by the `ssimulacra2` package
    (the optional extra bsqcodec[perceptual]): the metric libjxl is tuned with."""
    import io

    from PIL import Image

    from .errors import BsqError

    try:
        from ssimulacra2.ssimulacra2 import compute_ssimulacra2
    except ImportError:
        raise BsqError("SSIMULACRA2 needs the optional extra bsqcodec[perceptual] (pip install ssimulacra2)") from None
    if a.shape != b.shape:
        raise ValueError("images differ in shape")
    bufs = []
    for x in (a, b):
        f = io.BytesIO()
        Image.fromarray(x).save(f, format="PNG", compress_level=0)  # the package reads files
        f.seek(0)
        bufs.append(f)
    return float(compute_ssimulacra2(*bufs))


METRICS = {"psnr": psnr, "ssimulacra2": ssimulacra2}  # quality scores that bench can match codecs at (higher: better)


def _gauss(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - size // 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def _filter(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian, valid region only: x (N, C, H, W)."""
    C = x.shape[1]
    x = F.conv2d(x, g.view(1, 1, 1, -1).expand(C, 1, 1, -1), groups=C)
    return F.conv2d(x, g.view(1, 1, -1, 1).expand(C, 1, -1, 1), groups=C)


def _ssim_parts(x: torch.Tensor, y: torch.Tensor, g: torch.Tensor, L: float = 255.0):
    c1, c2 = (0.01 * L) ** 2, (0.03 * L) ** 2
    mx, my = _filter(x, g), _filter(y, g)
    sxx = _filter(x * x, g) - mx * mx
    syy = _filter(y * y, g) - my * my
    sxy = _filter(x * y, g) - mx * my
    cs = (2 * sxy + c2) / (sxx + syy + c2)
    lum = (2 * mx * my + c1) / (mx * mx + my * my + c1)
    return (lum * cs).flatten(2).mean(-1), cs.flatten(2).mean(-1)  # (N, C) each


def ms_ssim(a, b, data_range: float = 255.0) -> float:
    """MS-SSIM of two images ((H, W, 3) uint8 arrays or (N, C, H, W) tensors), averaged over channels.

    Five scales with the standard weights, an 11x11 Gaussian window (sigma 1.5) and 2x2 average
    pooling, as in Wang et al. 2003. Images too small for five scales use as many scales as fit,
    with the weights renormalized; images under 11 pixels are padded by edge replication.
    """
    if isinstance(a, np.ndarray):
        a = torch.from_numpy(a.astype(np.float64)).permute(2, 0, 1)[None]
        b = torch.from_numpy(b.astype(np.float64)).permute(2, 0, 1)[None]
    x, y = a.double(), b.double()
    g = _gauss()
    side = min(x.shape[-2:])
    if side < 11:
        pad = (0, max(0, 11 - x.shape[-1]), 0, max(0, 11 - x.shape[-2]))
        x, y = F.pad(x, pad, mode="replicate"), F.pad(y, pad, mode="replicate")
        side = 11
    scales = 1
    while scales < 5 and side // 2 ** scales >= 11:
        scales += 1
    w = torch.tensor(MS_SSIM_WEIGHTS[:scales], dtype=torch.float64)
    w = w / w.sum()
    vals = []
    for s in range(scales):
        ssim, cs = _ssim_parts(x, y, g, data_range)
        vals.append(torch.relu(ssim if s == scales - 1 else cs))
        if s < scales - 1:
            pad = [x.shape[-1] % 2, x.shape[-2] % 2]
            x = F.avg_pool2d(x, 2, padding=pad)
            y = F.avg_pool2d(y, 2, padding=pad)
    v = torch.stack(vals, 0)  # (scales, N, C)
    return float(torch.prod(v ** w.view(-1, 1, 1), 0).mean())


def overlap(a, b) -> tuple[float, float]:
    """(lo, hi) of the range two curves share along one axis; empty when hi <= lo."""
    return float(max(np.min(a), np.min(b))), float(min(np.max(a), np.max(b)))


def bd_rate(rate_a, psnr_a, rate_b, psnr_b) -> float:
    """Bjontegaard delta rate (%) of curve b against anchor a (VCEG-M33: cubic fit of log rate).

    Negative means b needs fewer bits for the same quality. Integrates over the overlapping
    quality range; raises ValueError when the curves do not overlap or have under 4 points.
    """
    ra, pa, rb, pb = (np.asarray(v, dtype=np.float64) for v in (rate_a, psnr_a, rate_b, psnr_b))
    if min(len(ra), len(rb)) < 4:
        raise ValueError("BD-rate needs at least 4 points per curve")
    lo, hi = overlap(pa, pb)
    if hi <= lo:
        raise ValueError("the curves do not overlap in quality")
    fa = np.polyint(np.polyfit(pa, np.log10(ra), 3))
    fb = np.polyint(np.polyfit(pb, np.log10(rb), 3))
    avg = ((np.polyval(fb, hi) - np.polyval(fb, lo)) - (np.polyval(fa, hi) - np.polyval(fa, lo))) / (hi - lo)
    return float((10**avg - 1) * 100)


def bd_psnr(rate_a, psnr_a, rate_b, psnr_b) -> float:
    """Bjontegaard delta PSNR (dB) of curve b against anchor a over the overlapping rate range."""
    la, lb = np.log10(np.asarray(rate_a, float)), np.log10(np.asarray(rate_b, float))
    pa, pb = np.asarray(psnr_a, float), np.asarray(psnr_b, float)
    lo, hi = overlap(la, lb)
    if hi <= lo:
        raise ValueError("the curves do not overlap in rate")
    fa, fb = np.polyint(np.polyfit(la, pa, 3)), np.polyint(np.polyfit(lb, pb, 3))
    return float(((np.polyval(fb, hi) - np.polyval(fb, lo)) - (np.polyval(fa, hi) - np.polyval(fa, lo))) / (hi - lo))
