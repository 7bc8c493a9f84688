"""Crafted files and models: valid checksums, hostile contents. Each must end in one clear error, fast."""

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

from bsqcodec.codec import codec
from bsqcodec.format import container, entropy
from bsqcodec.model import weights
from bsqcodec.cli.cli import app
from bsqcodec.errors import BsqError, FormatError, LimitError, ModelError, ModelNotFoundError

from conftest import empty_streams_file, smooth_image

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def encoded(tiny_model):
    arr = np.asarray(smooth_image(np.random.default_rng(3), 45, 33))
    return codec.encode_array(arr, tiny_model)


def one_line_exit_1(r):
    assert r.exit_code == 1, r.output
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("bsqc: error:") and "Traceback" not in r.output, r.output
    return lines[0]


class TestStreams:
    @given(st.integers(0, 2**32 - 1))
    def test_random_streams_of_the_same_lengths_are_rejected(self, tiny_model, encoded, seed):
        header, streams = container.unpack(encoded.data)
        rng = np.random.default_rng(seed)
        k = int(rng.integers(0, len(streams)))
        fake = rng.integers(0, 256, len(streams[k]), dtype=np.uint8).tobytes()
        if fake == streams[k]:
            return
        streams = list(streams)
        streams[k] = fake
        # a stream is rejected by its re-encoding (naming the tile), or, where random words happen to be
        # a valid encoding of other tokens (short streams), by the token checksum
        with pytest.raises(FormatError, match=f"tile {k}|tCRC"):
            codec.decode_detailed(container.pack(header, streams), [tiny_model])

    @given(st.integers(0, 2**32 - 1), st.sampled_from(["drop", "append", "flip"]))
    def test_altered_streams_are_rejected(self, tiny_model, encoded, seed, how):
        header, streams = container.unpack(encoded.data)
        rng = np.random.default_rng(seed)
        k = int(rng.integers(0, len(streams)))
        s = bytearray(streams[k])
        if how == "drop" and len(s) >= 4:
            s = s[:-4]
        elif how == "append":
            s += rng.integers(0, 256, 4, dtype=np.uint8).tobytes()
        elif len(s):
            i = int(rng.integers(0, len(s)))
            s[i] ^= 1 << int(rng.integers(0, 8))
        if bytes(s) == streams[k]:
            return
        streams = list(streams)
        streams[k] = bytes(s)
        with pytest.raises(FormatError):
            codec.decode_detailed(container.pack(header, streams), [tiny_model])

    def test_cli_reports_an_altered_stream_in_one_line_and_writes_nothing(self, model_file, encoded, tmp_path):
        header, streams = container.unpack(encoded.data)
        rng = np.random.default_rng(9)
        bad = tmp_path / "bad.bsq"
        bad.write_bytes(container.pack(header, [rng.integers(0, 256, len(s), dtype=np.uint8).tobytes() for s in streams]))
        out = tmp_path / "o.png"
        one_line_exit_1(run("decode", bad, "-o", out, "--model", model_file))
        assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

    def test_valid_streams_still_decode(self, tiny_model, encoded):
        _, tokens, _ = codec.decode_detailed(encoded.data, [tiny_model])
        assert torch.equal(tokens, encoded.tokens)

    def test_empty_streams_for_a_large_image_fail_within_seconds(self, tiny_model, tmp_path):
        data = empty_streams_file(tiny_model, 2000, 1600, major=1)  # a 1.x stream is whole words
        t0 = time.perf_counter()
        with pytest.raises(FormatError, match="tile"):
            codec.decode_detailed(data, [tiny_model])
        assert time.perf_counter() - t0 < 10

    def test_empty_trimmed_streams_are_the_tokens_a_zero_point_decodes_to(self, tiny_model):
        """In 2.0 an empty stream is the trimmed form of every stream whose words are all zero: a file of
        empty streams decodes, and its tokens code back to empty streams."""
        data = empty_streams_file(tiny_model, 40, 24)
        header, tokens, _ = codec.decode_detailed(data, [tiny_model])
        assert codec.encode_tokens(tiny_model, header, tokens)[0] == [b""] * header.tiles

    def test_entropy_decode_checks_its_stream(self):
        tables = np.full((5, 4), 1.0)
        data = entropy.encode(np.array([0, 1, 2, 3, 0]), tables)
        assert list(entropy.decode(data, tables)) == [0, 1, 2, 3, 0]
        with pytest.raises(FormatError):
            entropy.decode(data + b"\0\0\0\1", tables)


