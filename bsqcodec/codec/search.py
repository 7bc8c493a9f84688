"""Encoder-side search: token grids that the fixed decoder turns into pixels closer to the original.

The decoder and the prior never change; any token grid is a valid file, so the encoder may choose
tokens other than the signs its own network gives. `refine` starts from those signs and takes
gradient steps on the continuous code before the signs (straight-through, as in training) to lower

    squared error of the decoded pixels + lam x rate,

where the rate is the prior's code length of each bit, taken from the probability tables of the
starting tokens (`rate_costs` turns tables into per-bit costs; codec.py computes the tables). The
context of each token is held at the starting tokens: a bit that the prior predicts confidently
costs many bits to flip, an unlikely one saves bits when flipped. The file's real size is measured
after the search by the encoder as always.

Effort 1 is no search at all: exactly the bytes of the plain sign encoder.

Tuned for a look (`bsqc encode --tune sharp`), the search decodes with that look's decoder, up stage
included, and its loss adds PERCEPTUAL x (100 - SSIMULACRA2) / 100 (bsqcodec.perceptual): the tokens are
chosen for how the look's pictures score, not for their squared error, with TUNED_STEPS times the effort's
steps and a learning rate that falls in a straight line over them (TUNED_LR), keeping the codes of its
lowest loss (KEEP_BEST). The files are the same kind.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .. import perceptual
from .adam import Adam
from ..config import DEFAULT_EFFORT, MAX_EFFORT, MIN_EFFORT  # noqa: F401 - defined there, light for the CLI
from ..model.tokenizer import Tokenizer, native_bf16, tokens_to_bits

# gradient steps per effort. A step decodes without the decoder's up stage (a third cheaper; on 7 training
# photos at 6 steps the same bytes and PSNR as with it), so the default effort affords 8 steps in the time
# 6 took with the stage: about 2% fewer bytes at equal PSNR on the default rung
ITERATIONS = {1: 0, 2: 2, 3: 4, 4: 8, 5: 10, 6: 12, 7: 16, 8: 32, 9: 64}
# Adam's learning rate, per step of the unit-norm code: large for the first steps, which decide most of
# the sign flips, then small, so that the codes settle. Measured on 7 training photos against a constant
# 0.003 at 6 steps (effort 4): q1 -0.5% bytes at +0.04 dB, the default rung -0.5% at +0.05 dB, q5 +0.2%
# at +0.10 dB; on q1 and the default rung at 2 to 16 steps it was worth 1-3% of the bytes at equal PSNR
# every time. A function of the step alone, so the first k steps of a longer search are the search of k.
LR_FIRST, FIRST_STEPS, LR = 0.006, 3, 0.002
# the weight of a bit of rate against the mean squared error (pixels in [0, 1]) per pixel, over the square
# of the token bits; measured on Kodak photos (kodim01, 13, 23; q1 and default), 4 keeps each rung's
# rate about where effort 1 has it and turns the search into quality (1: +3-5% bytes for +0.1 dB more)
RATE_WEIGHT = 4.0
WINDOW_TOKENS = 16384  # tokens optimised together; larger images go in strips (bounds memory)
# the perceptual term's weight in a search tuned for a look. Adam's steps do not depend on the loss's
# scale, and this term's gradient outweighs the squared error's and the rate's: on three training photos
# (default rung, effort 4) weights 0.2, 0.5 and 2.0 gave the same SSIMULACRA2 (+17 on the sharp look) and
# bytes (+6%), and 5x or 20x the rate weight took back at most 0.5% of the bytes for up to 8 points
PERCEPTUAL = 0.5
# a search tuned for a look takes this many times the effort's steps: the perceptual term's search is far from
# settled after 8 steps. On six training photos (default rung), 16 steps instead of 8 gave +3.0 and +5.1
# SSIMULACRA2 on two sets of three for +0.8% and +1.2% bytes; twice the learning rate at 8 steps gave
# -0.9 and +2.3 (not kept). A tuned step costs about twice a plain one (the look's up stage, the metric)
TUNED_STEPS = 2
# and its learning rate falls in a straight line from the first to the last of them: the squared-error
# schedule (LR_FIRST for three steps, then LR) leaves the perceptual search short of where it goes. On two sets
# of six training photos (default rung, 16 steps; bytes at matched SSIMULACRA2 of the sharp look) 0.009 down to
# 0.001 gave +4.5 and +6.2 points for +0.9% bytes, WebP 1.51x -> 1.66x and 1.53x -> 1.73x, about what 32 steps
# of the old schedule gave; 0.012 or 0.018 to start gave WebP within 0.02x of it for more bytes and less PSNR,
# 0.006 to start (with 0.0002, 0.001 or 0.002 to end) gave less (benchmarks/README.md). In the
# squared-error search (8 steps, matched PSNR) a line from 0.006 moved WebP and AVIF by at most 0.02x and one
# from 0.009 lost WebP 1.19x -> 1.08x on one set, so that search keeps LR_FIRST and LR
TUNED_LR = (0.009, 0.001)
# It also keeps the codes of its lowest loss, not always the last (one more decode, without gradients): its
# loss can jump when many signs flip at once. On twelve training photos the last was the best or within 0.4%
# of it; on one Kodak photo (kodim08) the last 2 of 16 steps raised the loss by a fifth.
KEEP_BEST = True

Progress = Callable[[str, int, int], None]
Costs = tuple[torch.Tensor, torch.Tensor]  # (cost of each bit being 0, being 1), each (bits, rows, cols)


def iterations(effort: int, tuned: bool = False) -> int:
    """Gradient steps of an effort (0 for effort 1: no search), TUNED_STEPS times as many for a search tuned
    for a look; ValueError for anything but 1..9."""
    if isinstance(effort, bool) or not isinstance(effort, int) or not MIN_EFFORT <= effort <= MAX_EFFORT:
        raise ValueError(f"effort must be an integer from {MIN_EFFORT} to {MAX_EFFORT}, not {effort!r}")
    return ITERATIONS[effort] * (TUNED_STEPS if tuned else 1)


def learning_rate(step: int) -> float:
    """Adam's learning rate for gradient step `step` (1, 2, ...)."""
    return LR_FIRST if step <= FIRST_STEPS else LR


