"""The second token stage: BSQ tokens for what the first stage's pixels miss (residual quantization).

The first stage (a shipped rung) turns the image into its base pixels. This stage works on a finer grid
of `patch` x `patch` pixels: its encoder sees the image and the base pixels and emits nested BSQ codes;
its decoder sees the codes and the base pixels and adds a correction to the base pixels. Every
convolution runs at the stage's patch resolution (pixel_unshuffle first). The base pixels enter as
the uint8 pixels a decoder of the first stage outputs, so a file cut to its first grid decodes to
exactly what this stage starts from.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import ResidualConfig, SecondConfig
from .tokenizer import BSQ, ResBlock, _to_pixels, resize_bits


def halo(blocks: int) -> int:
    """Second-grid rows of context a strip of the coder needs: the 3x3 input convolution, two per residual
    block, and the overlapping output (decoder) -- one more than each side needs."""
    return 2 + 2 * blocks


def to_float(px: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 pixels -> (1, 3, H, W) float32 in [0, 1], a copy (px may be read-only)."""
    return torch.from_numpy(np.array(px, dtype=np.float32)).permute(2, 0, 1)[None].div_(255)


class ResidualCoder(nn.Module):
    """(image, base pixels) -> nested BSQ codes -> a correction added to the base pixels."""

    def __init__(self, cfg: ResidualConfig) -> None:
        super().__init__()
        self.cfg = cfg
        p, c, L = cfg.patch, cfg.channels, cfg.bits
        self.enc_in = nn.Conv2d(6 * p * p, c, 3, padding=1)  # the residual and the base, patch by patch
        self.enc_blocks = nn.Sequential(*[ResBlock(c) for _ in range(cfg.enc_blocks)])
        self.to_code = nn.Conv2d(c, L, 1)
        self.quant = BSQ(L)
        self.ctx_in = nn.Conv2d(3 * p * p, c, 3, padding=1)  # the decoder's view of the base pixels
        self.from_code = nn.Conv2d(L, c, 1)
        self.dec_blocks = nn.Sequential(*[ResBlock(c) for _ in range(cfg.dec_blocks)])
        self.to_pixels = _to_pixels(c, p, True)
        nn.init.zeros_(self.to_pixels.weight)  # starts as the identity on the base pixels
        nn.init.zeros_(self.to_pixels.bias)

    ENCODER = ("enc_in.", "enc_blocks.", "to_code.")

    def encode_latent(self, x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """x, base: (B, 3, H, W) in [0, 1], H and W multiples of the patch -> (B, L, H/p, W/p) projections."""
        p = self.cfg.patch
        h = torch.cat([F.pixel_unshuffle(x - base, p) * 4.0, F.pixel_unshuffle(base - 0.5, p)], 1)
        return self.to_code(self.enc_blocks(F.gelu(self.enc_in(h))))

    def decode_code(self, code: torch.Tensor, base: torch.Tensor, bf16: bool = False) -> torch.Tensor:
        """The base pixels plus the correction read from the code (a zeroed bit reads as 0).

        bf16: the convolutions up to the last GELU (nearly all the work) in bfloat16 autocast on the CPU;
        the output layer, which makes pixels, stays in float32 (as the first stage's, Tokenizer.decode_code).
        """
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            h = F.gelu(self.ctx_in(F.pixel_unshuffle(base - 0.5, self.cfg.patch)))
            h = F.gelu(self.dec_blocks(h + self.from_code(code * math.sqrt(self.cfg.bits))))
        return base + self.to_pixels(h.float() if bf16 else h)

    def load_narrower(self, state: dict) -> None:
        """Start from the weights of a coder of the same shape but fewer bits (a narrower code), widened as the
        tokenizer's code is (tokenizer.resize_bits: its bits first, the decoder reading the new ones at zero
        weight, so that it starts as the narrower coder's decoder); the encoder's projections for the new
        bits keep this coder's fresh init."""
        old = state["to_code.weight"].shape[0]
        if not 0 < old <= self.cfg.bits:
            raise ValueError(f"a coder of {old} bits cannot start one of {self.cfg.bits}")
        grown = resize_bits(state, self.cfg.bits)
        for k in ("to_code.weight", "to_code.bias"):
            grown[k][old:] = self.state_dict()[k][old:]
        self.load_state_dict(grown)

    def forward(self, x: torch.Tensor, base: torch.Tensor, keep: torch.Tensor | None = None):
        """Training pass: (reconstruction, code); keep: optional bit budgets (nested BSQ), one per sample (B,)
        or one per token (B, H/p, W/p)."""
        code = self.quant(self.encode_latent(x, base))
        if keep is not None:
            code = code * kept_mask(keep, self.cfg.bits).to(code.dtype)
        return self.decode_code(code, base), code


def kept_mask(keep: torch.Tensor, bits: int) -> torch.Tensor:
    """Budgets, one per sample (B,) or per token (B, h, w) -> 1.0 for the kept bits: (B, bits, 1, 1) or (B, bits, h, w)."""
    k = keep[:, None, None, None] if keep.dim() == 1 else keep[:, None]
    return (torch.arange(bits, device=keep.device)[None, :, None, None] < k).float()


class BitPrior(nn.Module):
    """A float context model of the second stage's bits: the rate term of training, and a probe of the prior to come.

    Each bit of a second-stage token gets a probability from the co-located first-stage token (its L1 bits,
    +-1), the token's position within that first-stage patch, its checkerboard pass, and, on the second pass,
    the kept bits of its four neighbours (all of the first pass), and, with `budget`, the token's own bit
    budget (a fraction of `bits`; budgets may differ region by region). So a decoder could code every
    token of a pass at once: two passes per image. Bits of one token are independent given that context.

    That is the context kind "checker". Kind "quad3x3" sees more (about 5% fewer bits,
    benchmarks/bitprior_variants.py): the 3x3 first-stage tokens around (zero outside the grid), and four
    passes -- rows and columns (even, even), (odd, odd), (even, odd), (odd, even) -- in which a token sees
    the kept bits of its eight neighbours that earlier passes decoded.
    """

    KINDS = tuple(SecondConfig.CONTEXTS)
    NEIGH8 = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))

    def __init__(self, base_bits: int, ratio: int, bits: int, width: int = 256, budget: bool = True,
                 kind: str = "checker") -> None:
        super().__init__()
        if kind not in self.KINDS:
            raise ValueError(f"context kind must be one of {', '.join(self.KINDS)}, not {kind!r}")
        self.ratio, self.bits, self.budget, self.kind = ratio, bits, budget, kind
        ctx = self.context_size(base_bits, ratio, bits, budget, kind)
        self.net = nn.Sequential(nn.Conv2d(ctx, width, 1), nn.GELU(), nn.Conv2d(width, width, 1), nn.GELU(),
                                 nn.Conv2d(width, bits, 1))

    @staticmethod
    def context_size(base_bits: int, ratio: int, bits: int, budget: bool, kind: str = "checker") -> int:
        if kind == "quad3x3":
            return 9 * base_bits + ratio * ratio + 4 + 8 * bits + int(budget)
        return base_bits + ratio * ratio + 1 + 4 * bits + int(budget)

    @classmethod
    def from_state(cls, state: dict, base_bits: int, ratio: int, bits: int, kind: str = "checker") -> "BitPrior":
        """The prior of this kind whose weights these are (its width and whether it sees budgets read from
        their shapes)."""
        width, ctx = state["net.0.weight"].shape[:2]
        prior = cls(base_bits, ratio, bits, width, ctx == cls.context_size(base_bits, ratio, bits, True, kind), kind)
        prior.load_state_dict(state)
        return prior

    def load_older(self, state: dict) -> None:
        """Start from another prior's weights: one without the budget input gets the budget's weights at
        zero; one of fewer bits is widened (widened); one of another first stage (another context size) gives
        every tensor but its input layer's weights."""
        if state["net.4.weight"].shape[0] < self.bits:
            state = self.widened(state)
        w = state["net.0.weight"]
        if self.budget and w.shape[1] + 1 == self.net[0].weight.shape[1]:
            state = {**state, "net.0.weight": torch.cat([w, torch.zeros_like(w[:, :1])], 1)}
        own = self.state_dict()
        if state["net.0.weight"].shape != own["net.0.weight"].shape:
            state = {**state, "net.0.weight": own["net.0.weight"]}
        self.load_state_dict(state)

    def widened(self, state: dict) -> dict:
        """A narrower prior's weights (of fewer bits, the same kind, first stage and budget input) as this
        prior's: each neighbour's old bits read as before and its new bits with zero weights; the new bits'
        outputs at zero (probability 1/2); the budget input, the fraction of bits kept, rescaled so that a
        token's bit count weighs what it weighed."""
        old = state["net.4.weight"].shape[0]
        w = state["net.0.weight"]
        n_neigh = 8 if self.kind == "quad3x3" else 4
        head = w.shape[1] - n_neigh * old - int(self.budget)
        if head != self.net[0].weight.shape[1] - n_neigh * self.bits - int(self.budget):
            raise ValueError("the narrower prior's context does not fit this prior's")
        parts = [w[:, :head]]
        for j in range(n_neigh):
            blk = w[:, head + j * old : head + (j + 1) * old]
            parts += [blk, torch.zeros_like(w[:, : self.bits - old])]
        if self.budget:
            parts.append(w[:, -1:] * (self.bits / old))
        out_w, out_b = state["net.4.weight"], state["net.4.bias"]
        return {**state, "net.0.weight": torch.cat(parts, 1),
                "net.4.weight": torch.cat([out_w, out_w.new_zeros((self.bits - old, *out_w.shape[1:]))]),
                "net.4.bias": torch.cat([out_b, out_b.new_zeros(self.bits - old)])}

    def logits(self, base_code: torch.Tensor, bits01: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        """base_code (B, L1, h, w) as +-1; bits01 (B, L, H, W) in {0, 1}; kept (B, L, 1, 1) or (B, L, H, W)
        0/1 -> (B, L, H, W) logits."""
        if self.kind == "quad3x3":
            return self._logits_quad(base_code, bits01, kept)
        B, _, H, W = bits01.shape
        r = self.ratio
        up = base_code.repeat_interleave(r, 2).repeat_interleave(r, 3)[..., :H, :W]
        yy, xx = torch.meshgrid(torch.arange(H, device=bits01.device), torch.arange(W, device=bits01.device), indexing="ij")
        pos = F.one_hot((yy % r) * r + (xx % r), r * r).permute(2, 0, 1).float().expand(B, -1, -1, -1)
        second = ((yy + xx) % 2).float().expand(B, 1, H, W)  # 1 on the second pass
        s = (bits01 * 2 - 1) * kept * (1 - second)  # first-pass bits only, kept ones only
        p = F.pad(s, (1, 1, 1, 1))
        neigh = [p[:, :, 1:-1, :-2], p[:, :, 1:-1, 2:], p[:, :, :-2, 1:-1], p[:, :, 2:, 1:-1]]  # left, right, up, down
        extra = [kept.mean(1, keepdim=True).expand(B, 1, H, W)] if self.budget else []
        return self.net(torch.cat([up, pos, second, *(n * second for n in neigh), *extra], 1))

    @staticmethod
    def quad_pass(H: int, W: int, device=None, y0: int = 0) -> torch.Tensor:
        """(H, W) pass of each token of grid rows y0 ... y0 + H - 1 in kind quad3x3: 0 (even, even), 1 (odd, odd),
        2 (even, odd), 3 (odd, even)."""
        yy, xx = torch.meshgrid(torch.arange(y0, y0 + H, device=device), torch.arange(W, device=device), indexing="ij")
        return torch.tensor([[0, 2], [3, 1]], device=device)[yy % 2, xx % 2]

    def _logits_quad(self, base_code: torch.Tensor, bits01: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        B, L, H, W = bits01.shape
        r, dev = self.ratio, bits01.device
        wide = F.unfold(F.pad(base_code, (1, 1, 1, 1)), 3).view(B, -1, *base_code.shape[2:])  # channel c * 9 + 3 * dy + dx
        up = wide.repeat_interleave(r, 2).repeat_interleave(r, 3)[..., :H, :W]
        yy, xx = torch.meshgrid(torch.arange(H, device=dev), torch.arange(W, device=dev), indexing="ij")
        pos = F.one_hot((yy % r) * r + (xx % r), r * r).permute(2, 0, 1).float().expand(B, -1, -1, -1)
        ps = self.quad_pass(H, W, dev)
        onehot = F.one_hot(ps, 4).permute(2, 0, 1).float().expand(B, -1, -1, -1)
        s = F.pad((bits01 * 2 - 1) * kept.expand(B, L, H, W), (1, 1, 1, 1))
        pp = F.pad(ps, (1, 1, 1, 1), value=4)  # outside the grid: never decoded earlier
        neigh = []
        for dy, dx in self.NEIGH8:
            earlier = (pp[1 + dy : 1 + dy + H, 1 + dx : 1 + dx + W] < ps).float()
            neigh.append(s[:, :, 1 + dy : 1 + dy + H, 1 + dx : 1 + dx + W] * earlier)
        extra = [kept.mean(1, keepdim=True).expand(B, 1, H, W)] if self.budget else []
        return self.net(torch.cat([up, pos, onehot, *neigh, *extra], 1))

    def bits_of(self, base_code: torch.Tensor, bits01: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        """(B,) code length in bits of each sample's kept bits."""
        lg = self.logits(base_code, bits01, kept)
        nll = F.binary_cross_entropy_with_logits(lg, bits01, reduction="none") * kept
        return nll.sum((1, 2, 3)) / math.log(2)
