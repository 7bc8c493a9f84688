import numpy as np
import pytest
import torch

from bsqcodec.metrics import bd_psnr, bd_rate, ms_ssim, psnr


class TestPSNR:
    def test_known_value(self):
        a = np.zeros((4, 4, 3), np.uint8)
        b = a.copy()
        b[0, 0, 0] = 255  # mse = 255^2 / 48
        assert psnr(a, b) == pytest.approx(10 * np.log10(48))
        assert psnr(a, a) == float("inf")


class TestMSSSIM:
    def test_matches_reference_implementation(self):
        # reference: pytorch_msssim 1.0 ms_ssim(x, y, data_range=255) on these exact tensors = 0.9701173
        g = torch.Generator().manual_seed(0)
        x = torch.rand(1, 3, 192, 192, generator=g) * 255
        y = (x + torch.randn(1, 3, 192, 192, generator=g) * 20).clamp(0, 255)
        assert ms_ssim(x, y) == pytest.approx(0.9701173, abs=1e-5)  # the reference works in float32

    def test_identity_and_order(self):
        rng = np.random.default_rng(0)
        a = rng.integers(0, 256, (200, 180, 3), dtype=np.uint8)
        noisy = np.clip(a + rng.normal(0, 10, a.shape), 0, 255).astype(np.uint8)
        noisier = np.clip(a + rng.normal(0, 40, a.shape), 0, 255).astype(np.uint8)
        assert ms_ssim(a, a) == pytest.approx(1.0)
        assert 1 > ms_ssim(a, noisy) > ms_ssim(a, noisier) > 0

    def test_small_images(self):
        a = np.full((5, 7, 3), 100, np.uint8)
        assert ms_ssim(a, a) == pytest.approx(1.0)


class TestBDRate:
    R1, P1 = [100, 200, 400, 800], [30, 33, 36, 39]

    def test_known_value(self):
        # reference: the `bjontegaard` package 1.x, bd_rate(..., method="cubic") = -16.8877 %, bd_psnr = 0.80798 dB
        r2, p2 = [90, 170, 350, 700], [30.2, 33.1, 36.3, 39.1]
        assert bd_rate(self.R1, self.P1, r2, p2) == pytest.approx(-16.8877, abs=1e-3)
        assert bd_psnr(self.R1, self.P1, r2, p2) == pytest.approx(0.80798, abs=1e-4)

    def test_scaled_rates_are_exact(self):
        assert bd_rate(self.R1, self.P1, [r * 0.9 for r in self.R1], self.P1) == pytest.approx(-10.0)
        assert bd_rate(self.R1, self.P1, self.R1, self.P1) == pytest.approx(0.0, abs=1e-9)

    def test_invalid_no_overlap(self):
        with pytest.raises(ValueError):
            bd_rate(self.R1, self.P1, self.R1, [50, 51, 52, 53])