def tuned_learning_rate(step: int, steps: int) -> float:
    """Adam's learning rate for step `step` (1..steps) of a search of `steps` steps tuned for a look."""
    first, last = TUNED_LR
    return first + (last - first) * (step - 1) / max(1, steps - 1)


def schedule() -> dict:
    """The learning rates as benchmark result files record them."""
    return {"first": LR_FIRST, "first_steps": FIRST_STEPS, "then": LR}


def tuned_schedule() -> dict:
    """A look-tuned search's steps (times the effort's) and learning rates, as benchmark result files record them."""
    return {"steps_times": TUNED_STEPS, "lr_first": TUNED_LR[0], "lr_last": TUNED_LR[1]}


def steps() -> dict:
    """The gradient steps of every effort as benchmark result files record them ({"1": 0, ...})."""
    return {str(e): n for e, n in ITERATIONS.items()}


def rate_weight(bits: int) -> float:
    """lam for a tokenizer of `bits` bits per token (see RATE_WEIGHT)."""
    return RATE_WEIGHT / bits**2


def bit_costs(tables: torch.Tensor, group_bits: int) -> Costs:
    """Tables (..., 2^g) of one group -> (cost of each bit being 0, being 1), each (..., g), in bits.

    A bit's probability is the sum of the table over the symbols that have it set; bits are
    most significant first, as in the token.
    """
    has = tokens_to_bits(torch.arange(tables.shape[-1]), group_bits).to(torch.float64)  # (n, g)
    p = tables.to(torch.float64)
    p1 = ((p @ has) / p.sum(-1, keepdim=True)).clamp(1e-6, 1 - 1e-6)
    return -torch.log2(1 - p1), -torch.log2(p1)


