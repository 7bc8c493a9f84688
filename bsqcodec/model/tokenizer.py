"""Patch autoencoder and Binary Spherical Quantization (float; used for training and encoding).

Vocabulary: a *code* is a +-1 vector of L entries, *bits* are its 0/1 form (1 where the code is +1),
a *token* is the integer sum(bits * basis) with the basis most significant bit first.
"""

from __future__ import annotations

import functools
import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import cpu
from ..config import TokenizerConfig


class BSQ(nn.Module):
    """Project to L dims, L2-normalize, take signs (x > 0 gives +1, else -1)."""

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = bits
        # most significant bit first; float64 holds every integer up to 2^53 exactly
        # (on the CPU even when the module is built on the meta device, where its parameters are then assigned)
        basis = torch.tensor([2.0 ** (bits - 1 - i) for i in range(bits)], dtype=torch.float64, device="cpu")
        self.register_buffer("basis", basis, persistent=False)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        """(B, L, h, w) projection -> (B, L, h, w) code scaled to unit norm; straight-through in training."""
        u = F.normalize(v.float(), dim=1)
        return self.straight_through(u) if self.training else self.signs(u)

    def signs(self, u: torch.Tensor) -> torch.Tensor:
        """The code of u: +-1/sqrt(L) by the sign of each entry (x > 0 gives +)."""
        return torch.where(u > 0, 1.0, -1.0) / math.sqrt(self.bits)

    def straight_through(self, u: torch.Tensor) -> torch.Tensor:
        """signs(u) forward, the identity backward (used in training and by the encoder's search)."""
        return u + (self.signs(u) - u).detach()

    def codes_to_tokens(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, L, h, w) codes (any positive scale) -> (B, h, w) int64 tokens."""
        bits = (codes > 0).to(torch.float64)
        return torch.einsum("blhw,l->bhw", bits, self.basis).round().long()

    def tokens_to_codes(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, h, w) tokens -> (B, L, h, w) unit-norm float codes."""
        bits = tokens_to_bits(tokens, self.bits)  # (B, h, w, L)
        code = (bits.float() * 2 - 1) / math.sqrt(self.bits)
        return code.permute(0, 3, 1, 2).contiguous()


def tokens_to_bits(tokens: torch.Tensor, nbits: int) -> torch.Tensor:
    """(...) int64 tokens -> (..., nbits) int64 0/1, most significant first (mask test, no shifts)."""
    weights = torch.tensor([2 ** (nbits - 1 - i) for i in range(nbits)], dtype=torch.int64, device=tokens.device)
    # floor(token / 2^k) mod 2 is bit k; integer division and remainder are exact on int64
    return torch.div(tokens.long().unsqueeze(-1), weights, rounding_mode="floor") % 2


def bits_to_tokens(bits: torch.Tensor) -> torch.Tensor:
    """(..., nbits) 0/1 -> (...) int64 tokens by a weighted sum with the basis."""
    nbits = bits.shape[-1]
    weights = torch.tensor([2 ** (nbits - 1 - i) for i in range(nbits)], dtype=torch.int64, device=bits.device)
    return (bits.long() * weights).sum(-1)


def split_groups(tokens: torch.Tensor, bits: int, groups: int) -> torch.Tensor:
    """(...) tokens -> (..., groups) symbols of bits/groups bits each, most significant group first."""
    g = bits // groups
    weights = torch.tensor([2 ** (g * (groups - 1 - i)) for i in range(groups)], dtype=torch.int64, device=tokens.device)
    return torch.div(tokens.long().unsqueeze(-1), weights, rounding_mode="floor") % (2**g)


def join_groups(symbols: torch.Tensor, bits: int) -> torch.Tensor:
    """(..., groups) symbols -> (...) tokens."""
    groups = symbols.shape[-1]
    g = bits // groups
    weights = torch.tensor([2 ** (g * (groups - 1 - i)) for i in range(groups)], dtype=torch.int64, device=symbols.device)
    return (symbols.long() * weights).sum(-1)


class ResBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.gelu(self.conv1(x)))


