"""A patch discriminator for a sharper decoder (issue 26): real or decoded, region by region, given the tokens.

It works at a quarter of the pixel resolution (pixel_unshuffle first, as the tokenizer convolves at patch
resolution), then at an eighth, where the tokens' code joins it: it judges whether pixels are a plausible
rendering of *these* tokens, so the decoder learns texture that fits the file, not texture in general.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PatchDiscriminator(nn.Module):
    def __init__(self, bits: int, width: int = 64) -> None:
        super().__init__()
        self.inp = nn.Conv2d(3 * 16, width, 3, padding=1)
        self.down = nn.Conv2d(width, 2 * width, 4, stride=2, padding=1)
        self.code = nn.Conv2d(bits, 2 * width, 1)
        self.mid = nn.Conv2d(2 * width, 2 * width, 3, padding=1)
        self.out = nn.Conv2d(2 * width, 1, 1)

    def forward(self, x: torch.Tensor, code: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """x (B, 3, H, W) in [0, 1], H and W multiples of 8; code (B, L, h, w) -> (logits (B, 1, H/8, W/8), features)."""
        f1 = F.leaky_relu(self.inp(F.pixel_unshuffle(x - 0.5, 4)), 0.2)
        f2 = F.leaky_relu(self.down(f1), 0.2)
        c = F.interpolate(code, size=f2.shape[-2:], mode="nearest")
        f3 = F.leaky_relu(self.mid(f2 + self.code(c)), 0.2)
        return self.out(f3), [f1, f2, f3]


def generator_loss(disc: PatchDiscriminator, x: torch.Tensor, y: torch.Tensor, code: torch.Tensor,
                   adversarial: float, feature_matching: float) -> torch.Tensor:
    """The decoder's adversarial terms: fool the discriminator (hinge), and match its features on the real image."""
    with torch.no_grad():
        _, real = disc(x, code)
    fake_logits, fake = disc(y, code)
    fm = sum(F.l1_loss(a, b) for a, b in zip(fake, real)) / len(fake)
    return adversarial * -fake_logits.mean() + feature_matching * fm


def discriminator_loss(disc: PatchDiscriminator, x: torch.Tensor, y: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Hinge loss: real images above +1, decoded ones below -1."""
    real, _ = disc(x, code)
    fake, _ = disc(y.detach(), code)
    return F.relu(1 - real).mean() + F.relu(1 + fake).mean()