def _windows(rows: int, cols: int) -> list[tuple[int, int]]:
    step = max(1, WINDOW_TOKENS // max(1, cols))
    return [(r0, min(rows, r0 + step)) for r0 in range(0, rows, step)]


def refine(tok: Tokenizer, latent: torch.Tensor, target: np.ndarray, steps: int, costs: Costs | None = None,
           lam: float = 0.0, progress: Progress | None = None, look: Tokenizer | None = None) -> torch.Tensor:
    """Searched tokens (rows, cols) after `steps` gradient steps from the tokenizer's latent (1, bits, rows, cols).

    target: the (height, width, 3) uint8 image itself (not padded). costs: per-bit rate costs from
    `bit_costs`; with lam = 0 or costs None the search weighs distortion only. Images of more than
    WINDOW_TOKENS tokens are searched in strips of rows, one after the other, each with its
    neighbours' current codes as context. The result depends only on the inputs and the torch build
    (the decoder is never affected). look: a look's decoder (a Tokenizer of the same code) to tune the
    search for, with the perceptual term (see PERCEPTUAL); None: the tokenizer's own, squared error only.
    """
    s = _Search(tok, latent, target, costs, lam, look)
    windows = _windows(*s.u.shape[-2:])
    for w, (r0, r1) in enumerate(windows):
        def report(i, w=w):
            if progress:
                progress("search", w * steps + i, steps * len(windows))
        s.run(r0, r1, steps, report)
    return s.tokens()


def trajectory(tok: Tokenizer, latent: torch.Tensor, target: np.ndarray, steps: list[int],
               costs: Costs | None = None, lam: float = 0.0) -> dict[int, torch.Tensor]:
    """{k: the tokens `refine` gives after k steps} for every k in `steps`, in one search.

    For benchmarks of all efforts at the cost of the highest; images of one window only.
    """
    s = _Search(tok, latent, target, costs, lam)
    rows, cols = s.u.shape[-2:]
    if len(_windows(rows, cols)) != 1:
        raise ValueError("trajectory() needs an image of at most WINDOW_TOKENS tokens")
    out = {0: s.tokens()} if 0 in steps else {}

    def keep(i):
        if i in steps:
            out[i] = s.tokens()

    s.run(0, rows, max(steps), keep)
    return out


class _Search:
    """The unit-norm codes of the whole grid, and what the loss needs."""

    def __init__(self, tok: Tokenizer, latent: torch.Tensor, target: np.ndarray, costs: Costs | None, lam: float,
                 look: Tokenizer | None = None) -> None:
        self.tok, self.look = tok, look
        self.u = F.normalize(latent.detach().float(), dim=1)
        self.height, self.width = target.shape[:2]
        self.target = torch.from_numpy(np.array(target, dtype=np.uint8)).permute(2, 0, 1)[None].float().div(255)
        self.costs = tuple(c.float() for c in costs) if costs is not None and lam > 0 else None
        self.lam = lam
        # bfloat16 where the decoders use it (the CPU has bfloat16 dot products), not wherever oneDNN accepts
        # it: oneDNN also emulates it on AVX-512 CPUs without them (Skylake to Ice Lake)
        self.bf16 = native_bf16()

    def tokens(self) -> torch.Tensor:
        return self.tok.quant.codes_to_tokens(self.u)[0]

    @staticmethod
    def _perceptual(ref: perceptual.Reference, dist: torch.Tensor, whole: bool) -> torch.Tensor:
        """(100 - SSIMULACRA2) / 100 of a window's pixels: the whole image's score as the metric computes it
        (an image under 256 pixels high or wide has fewer scales, which take other scales' weights), a strip's
        with each scale's own weights (perceptual.score's full_layout: a part of a larger image)."""
        return (100.0 - perceptual.score(ref, dist, full_layout=not whole)[0]) / 100.0

    def run(self, r0: int, r1: int, steps: int, after: Callable[[int], None]) -> None:
        """Adam steps on the codes of latent rows r0..r1, the other rows fixed; self.u follows every step."""
        tok = self.tok
        p, L, halo = tok.cfg.patch, tok.cfg.bits, tok.cfg.halo
        rows = self.u.shape[-2]
        a, b = max(0, r0 - halo), min(rows, r1 + halo)
        own = self.u[:, :, r0:r1].clone().requires_grad_(True)
        rate = learning_rate if self.look is None else lambda i: tuned_learning_rate(i, steps)
        opt = Adam(own, rate(1))
        y0, y1 = r0 * p, min(self.height, r1 * p)  # the pixel rows this window owns
        tgt = self.target[:, :, y0:y1]
        ref = perceptual.Reference(tgt) if self.look is not None else None  # the same for every step
        n_px = self.height * self.width
        if self.costs is not None:
            c0, c1 = (c[None, :, r0:r1] for c in self.costs)

        def loss_of(codes: torch.Tensor) -> torch.Tensor:
            """The search's loss of the window's codes (the others held at self.u)."""
            ste = tok.quant.straight_through(torch.cat([self.u[:, :, a:r0], codes, self.u[:, :, r1:b]], 2))
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
                # without the decoder's up stage (see ITERATIONS); the file decodes in full as always.
                # A look's decoder in full: its texture is much of what the perceptual term sees
                y = tok.decode_code(ste, up=False) if self.look is None else self.look.decode_code(ste)
            y = y.float()[:, :, y0 - a * p : y1 - a * p, : self.width]
            loss = F.mse_loss(y, tgt, reduction="sum") / (3 * n_px)
            if self.look is not None:  # this window's share of the image, as its squared error is
                loss = loss + PERCEPTUAL * self._perceptual(ref, y.clamp(0, 1), r1 - r0 == rows) * (y1 - y0) / self.height
            if self.costs is not None:
                bit = (ste[:, :, r0 - a : r1 - a] * math.sqrt(L) + 1) / 2  # 1 where the code is +1
                loss = loss + self.lam * (bit * c1 + (1 - bit) * c0).sum() / n_px
            return loss

        keep = self.look is not None and KEEP_BEST
        best = (math.inf, None)  # a tuned search keeps its best iterate (see KEEP_BEST)
        for i in range(1, steps + 1):
            with torch.enable_grad():
                loss = loss_of(own)
                (grad,) = torch.autograd.grad(loss, [own])
            if keep and (value := float(loss.detach())) < best[0]:
                best = (value, own.detach().clone())  # the codes before this step: the loss is theirs
            opt.lr = rate(i)
            opt.step(grad)
            with torch.no_grad():
                self.u[:, :, r0:r1] = own
            after(i)
        if keep and steps:
            with torch.no_grad():
                if float(loss_of(own)) > best[0]:
                    self.u[:, :, r0:r1] = best[1]
