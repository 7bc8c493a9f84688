"""SSIMULACRA2 in PyTorch, differentiable: a perceptual score computed here, to train a decoder with.

The same computation as the `ssimulacra2` package (and libjxl's tools/ssimulacra2.cc): images go to
linear RGB, then to the XYB space (cube roots of cone-like mixtures), and at six scales (halved in linear
RGB each time) three kinds of error maps are pooled with a mean and a 4-norm: one minus SSIM, "artifact"
(edges the decoded image has and the original does not) and "detail lost" (edges the original has and the
decoded image does not). A fixed weighted sum of those 108 numbers, bent by a fixed polynomial, gives the
score: 100 for identical images, lower for worse (about 30 is a poor picture; it goes below zero).

`score` matches the package to rounding (a test compares them). `loss` is what training minimises; it
scores small crops with each scale's own weights (see `score`'s `full_layout`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_OPSIN = ((0.30, 0.622, 0.078), (0.23, 0.692, 0.078), (0.24342268924547819, 0.20476744424496821, 0.5518098665095536))
_BIAS = 0.0037930732552754493
_C2 = 0.0009
SCALES = 6
_SIGMA, _RADIUS = 1.5, 5  # the package's Gaussian: scipy's, truncated at 3.33 sigma

# weights[((c * scales + s) * 2 + n) * 3 + k]: channel c (X, Y, B), scale s, pooling n (mean, 4-norm),
# kind k (1 - SSIM, artifact, detail lost); from the package (and libjxl)
_WEIGHTS = (
    0.0, 0.0007376606707406586, 0.0, 0.0, 0.0007793481682867309, 0.0, 0.0, 0.0004371155730107379, 0.0,
    1.1041726426657346, 0.00066284834129271, 0.00015231632783718752, 0.0, 0.0016406437456599754, 0.0,
    1.8422455520539298, 11.441172603757666, 0.0, 0.0007989109436015163, 0.000176816438078653, 0.0,
    1.8787594979546387, 10.94906990605142, 0.0, 0.0007289346991508072, 0.9677937080626833, 0.0,
    0.00014003424285435884, 0.9981766977854967, 0.00031949755934435053, 0.0004550992113792063, 0.0, 0.0,
    0.0013648766163243398, 0.0, 0.0, 0.0, 0.0, 0.0, 7.466890328078848, 0.0, 17.445833984131262,
    0.0006235601634041466, 0.0, 0.0, 6.683678146179332, 0.00037724407979611296, 1.027889937768264,
    225.20515300849274, 0.0, 0.0, 19.213238186143016, 0.0011401524586618361, 0.001237755635509985,
    176.39317598450694, 0.0, 0.0, 24.43300999870476, 0.28520802612117757, 0.0004485436923833408, 0.0, 0.0,
    0.0, 34.77906344483772, 44.835625328877896, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0,
    0.0008680556573291698, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0005313191874358747, 0.0, 0.00016533814161379112,
    0.0, 0.0, 0.0, 0.0, 0.0, 0.0004179171803251336, 0.0017290828234722833, 0.0, 0.0020827005846636437,
    0.0, 0.0, 8.826982764996862, 23.19243343998926, 0.0, 95.1080498811086, 0.9863978034400682,
    0.9834382792465353, 0.0012286405048278493, 171.2667255897307, 0.9807858872435379, 0.0, 0.0, 0.0,
    0.0005130064588990679, 0.0, 0.00010854057858411537,
)


def _linear(x: torch.Tensor) -> torch.Tensor:
    """sRGB values in [0, 1] -> linear light (values outside are clamped)."""
    x = x.clamp(0, 1)
    return torch.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055).clamp_min(1e-12) ** 2.4)


def _xyb(lin: torch.Tensor) -> torch.Tensor:
    """Linear RGB (B, 3, H, W) -> SSIMULACRA2's positive XYB."""
    m = lin.new_tensor(_OPSIN)
    mixed = torch.einsum("ij,bjhw->bihw", m, lin) + _BIAS
    # the bias keeps the cube root's argument away from 0 for images in range
    c = mixed.clamp_min(_BIAS * 1e-3) ** (1 / 3) - _BIAS ** (1 / 3)
    x = 0.5 * (c[:, 0] - c[:, 1])
    y = 0.5 * (c[:, 0] + c[:, 1])
    return torch.stack([x * 14.0 + 0.42, y + 0.01, c[:, 2] - y + 0.55], 1)


def _kernel(dtype, device) -> torch.Tensor:
    t = torch.arange(-_RADIUS, _RADIUS + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / _SIGMA) ** 2)
    return (k / k.sum()).to(dtype=dtype, device=device)