class TestLimits:
    def test_decode_refuses_a_header_over_the_pixel_budget(self, tiny_model, tmp_path):
        data = empty_streams_file(tiny_model, 16384, 16384)
        t0 = time.perf_counter()
        with pytest.raises(LimitError, match="budget"):
            codec.decode_detailed(data, [tiny_model])
        (tmp_path / "big.bsq").write_bytes(data)
        line = one_line_exit_1(run("decode", tmp_path / "big.bsq", "-o", tmp_path / "o.png"))
        assert "--max-pixels" in line and not (tmp_path / "o.png").exists()
        assert time.perf_counter() - t0 < 20

    def test_encode_refuses_a_small_png_of_many_pixels(self, tmp_path):
        p = tmp_path / "wide.png"
        Image.new("RGB", (10000, 9000)).save(p)  # a few hundred KB, 90 M pixels
        assert p.stat().st_size < 2_000_000
        assert "budget" in one_line_exit_1(run("encode", p, "-o", tmp_path / "o.bsq"))
        assert "budget" in one_line_exit_1(run("encode", p, "-o", tmp_path / "o.bsq", "--max-pixels", "1000"))
        small = tmp_path / "small.png"
        Image.new("RGB", (40, 30)).save(small)
        assert "budget" in one_line_exit_1(run("encode", small, "--max-pixels", "1000"))

    def test_generate_and_complete_check_sizes_first(self, tmp_path):
        t0 = time.perf_counter()
        line = one_line_exit_1(run("generate", "-n", "256", "--size", "4096x4096", "-o", tmp_path / "g.png"))
        assert "budget" in line and time.perf_counter() - t0 < 10
        p = tmp_path / "big.png"
        Image.new("RGB", (3000, 3000)).save(p)
        assert "budget" in one_line_exit_1(run("complete", p, "-o", tmp_path / "c.png"))


