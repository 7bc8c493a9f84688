"""The encoder's search for the second stage: bits that the fixed decoder turns into pixels closer to the image.

As for the first stage (search.py), any bits are a valid file, so the encoder may keep other bits than the
signs of its residual coder. `refine` starts from those signs and takes Adam steps on the unit-norm code
before the signs (straight-through, as in training) to lower

    squared error of the decoded pixels (8-bit units, summed) + lam x rate (bits),

the rate-distortion rule that also chooses the budget map (twostage.choose_budgets), with the budgets
held fixed and only kept bits counted. The rate of a bit is its code length under the bit prior's table
for it with the starting bits as context (`costs`): a confident bit costs many bits to flip. Large
images go in windows of rows, each with its neighbours' current codes as context. The file's real size
and pixels come from the decoder as always; the search only chooses which bits the file holds.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .adam import Adam
from ..model.residual import ResidualCoder, halo, to_float
from ..model.tokenizer import native_bf16

# gradient steps per effort (1 to 9). Each step runs the stage's decoder forward and backward over the image
# (about 0.5 s for a 768x512 photo on 2 cores). At effort 4, 8 steps against 4 spend 0.3-1.4% more bytes for
# 0.07-0.17 dB: about 2.5% fewer bytes at equal PSNR over the lambdas of q7-q9 on Kodak (kodim01-03, -2.5%)
# and on training photos (4 of bsds500, -2.45%): results/residual-search-q8-kodak3.json, -q8-bsds4.json
ITERATIONS = {1: 0, 2: 1, 3: 2, 4: 8, 5: 10, 6: 12, 7: 16, 8: 24, 9: 32}
# Adam's learning rate on the unit-norm code. Measured on kodim01-02 (the default rung's stage, lambda 200,
# benchmarks/residual_search.py): 0.001 at 4 steps +0.36 dB for +0.9% bytes; 0.0005 gains less per step;
# 0.002 (and 0.006 for the first steps, as the first stage's search) spends more bytes for the same PSNR.
# On kodim01-04 4 steps give +0.33 dB for +0.7% bytes at lambda 200, where lowering lambda to 150 buys
# +0.40 dB for +12% (results/residual-search-defq4600.json).
LR = 0.001
WINDOW_POSITIONS = 2**15  # second-grid positions optimised together, at most about (bounds memory)


def iterations(effort: int) -> int:
    return ITERATIONS[effort]


def refine(coder: ResidualCoder, u: torch.Tensor, arr: np.ndarray, base_px: np.ndarray, budget: torch.Tensor,
           costs: tuple[torch.Tensor, torch.Tensor], lam: float, steps: int, width: int, height: int,
           bf16: bool | None = None) -> torch.Tensor:
    """Bits (H2, W2, L) uint8 after `steps` gradient steps from the unit-norm codes u (H2, W2, L).

    arr, base_px: the padded image and its first-stage pixels (uint8); budget (H2, W2) bits kept per token;
    costs: (cost of each bit being 0, being 1), each (H2, W2, L) in bits; width, height: the image's own
    size (pixels outside it do not count). bf16: the decoder's convolutions in bfloat16, forward and
    backward (None: where the CPU has bfloat16 dot products, as the first stage's search).
    """
    if steps <= 0:
        return (u > 0).to(torch.uint8)
    if bf16 is None:
        bf16 = native_bf16()
    p, L = coder.cfg.patch, coder.cfg.bits
    H2, W2 = u.shape[:2]
    seen = halo(coder.cfg.dec_blocks)
    rows = max(4, WINDOW_POSITIONS // max(1, W2))
    code = u.permute(2, 0, 1)[None].float().clone()  # (1, L, H2, W2)
    kept = (torch.arange(L)[:, None, None] < budget[None]).float()[None]
    c0, c1 = (c.permute(2, 0, 1)[None].float() * kept for c in costs)
    with torch.enable_grad():
        for r0 in range(0, H2, rows):
            r1 = min(H2, r0 + rows)
            a, b = max(0, r0 - seen), min(H2, r1 + seen)
            x = to_float(arr[a * p : b * p])
            base = to_float(base_px[a * p : b * p])
            y0, y1 = (r0 - a) * p, (min(r1 * p, height) - a * p)  # the pixel rows this window owns
            if y1 <= y0:
                continue
            tgt = x[:, :, y0:y1, :width]
            own = code[:, :, r0:r1].clone().requires_grad_(True)
            opt = Adam(own, LR)
            for _ in range(steps):
                v = torch.cat([code[:, :, a:r0], own, code[:, :, r1:b]], 2)
                ste = coder.quant.straight_through(F.normalize(v, dim=1)) * kept[:, :, a:b]
                y = coder.decode_code(ste, base, bf16)[:, :, y0:y1, :width]
                se = ((y - tgt) * 255).square().sum()
                bit = (ste[:, :, r0 - a : r1 - a] * math.sqrt(L) + 1) / 2  # 1 where the code is +1 (kept bits)
                rate = (bit * c1[:, :, r0:r1] + (1 - bit) * c0[:, :, r0:r1]).sum()
                (grad,) = torch.autograd.grad(se + lam * rate, [own])
                opt.step(grad)
            code[:, :, r0:r1] = own.detach()
    return (code[0] > 0).permute(1, 2, 0).to(torch.uint8)