class Tokenizer(nn.Module):
    """Patch autoencoder: every convolution after the first runs at patch resolution."""

    def __init__(self, cfg: TokenizerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        p, c, L = cfg.patch, cfg.channels, cfg.bits
        self.patchify = nn.Conv2d(3, c, p, stride=p)
        self.enc_conv = nn.Conv2d(c, c, 3, padding=1)
        self.enc_blocks = nn.Sequential(*[ResBlock(c) for _ in range(cfg.enc_blocks)])
        self.to_code = nn.Conv2d(c, L, 1)
        self.quant = BSQ(L)
        self.from_code = nn.Conv2d(L, c, 1)
        self.dec_conv = nn.Conv2d(c, c, 3, padding=1)
        self.dec_blocks = nn.Sequential(*[ResBlock(c) for _ in range(cfg.dec_blocks)])
        self.unpatchify = _to_pixels(c, p, cfg.overlap)
        if cfg.up_channels:
            # a residual branch at twice the latent resolution, adding to the pixels from half patches;
            # its last layer starts at zero, so a decoder grown from one without it starts out the same
            u = cfg.up_channels
            self.up = nn.ConvTranspose2d(c, u, 2, stride=2)
            self.up_blocks = nn.Sequential(*[ResBlock(u) for _ in range(cfg.up_blocks)])
            self.up_out = _to_pixels(u, p // 2, cfg.overlap)
            nn.init.zeros_(self.up_out.weight)
            nn.init.zeros_(self.up_out.bias)

    ENCODER = ("patchify.", "enc_conv.", "enc_blocks.", "to_code.")  # parameters that choose the tokens

    def freeze_encoder(self) -> None:
        """Train the decoder only: the same images keep giving the same tokens (a prior stays valid)."""
        for name, p in self.named_parameters():
            if name.startswith(self.ENCODER):
                p.requires_grad_(False)

    # pixels are float in [0, 1], shape (B, 3, H, W) with H, W multiples of the patch
    def encode_latent(self, x: torch.Tensor) -> torch.Tensor:
        h = self.enc_conv(F.gelu(self.patchify(x - 0.5)))
        return self.to_code(self.enc_blocks(h))

    def decode_code(self, code: torch.Tensor, up: bool = True, bf16: bool = False) -> torch.Tensor:
        """Pixels of a code; up=False leaves out the up stage (a cheaper approximation, for the search).

        bf16: the 3x3 convolutions (nearly all the work) in bfloat16 autocast on the CPU; the layers
        that make pixels stay in float32, so only the features are rounded to bfloat16.
        """
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            h = self.dec_conv(self.from_code(code * math.sqrt(self.cfg.bits)))
            h = F.gelu(self.dec_blocks(h))
            u = F.gelu(self.up_blocks(self.up(h))) if self.cfg.up_channels and up else None
        size = (code.shape[-2] * self.cfg.patch, code.shape[-1] * self.cfg.patch)
        y = self.unpatchify(h.float())[..., : size[0], : size[1]]  # longer only with overlap and an odd patch
        if u is not None:
            y = y + self.up_out(u.float())[..., : size[0], : size[1]]
        return y + 0.5

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Training pass: (reconstruction, code).

        keep: optional (B,) bit budgets for nested training; sample b then decodes from its first
        keep[b] bits only (the rest read as 0), exactly what `truncated(keep[b])` computes.
        """
        code = self.quant(self.encode_latent(x))
        if keep is not None:
            idx = torch.arange(self.cfg.bits, device=x.device)
            code = code * (idx[None, :] < keep[:, None]).to(code.dtype)[:, :, None, None]
        return self.decode_code(code), code

    def truncated(self, bits: int) -> "Tokenizer":
        """The tokenizer that keeps only the first `bits` bits of each token (nested BSQ).

        The code enters the decoder as +-1 entries (code * sqrt(L)), so slicing the projections
        gives the same reconstruction as decoding with the later bits set to 0.
        """
        if bits == self.cfg.bits:
            return self
        if not 1 <= bits < self.cfg.bits:
            raise ValueError(f"cannot truncate a {self.cfg.bits}-bit tokenizer to {bits} bits")
        import dataclasses

        small = Tokenizer(dataclasses.replace(self.cfg, bits=bits))
        small.load_state_dict(resize_bits(self.state_dict(), bits))
        return small.train(self.training)

    # ---- inference in horizontal strips, so memory stays bounded for any image height ----
    STRIP = 128  # latent rows per strip at most (memory only: the pixels are the same for any strip height)
    STRIP_POSITIONS = 2**16  # and at most about this many latent positions: wide images go in lower strips
    BAND = 16  # latent rows per band of a layer: fixed, so that the pixels never depend on the thread count

    @torch.no_grad()
    def image_to_tokens(self, pixels) -> torch.Tensor:
        """(H, W, 3) uint8 pixels (numpy or torch; H, W multiples of patch) -> (h, w) int64 tokens.

        Works in horizontal strips with a halo of context rows, so memory stays bounded for any
        image height; only one strip is converted to float at a time.
        """
        out = [self.quant.codes_to_tokens(self.quant(lat))[0] for lat in self._latent_strips(pixels)]
        return torch.cat(out, 0)

    @torch.no_grad()
    def image_to_latent(self, pixels) -> torch.Tensor:
        """(H, W, 3) uint8 pixels -> (1, L, h, w) projections before the signs (as image_to_tokens)."""
        return torch.cat(list(self._latent_strips(pixels)), 2)

    def _latent_strips(self, pixels):
        p, halo = self.cfg.patch, self.cfg.halo
        h, rows = pixels.shape[0] // p, self._strip_rows(pixels.shape[1] // p)
        for r0 in range(0, h, rows):
            r1 = min(h, r0 + rows)
            a, b = max(0, r0 - halo), min(h, r1 + halo)
            part = pixels[a * p : b * p]  # a copy of one strip, never the image
            strip = part.clone() if isinstance(part, torch.Tensor) else torch.from_numpy(np.array(part))
            x = strip.permute(2, 0, 1)[None].float().div(255)
            yield self.encode_latent(x)[..., r0 - a : r1 - a, :]

    def _strip_rows(self, cols: int) -> int:
        """Latent rows per strip of an image `cols` tokens wide: STRIP, fewer for wide images (whole bands)."""
        return max(1, min(self.STRIP, max(self.BAND, self.STRIP_POSITIONS // max(1, cols) // self.BAND * self.BAND)))

    @torch.no_grad()
    def _decode_strip(self, tokens: torch.Tensor, r0: int, bf16: bool, run) -> torch.Tensor:
        p, halo, h = self.cfg.patch, self.cfg.halo, tokens.shape[0]
        r1 = min(h, r0 + self._strip_rows(tokens.shape[1]))
        a, b = max(0, r0 - halo), min(h, r1 + halo)
        code = self.quant.tokens_to_codes(tokens[None, a:b])
        return to_uint8(self._decode_banded(code, bf16, run)[0, :, (r0 - a) * p : (r1 - a) * p])

    def _decode_banded(self, code: torch.Tensor, bf16: bool, run) -> torch.Tensor:
        """decode_code (with the up stage) layer by layer, each layer's output rows cut into bands of BAND rows.

        run(fn, items) maps fn over the bands (in threads, or here). Each band of a layer reads its
        rows of the layer's input plus the rows its kernel reaches (one latent row for a 3x3 or an
        overlapping output convolution), so the work is the whole grid's plus a row per band edge
        (a strip's halo, by contrast, recomputes every layer for its rows). The bands' shapes depend
        on the image alone, so any thread count computes the same pixels.
        """
        n_bands = -(-code.shape[-2] // self.BAND)  # never the thread count: kernels may sum differently by shape

        def layer(fn, x: torch.Tensor, radius: int, scale: int = 1, add: torch.Tensor | None = None,
                  half: bool = bf16) -> torch.Tensor:
            H = x.shape[-2]
            step = H // code.shape[-2]  # 2 on the up stage's grid
            cuts = [min(H, i * self.BAND * step) for i in range(n_bands + 1)]

            def band(i: int) -> torch.Tensor:
                a, b = cuts[i], cuts[i + 1]
                lo, hi = max(0, a - radius), min(H, b + radius)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=half):
                    y = fn(x[..., lo:hi, :])[..., (a - lo) * scale : (b - lo) * scale, :]
                return y if add is None else add[..., a * scale : b * scale, :] + y

            return torch.cat(run(band, range(n_bands)), -2)

        def float_layer(mod):  # the layers that make pixels stay float32 (as in decode_code): half=False
            return lambda x: mod(F.gelu(x).float())

        h = layer(lambda c: self.dec_conv(self.from_code(c * math.sqrt(self.cfg.bits))), code, 1)
        for blk in self.dec_blocks:
            t = layer(lambda x, blk=blk: F.gelu(blk.conv1(x)), h, 1)
            h = layer(blk.conv2, t, 1, add=h)
        size = (code.shape[-2] * self.cfg.patch, code.shape[-1] * self.cfg.patch)
        g = layer(F.gelu, h, 0)  # once for both ways out
        y = layer(lambda x: self.unpatchify(x.float()), g, 1, self.cfg.patch, half=False)[..., : size[0], : size[1]]
        if self.cfg.up_channels:
            u = layer(self.up, g, 0, 2)
            for blk in self.up_blocks:
                t = layer(lambda x, blk=blk: F.gelu(blk.conv1(x)), u, 1)
                u = layer(blk.conv2, t, 1, add=u)
            y = y + layer(float_layer(self.up_out), u, 1, self.cfg.patch // 2, half=False)[..., : size[0], : size[1]]
        return y.float() + 0.5

    @torch.no_grad()
    def tokens_to_image(self, tokens: torch.Tensor, bf16: bool | None = None) -> torch.Tensor:
        """(h, w) tokens -> (H, W, 3) uint8 pixels.

        Float convolutions may round differently with different intra-op thread counts, so every
        layer runs single-threaded kernels on bands of rows, the bands in parallel Python threads
        (torch releases the interpreter lock in its kernels); tall or wide images go in strips of rows
        with a halo (_strip_rows), so memory stays bounded. The pixels are then the same for any thread count.
        bf16: convolutions in bfloat16 autocast, about twice as fast where the CPU has bfloat16 dot
        products, within 2 levels of float32's pixels; None = where that pays (native_bf16()).
        """
        if bf16 is None:
            bf16 = tokens.device.type == "cpu" and native_bf16()
        starts = list(range(0, tokens.shape[0], self._strip_rows(tokens.shape[1])))
        with cpu.threads_of_kernels(torch.get_num_threads()) as run:
            return torch.cat([self._decode_strip(tokens, r0, bf16, run) for r0 in starts], 0)


def _to_pixels(channels: int, patch: int, overlap: bool) -> nn.ConvTranspose2d:
    """channels -> 3 per patch x patch pixels; with overlap a kernel of 2 patches smooths the seams."""
    if overlap:
        return nn.ConvTranspose2d(channels, 3, 2 * patch, stride=patch, padding=patch // 2)
    return nn.ConvTranspose2d(channels, 3, patch, stride=patch)


def resize_bits(state: dict, bits: int) -> dict:
    """A tokenizer state dict with the code length changed to `bits`.

    Shrinking keeps the first bits; growing keeps the old ones and adds new projections whose
    decoder columns start at zero, so the wider tokenizer starts out reconstructing exactly as
    the narrow one did.
    """
    out = dict(state)
    w, b, d = state["to_code.weight"], state["to_code.bias"], state["from_code.weight"]
    old = w.shape[0]
    if bits <= old:
        out["to_code.weight"], out["to_code.bias"] = w[:bits].clone(), b[:bits].clone()
        out["from_code.weight"] = d[:, :bits].clone()
        return out
    g = torch.Generator().manual_seed(bits)
    extra = torch.randn((bits - old, *w.shape[1:]), generator=g, dtype=w.dtype) * w.std()
    out["to_code.weight"] = torch.cat([w, extra])
    out["to_code.bias"] = torch.cat([b, torch.zeros(bits - old, dtype=b.dtype)])
    out["from_code.weight"] = torch.cat([d, torch.zeros((d.shape[0], bits - old, *d.shape[2:]), dtype=d.dtype)], 1)
    return out


FLOAT32_ENV = "BSQ_FLOAT32_DECODER"  # set to 1: the pixel decoder always runs in float32


@functools.cache
def native_bf16() -> bool:
    """True where the CPU has bfloat16 dot products (x86 AVX-512 BF16 or AMX) and FLOAT32_ENV is not 1.

    Elsewhere bfloat16 convolutions are emulated and slower than float32, so they are not used.
    """
    return os.environ.get(FLOAT32_ENV) != "1" and cpu.has_any(cpu.BF16_FLAGS)


def to_uint8(y: torch.Tensor) -> torch.Tensor:
    """(3, H, W) float in [0, 1] -> (H, W, 3) uint8, rounding half to even."""
    return (y.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous()