class TestModelFiles:
    def _save(self, model, tmp_path, config=None, tensors=None, name="m.safetensors"):
        from safetensors.torch import save_file

        p = tmp_path / name
        cfg = config if config is not None else model.config.to_dict()
        save_file(tensors if tensors is not None else model.tensors, str(p),
                  metadata={"format": weights.FORMAT, "config": json.dumps(cfg)})
        return p

    def test_bad_configs_are_one_line(self, tiny_model, tmp_path):
        cfg = tiny_model.config.to_dict()
        for field, value in (("groups", 0), ("dim", 0), ("heads", -1), ("layers", 10**9), ("tile_rows", "x")):
            bad = json.loads(json.dumps(cfg))
            bad["prior"][field] = value
            with pytest.raises(ModelError, match="bad model file"):
                weights.load(self._save(tiny_model, tmp_path, config=bad))
        bad = json.loads(json.dumps(cfg))
        bad["tokenizer"]["channels"] = 10**9
        with pytest.raises(ModelError, match="bad model file"):
            weights.load(self._save(tiny_model, tmp_path, config=bad))

    @pytest.mark.parametrize("change", ["shape", "dtype", "range", "extra", "missing", "shift", "nan", "tok_shape",
                                        "tok_scale", "tok_extra"])
    def test_bad_tensors_are_rejected(self, tiny_model, tmp_path, change):
        t = dict(tiny_model.tensors)
        if change == "shape":
            t["prior.blocks.0.qkv.w"] = t["prior.blocks.0.qkv.w"][:-1].clone()
        elif change == "dtype":
            t["prior.blocks.0.qkv.w"] = t["prior.blocks.0.qkv.w"].to(torch.int16)
        elif change == "range":
            t["prior.blocks.0.fc1.m"] = t["prior.blocks.0.fc1.m"].clone().fill_(2**40)
        elif change == "extra":
            t["prior.surprise"] = torch.zeros(3, dtype=torch.int64)
        elif change == "missing":
            del t["prior.heads.0.b"]
        elif change == "shift":
            t["prior.blocks.0.att_s"] = torch.tensor(0)
        elif change == "tok_shape":
            t["tokenizer.dec_conv.weight"] = t["tokenizer.dec_conv.weight"].reshape(-1)[:-1].clone()
        elif change == "tok_scale":
            t["tokenizer.dec_conv.weight.scale"] = t["tokenizer.dec_conv.weight.scale"][:-1].clone()
        elif change == "tok_extra":
            t["tokenizer.surprise"] = torch.zeros(2)
        else:
            k = next(k for k in t if k.startswith("tokenizer.") and t[k].is_floating_point())
            t[k] = t[k].clone().fill_(float("nan"))
        p = self._save(tiny_model, tmp_path, tensors=t)
        with pytest.raises(ModelError, match="bad model file"):
            weights.load(p)

    def test_a_broken_installed_preset_affects_only_its_files(self, tiny_model, tmp_path, monkeypatch):
        other = dataclasses.replace(tiny_model.config, name="other")
        good = weights.random_model(other, seed=1)
        weights.save(good, tmp_path / "other.safetensors")
        (tmp_path / "tiny.safetensors").write_bytes(b"broken")
        monkeypatch.setattr(weights, "MODELS_DIR", tmp_path)
        arr = np.asarray(smooth_image(np.random.default_rng(0), 20, 12))
        data = codec.encode_array(arr, good).data
        assert codec.decode_detailed(data)[2].shape == (12, 20, 3)  # found among the installed ones
        assert weights.preset("other").name == "other"
        with pytest.raises(ModelError, match="broken"):
            weights.preset("tiny")
        with pytest.raises(ModelError, match="broken"):
            codec.decode_detailed(codec.encode_array(arr, tiny_model).data)

    def test_decoding_reads_only_the_model_file_the_header_names(self, tiny_model, tmp_path, monkeypatch):
        """The installed file named after the header's preset is read first; the others only if it is not the one."""
        weights.save(tiny_model, tmp_path / "tiny.safetensors")
        other = weights.random_model(dataclasses.replace(tiny_model.config, name="other"), seed=1)
        weights.save(other, tmp_path / "other.safetensors")
        (tmp_path / "retired.json").write_text('{"models": {}}')
        monkeypatch.setattr(weights, "MODELS_DIR", tmp_path)
        reads = []
        real_read = weights._read
        monkeypatch.setattr(weights, "_read", lambda p: reads.append(Path(p).name) or real_read(p))
        arr = np.asarray(smooth_image(np.random.default_rng(0), 20, 12))
        data = codec.encode_array(arr, tiny_model).data
        assert codec.decode_detailed(data)[2].shape == (12, 20, 3)
        assert reads == ["tiny.safetensors"]
        # a file naming a preset whose installed file holds another model: every file is looked at
        weights.save(other, tmp_path / "tiny.safetensors")  # the file called tiny now holds 'other'
        monkeypatch.setattr(weights, "_loaded", {})
        with pytest.raises(ModelNotFoundError, match="not installed"):
            codec.decode_detailed(data)

    @pytest.mark.parametrize("name", ["../tiny", "/tmp/x", ".", ""])
    def test_a_preset_name_is_never_a_path(self, name):
        assert weights._named(name) is None

    def test_checkpoints_never_run_pickled_code(self, tmp_path):
        class Evil:
            def __reduce__(self):
                return (exec, ("raise SystemExit('pwned')",))

        p = tmp_path / "evil.ckpt"
        torch.save({"step": 1, "x": Evil()}, p)
        with pytest.raises(ModelError, match="cannot read checkpoint"):
            weights.load_checkpoint(p)


def test_api_pixel_budget(tiny_model):
    img = Image.new("RGB", (40, 30))
    with pytest.raises(LimitError):
        codec.encode(img, tiny_model, max_pixels=100)
    data = codec.encode(img, tiny_model)
    with pytest.raises(LimitError):
        codec.decode(data, [tiny_model], max_pixels=100)
    assert codec.decode(data, [tiny_model], max_pixels=1200).size == (40, 30)
    with pytest.raises(BsqError):
        codec.decode(data[:-9] + bytes(9), [tiny_model])
