import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from bsqcodec.config import TokenizerConfig
from bsqcodec.model import tokenizer as tokenizer_mod
from bsqcodec.model.tokenizer import BSQ, Tokenizer, bits_to_tokens, join_groups, split_groups, tokens_to_bits


def _randomize(tok: Tokenizer) -> Tokenizer:
    """Every weight random: no zero-initialised (identity) block hides what a layer would do."""
    with torch.no_grad():
        for p in tok.parameters():
            p.normal_(0, 0.3)
    return tok


def _assert_strip_decode_matches(tok: Tokenizer, toks: torch.Tensor) -> torch.Tensor:
    """tokens_to_image (strips with a halo) against one decode of the whole grid; returns the image."""
    img = tok.tokens_to_image(toks, bf16=False)
    with torch.no_grad():
        ref = tok.decode_code(tok.quant.tokens_to_codes(toks[None]))[0]
    diff = (img.float() - (ref.clamp(0, 1) * 255).permute(1, 2, 0)).abs().max()
    assert diff <= 0.51
    return img


class TestConversions:
    @given(st.integers(1, 32), st.data())
    def test_tokens_bits_codes_round_trip(self, L, data):
        toks = torch.tensor(data.draw(st.lists(st.integers(0, 2**L - 1), min_size=1, max_size=20)))
        bits = tokens_to_bits(toks, L)
        assert torch.equal(bits_to_tokens(bits), toks)
        q = BSQ(L)
        codes = q.tokens_to_codes(toks.view(1, 1, -1))
        assert torch.allclose(codes.norm(dim=1), torch.ones(1, 1, len(toks)))
        assert torch.equal(q.codes_to_tokens(codes)[0, 0], toks)

    def test_most_significant_bit_first(self):
        assert tokens_to_bits(torch.tensor([1, 2**9]), 10).tolist() == [[0] * 9 + [1], [1] + [0] * 9]

    @given(st.sampled_from([(12, 1), (16, 2), (24, 2), (30, 3)]), st.data())
    def test_groups_round_trip(self, bg, data):
        bits, groups = bg
        toks = torch.tensor(data.draw(st.lists(st.integers(0, 2**bits - 1), min_size=1, max_size=20)))
        sym = split_groups(toks, bits, groups)
        assert sym.max() < 2 ** (bits // groups)
        assert torch.equal(join_groups(sym, bits), toks)

    def test_sign_tie_break(self):
        q = BSQ(3).eval()
        code = q(torch.tensor([[1.0, 0.0, -1.0]]).view(1, 3, 1, 1))
        assert torch.equal(torch.sign(code.view(-1)), torch.tensor([1.0, -1.0, -1.0]))
        assert torch.allclose(code.norm(), torch.tensor(1.0))

    def test_straight_through_gradient(self):
        q = BSQ(4).train()
        v = torch.randn(2, 4, 3, 3, requires_grad=True)
        q(v).sum().backward()
        assert v.grad is not None and v.grad.abs().sum() > 0


class TestTokenizer:
    @pytest.mark.parametrize("up", [False, True])
    def test_pixels_are_the_same_for_any_thread_count_and_strip_height(self, up):
        """Bands of rows in threads and strips with a halo: bit for bit one single-threaded pass."""
        cfg = TokenizerConfig(patch=4, channels=16, bits=10, enc_blocks=1, dec_blocks=2,
                              up_channels=8 if up else 0, up_blocks=1 if up else 0)
        tok = _randomize(Tokenizer(cfg)).eval()
        toks = torch.randint(0, 2**10, (23, 7), generator=torch.Generator().manual_seed(5))
        n = torch.get_num_threads()
        imgs = []
        try:
            for threads, strip in ((1, 128), (2, 128), (3, 128), (3, 5), (1, 4)):
                torch.set_num_threads(threads)
                tok.STRIP = strip
                imgs.append(tok.tokens_to_image(toks, bf16=False))
        finally:
            torch.set_num_threads(n)
        for img in imgs[1:]:
            assert torch.equal(img, imgs[0])
        _assert_strip_decode_matches(tok, toks)

    def test_shapes_and_strips(self):
        torch.manual_seed(0)
        cfg = TokenizerConfig(patch=4, channels=8, bits=10, enc_blocks=1, dec_blocks=1)
        tok = Tokenizer(cfg).eval()
        tok.STRIP = 3  # force several strips
        pixels = torch.randint(0, 256, (40, 24, 3), dtype=torch.uint8)
        x = pixels.permute(2, 0, 1)[None].float().div(255)
        toks = tok.image_to_tokens(pixels)
        assert toks.shape == (10, 6)
        with torch.no_grad():
            full = tok.quant.codes_to_tokens(tok.quant(tok.encode_latent(x)))[0]
        assert torch.equal(toks, full)
        img = _assert_strip_decode_matches(tok, toks)
        assert img.shape == (40, 24, 3) and img.dtype == torch.uint8

    def test_seed_geometry(self):
        from bsqcodec.config import SEED

        tok = Tokenizer(SEED.tokenizer)
        y, code = tok(torch.rand(2, 3, 50, 35))
        assert y.shape == (2, 3, 50, 35) and code.shape == (2, 10, 10, 7)
        assert isinstance(tok.patchify, torch.nn.Conv2d) and tok.patchify.stride == (5, 5)


class TestUpStage:
    """The optional decoder stage at twice the latent resolution (up_channels, up_blocks)."""

    def test_strips_match_the_whole_image(self):
        torch.manual_seed(1)
        cfg = TokenizerConfig(patch=4, channels=8, bits=10, enc_blocks=1, dec_blocks=1, up_channels=6, up_blocks=2)
        tok = _randomize(Tokenizer(cfg)).eval()  # the halo must really cover the stage
        tok.STRIP = 3
        img = _assert_strip_decode_matches(tok, torch.randint(0, 2**10, (10, 6)))
        assert img.shape == (40, 24, 3)
        assert tok.unpatchify.stride == (4, 4) and tok.up_out.stride == (2, 2) and tok.up.out_channels == 6

    def test_bfloat16_decoding_is_within_two_levels_of_float32(self):
        torch.manual_seed(2)
        cfg = TokenizerConfig(patch=4, channels=16, bits=10, enc_blocks=1, dec_blocks=2, up_channels=8, up_blocks=1)
        tok = Tokenizer(cfg).eval()  # trained-like magnitudes (default init): features near 1
        with torch.no_grad():
            tok.up_out.weight.normal_(0, 0.02)  # the stage contributes
        toks = torch.randint(0, 2**10, (12, 9))
        f32, b16 = tok.tokens_to_image(toks, bf16=False), tok.tokens_to_image(toks, bf16=True)
        diff = (f32.int() - b16.int()).abs()
        assert diff.max() >= 1  # bfloat16 is really used
        assert diff.max() <= 2 and diff.float().mean() < 0.2  # within a level or two, on a few pixels
        code = tok.quant.tokens_to_codes(toks[None])
        with torch.no_grad():  # strips in bfloat16 compute the whole image's bfloat16 decode
            whole = (tok.decode_code(code, bf16=True)[0].clamp(0, 1) * 255).permute(1, 2, 0)
        assert (b16.float() - whole).abs().max() <= 1.0

    def test_float32_decoder_switch(self, monkeypatch):
        monkeypatch.setenv(tokenizer_mod.FLOAT32_ENV, "1")
        tokenizer_mod.native_bf16.cache_clear()
        try:
            assert not tokenizer_mod.native_bf16()
            tok = _randomize(Tokenizer(TokenizerConfig(patch=4, channels=8, bits=10, enc_blocks=1, dec_blocks=1)))
            toks = torch.randint(0, 2**10, (5, 4))
            assert torch.equal(tok.tokens_to_image(toks), tok.tokens_to_image(toks, bf16=False))
        finally:
            monkeypatch.delenv(tokenizer_mod.FLOAT32_ENV)
            tokenizer_mod.native_bf16.cache_clear()

    def test_without_the_up_stage_the_decoder_is_the_one_with_a_silent_stage(self):
        torch.manual_seed(3)
        cfg = TokenizerConfig(patch=4, channels=8, bits=10, enc_blocks=1, dec_blocks=1, up_channels=6, up_blocks=1)
        tok = _randomize(Tokenizer(cfg)).eval()
        code = tok.quant.tokens_to_codes(torch.randint(0, 2**10, (1, 5, 4)))
        with torch.no_grad():
            full, lite = tok.decode_code(code), tok.decode_code(code, up=False)
            assert not torch.allclose(full, lite)  # the stage does change pixels
            tok.up_out.weight.zero_()
            tok.up_out.bias.zero_()
            assert torch.equal(tok.decode_code(code), lite)

    def test_shapes_of_odd_half_patches(self):
        for overlap in (True, False):
            tok = Tokenizer(TokenizerConfig(patch=6, channels=8, bits=4, enc_blocks=0, dec_blocks=0, overlap=overlap,
                                            up_channels=4, up_blocks=1))
            y, code = tok(torch.rand(1, 3, 18, 12))
            assert y.shape == (1, 3, 18, 12) and code.shape == (1, 4, 3, 2)

    def test_a_grown_decoder_starts_as_the_old_one(self, tmp_path):
        import dataclasses

        from bsqcodec.train.train import _init_from

        torch.manual_seed(2)
        cfg = TokenizerConfig(patch=4, channels=8, bits=10, enc_blocks=1, dec_blocks=1)
        old = _randomize(Tokenizer(cfg)).eval()
        grown = Tokenizer(dataclasses.replace(cfg, up_channels=6, up_blocks=1)).eval()
        torch.save({"stage": "tokenizer", "model": old.state_dict()}, tmp_path / "old.ckpt")
        _init_from(grown, "tokenizer", str(tmp_path / "old.ckpt"))
        code = old.quant.tokens_to_codes(torch.randint(0, 2**10, (1, 5, 4)))
        with torch.no_grad():
            assert torch.equal(grown.decode_code(code), old.decode_code(code))
        grown.train()  # and the branch learns: its zero last layer gets a gradient
        out, _ = grown(torch.rand(1, 3, 20, 16))
        out.square().sum().backward()
        assert grown.up_out.weight.grad.abs().sum() > 0

    def test_config(self):
        import dataclasses

        import pytest

        from bsqcodec.config import DEFAULT, ModelConfig

        plain = TokenizerConfig()
        assert "up_channels" not in plain.to_dict() and "up_blocks" not in DEFAULT.to_dict()["tokenizer"]
        up = dataclasses.replace(plain, up_channels=64, up_blocks=1)
        assert up.to_dict()["up_channels"] == 64
        m = dataclasses.replace(DEFAULT, tokenizer=up)
        assert ModelConfig.from_dict(m.to_dict()) == m
        assert up.encodes_like(plain) and plain.encodes_like(up) and not up.has_prefix(plain)
        assert dataclasses.replace(up, bits=24).encodes_like(plain)
        assert not up.encodes_like(dataclasses.replace(plain, channels=128))
        assert up.halo == plain.halo + 1
        with pytest.raises(ValueError, match="needs up_channels"):
            TokenizerConfig(up_blocks=1)
        with pytest.raises(ValueError, match="even patch"):
            TokenizerConfig(patch=5, up_channels=8)


def test_single_threaded_kernels_sets_torch_and_numpys_blas_to_one_thread_and_restores_them():
    import sys

    from bsqcodec import cpu

    if sys.platform.startswith("linux"):  # NumPy's wheels bundle OpenBLAS there, and it must be found
        assert cpu.blas_threads() is not None
    before = (torch.get_num_threads(), cpu.blas_threads())
    with cpu.single_threaded_kernels():
        assert torch.get_num_threads() == 1 and cpu.blas_threads() in (1, None)
    assert (torch.get_num_threads(), cpu.blas_threads()) == before


def test_the_workers_of_threads_of_kernels_run_single_threaded_kernels_whatever_another_thread_sets():
    import threading

    from bsqcodec import cpu

    before = torch.get_num_threads()
    with cpu.threads_of_kernels(2) as run:
        t = threading.Thread(target=torch.set_num_threads, args=(max(2, before),))  # as another region's exit
        t.start()
        t.join()
        assert run(lambda _: torch.get_num_threads(), range(4)) == [1, 1, 1, 1]
    torch.set_num_threads(before)
