"""The differentiable SSIMULACRA2 (perceptual.py) against the `ssimulacra2` package, and as a loss."""

import numpy as np
import pytest
import torch

from bsqcodec import perceptual
from bsqcodec.metrics import ssimulacra2


def _photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth shapes, edges and some texture: what the metric's edge and SSIM terms all respond to."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.stack([128 + 90 * np.sin(xx / (7 + 5 * c) + yy / (11 + 3 * c)) for c in range(3)], -1)
    img[h // 3 : 2 * h // 3, w // 4 : w // 2] = (30, 200, 90)  # a hard-edged block
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _damaged(a: np.ndarray, kind: str, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "noise":
        return np.clip(a.astype(int) + rng.integers(-12, 13, a.shape), 0, 255).astype(np.uint8)
    if kind == "blur":
        t = torch.from_numpy(a).permute(2, 0, 1)[None].double()
        b = torch.nn.functional.avg_pool2d(t, 3, 1, 1, count_include_pad=False)
        return b[0].permute(1, 2, 0).round().clamp(0, 255).byte().numpy()
    raise ValueError(kind)


@pytest.mark.parametrize("shape", [(64, 96), (45, 77), (130, 8 * 17)])
@pytest.mark.parametrize("kind", ["noise", "blur"])
def test_score_equals_the_package(shape, kind):
    """Odd sizes too: the partial blocks of the halvings, and the weights of fewer than six scales."""
    a = _photo(*shape)
    b = _damaged(a, kind)
    ours = perceptual.score(perceptual.to_tensor(a), perceptual.to_tensor(b)).item()
    assert ours == pytest.approx(ssimulacra2(a, b), abs=1e-6)


def test_identical_images_score_100_and_damage_lowers_the_score():
    a = perceptual.to_tensor(_photo(64, 64))
    assert perceptual.score(a, a).item() == pytest.approx(100.0, abs=1e-9)
    noisy = perceptual.to_tensor(_damaged(_photo(64, 64), "noise"))
    assert perceptual.score(a, noisy).item() < 95


def test_full_layout_gives_each_scale_its_own_weights():
    """A 64-pixel crop has four scales; with full_layout they take the first four scales' weights of six."""
    a = perceptual.to_tensor(_photo(64, 64))
    b = perceptual.to_tensor(_damaged(_photo(64, 64), "blur"))
    assert perceptual.score(a, b, full_layout=True).item() != pytest.approx(perceptual.score(a, b).item(), abs=1e-3)
    big_a = perceptual.to_tensor(_photo(256, 256))
    big_b = perceptual.to_tensor(_damaged(_photo(256, 256), "blur"))  # six scales: the layouts agree
    assert perceptual.score(big_a, big_b, full_layout=True).item() == pytest.approx(perceptual.score(big_a, big_b).item())


def test_loss_gradient_is_finite_and_descending_it_raises_the_score():
    a = perceptual.to_tensor(_photo(64, 64)).float()
    b = perceptual.to_tensor(_damaged(_photo(64, 64), "blur")).float().requires_grad_()
    before = perceptual.score(a, b).item()
    opt = torch.optim.SGD([b], lr=0.5)
    for _ in range(20):
        opt.zero_grad()
        loss = perceptual.loss(a, b)
        loss.backward()
        assert torch.isfinite(b.grad).all()
        opt.step()
    assert perceptual.score(a, b.detach()).item() > before + 1