def _blur(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The package's Gaussian: mirrored (edge repeated) above and below, zeros beyond the left and right.

    (The package pads with zeros along its first axis, and its XYB arrays are transposed, width first.)
    """
    n, r, h = x.shape[1], _RADIUS, x.shape[-2]
    idx = torch.cat([torch.arange(r - 1, -1, -1), torch.arange(h), torch.arange(h - 1, h - 1 - r, -1)])
    x = x[..., idx.clamp(0, h - 1).to(x.device), :]  # half-sample mirror (images are at least 8 high)
    x = F.conv2d(x, k.view(1, 1, -1, 1).expand(n, 1, -1, 1), groups=n)
    x = F.pad(x, (r, r))
    return F.conv2d(x, k.view(1, 1, 1, -1).expand(n, 1, 1, -1), groups=n)


def _pool(d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and 4-norm of each map over its pixels: (B, 3, H, W) -> two (B, 3)."""
    mean = d.mean((2, 3))
    l4 = (d * d).square().mean((2, 3))
    pos = l4 > 0  # the 4th root's gradient is infinite at 0: take it only where the norm is positive
    return mean, torch.where(pos, torch.where(pos, l4, 1.0) ** 0.25, 0.0)


def _ref_scale(a: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reference's part of one scale: (its XYB, their blur, the blur of their squares)."""
    return a, _blur(a, k), _blur(a * a, k)


def _scale_terms(ref: tuple, b: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """One scale's 18 numbers per image: (B, 3 channels, 2 poolings, 3 kinds); ref from _ref_scale."""
    a, mu1, s11 = ref
    mu2 = _blur(b, k)
    s22, s12 = _blur(b * b, k), _blur(a * b, k)
    num_m = 1.0 - (mu1 - mu2) ** 2
    num_s = 2.0 * (s12 - mu1 * mu2) + _C2
    den_s = (s11 - mu1 * mu1) + (s22 - mu2 * mu2) + _C2
    ssim = (1.0 - num_m * num_s / den_s).clamp_min(0)
    d1 = (1.0 + (b - mu2).abs()) / (1.0 + (a - mu1).abs()) - 1.0
    maps = (ssim, d1.clamp_min(0), (-d1).clamp_min(0))
    pooled = [_pool(m) for m in maps]  # kind -> (mean, l4)
    return torch.stack([torch.stack([p[n] for p in pooled], -1) for n in range(2)], 2)


class Reference:
    """What the score needs of a reference image, computed once: for scoring many candidates against it
    (the encoder's search scores each of its steps). The same numbers as scoring with the image itself."""

    def __init__(self, ref: torch.Tensor) -> None:
        self.kernel = _kernel(ref.dtype, ref.device)
        la, self.scales = _linear(ref), []
        for s in range(SCALES):
            if la.shape[-2] < 8 or la.shape[-1] < 8:
                break
            self.scales.append(_ref_scale(_xyb(la), self.kernel))
            if s < SCALES - 1:
                la = F.avg_pool2d(la, 2, ceil_mode=True)


def score(ref: torch.Tensor | Reference, dist: torch.Tensor, full_layout: bool = False) -> torch.Tensor:
    """SSIMULACRA2 of each image: ref and dist (B, 3, H, W) sRGB in [0, 1] -> (B,), differentiable in dist.

    ref may be a Reference of the image, for many scores against one image.

    Scales stop where an image gets under 8 pixels high or wide. The package then reads the weights in
    order, as if the scales it computed were the first of fewer (so a small image's coarse scales take
    other scales' weights); that is the default here too. full_layout gives each computed scale its own
    weights instead, which suits crops that stand for parts of larger images (training).
    """
    refs = ref if isinstance(ref, Reference) else Reference(ref)
    lb = _linear(dist)
    terms = []
    for s, r in enumerate(refs.scales):
        terms.append(_scale_terms(r, _xyb(lb), refs.kernel))
        if s < len(refs.scales) - 1:
            lb = F.avg_pool2d(lb, 2, ceil_mode=True)
    n = len(terms)
    t = torch.stack(terms, 2).abs()  # (B, 3 channels, scales, 2, 3)
    w = dist.new_tensor(_WEIGHTS).view(3, SCALES, 2, 3)
    w = w[:, :n] if full_layout else w.reshape(-1)[: 3 * n * 6].view(3, n, 2, 3)
    d = (t * w).sum((1, 2, 3, 4)) * 0.9562382616834844
    d = 2.326765642916932 * d - 0.020884521182843837 * d * d + 6.248496625763138e-05 * d * d * d
    return torch.where(d > 0, 100.0 - 10.0 * d.clamp_min(1e-12) ** 0.6276336467831387, torch.full_like(d, 100.0))


def loss(ref: torch.Tensor, dist: torch.Tensor) -> torch.Tensor:
    """What training minimises: the mean over the batch of (100 - SSIMULACRA2) / 100."""
    return (100.0 - score(ref, dist, full_layout=True)).mean() / 100.0


def to_tensor(img) -> torch.Tensor:
    """A uint8 (H, W, 3) array -> (1, 3, H, W) float64 in [0, 1]."""
    import numpy as np

    return torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].to(torch.float64) / 255.0


__all__ = ["score", "loss", "to_tensor", "Reference", "SCALES"]
assert math.isclose(sum(_OPSIN[2]), 1.0)
