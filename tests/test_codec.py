import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

import bsqcodec
from bsqcodec.codec import codec
from bsqcodec.format import container
from bsqcodec.model import weights
from bsqcodec.errors import BsqError, FormatError, ModelNotFoundError


def random_image(seed: int, h: int, w: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (1 + h // 8, 1 + w // 8, 3)).astype(np.uint8)
    img = np.asarray(Image.fromarray(base).resize((w, h), Image.BILINEAR))
    noise = rng.integers(-8, 9, img.shape)
    return np.clip(img.astype(int) + noise, 0, 255).astype(np.uint8)


class TestCodec:
    @given(st.integers(1, 100), st.integers(1, 70), st.integers(0, 2**31), st.integers(1, 7), st.integers(1, 3))
    def test_lossless_on_tokens(self, tiny_model, w, h, seed, batch_tiles, workers):
        arr = random_image(seed, h, w)
        enc = codec.encode_array(arr, tiny_model)
        header, tokens, out = codec.decode_detailed(enc.data, [tiny_model], batch_tiles=batch_tiles, workers=workers)
        assert torch.equal(tokens, enc.tokens)
        assert out.shape == arr.shape
        assert np.array_equal(out, codec.tokens_to_array(tiny_model, enc.tokens, w, h))
        assert (header.width, header.height) == (w, h)

    def test_payload_close_to_estimate(self, tiny_model):
        enc = codec.encode_array(random_image(1, 64, 96), tiny_model)
        header, streams = container.unpack(enc.data)
        payload_bits = 8 * sum(map(len, streams))
        assert payload_bits <= enc.estimated_bits * 1.01 + 64 * header.tiles

    def test_threads_do_not_change_pixels(self, tiny_model):
        enc = codec.encode_array(random_image(2, 50, 61), tiny_model)
        outs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append(codec.decode_detailed(enc.data, [tiny_model], batch_tiles=n * 3)[2])
        assert np.array_equal(*outs)

    def test_a_corrupt_stream_in_a_worker_process_is_one_error(self, tiny_model):
        from bsqcodec.errors import BsqError

        enc = codec.encode_array(random_image(4, 40, 60), tiny_model)
        header, streams = container.unpack(enc.data)
        streams[-1] = streams[-1] + b"x"  # not whole 32-bit words; the last tile goes to the last worker
        bad = container.pack(header, streams)
        for workers in (1, 3):
            with pytest.raises(BsqError):
                codec.decode_detailed(bad, [tiny_model], workers=workers)

    def test_python_api(self, tiny_model):
        img = Image.fromarray(random_image(3, 30, 40))
        data = bsqcodec.encode(img, model=tiny_model)
        out = bsqcodec.decode(data, models=[tiny_model])
        assert isinstance(out, Image.Image) and out.size == (40, 30) and out.mode == "RGB"

    def test_icc_profile_is_kept(self, tiny_model):
        img = Image.fromarray(random_image(4, 9, 9))
        img.info["icc_profile"] = b"fake-profile"
        out = bsqcodec.decode(bsqcodec.encode(img, model=tiny_model), models=[tiny_model])
        assert out.info["icc_profile"] == b"fake-profile"

    def test_invalid_unknown_model(self, tiny_model):
        data = codec.encode_array(random_image(5, 8, 8), tiny_model).data
        with pytest.raises(ModelNotFoundError, match="tiny"):
            codec.decode(data)

    def test_invalid_every_byte_change(self, tiny_model):
        data = codec.encode_array(random_image(6, 12, 12), tiny_model).data
        for i in range(len(data)):
            bad = bytearray(data)
            bad[i] ^= 0x10
            with pytest.raises(BsqError):
                codec.decode(bytes(bad), models=[tiny_model])

    def test_invalid_geometry_mismatch(self, tiny_model):
        enc = codec.encode_array(random_image(7, 8, 8), tiny_model)
        h, streams = container.unpack(enc.data)
        h.tile_rows += 1
        data = container.pack(h, streams[: h.tiles] + [b""] * (h.tiles - len(streams)))
        with pytest.raises(FormatError, match="geometry"):
            codec.decode(data, models=[tiny_model])


def test_a_model_with_an_up_stage_round_trips_through_its_file(tmp_path):
    import dataclasses

    from conftest import TINY

    cfg = dataclasses.replace(TINY, tokenizer=dataclasses.replace(TINY.tokenizer, up_channels=8, up_blocks=1))
    m = weights.random_model(cfg, seed=3)
    weights.save(m, tmp_path / "up.safetensors")
    back = weights.load(tmp_path / "up.safetensors")
    assert back.config == cfg and back.sha256 == m.sha256
    arr = np.random.default_rng(0).integers(0, 256, (13, 22, 3), dtype=np.uint8)
    enc = codec.encode_array(arr, back, effort=2)
    _, tokens, out = codec.decode_detailed(enc.data, [back])
    assert torch.equal(tokens, enc.tokens) and out.shape == arr.shape
    assert np.array_equal(out, codec.tokens_to_array(m, tokens, 22, 13))
