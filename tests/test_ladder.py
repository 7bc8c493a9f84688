"""The quality ladder: nested BSQ tokenizers, wide tokens, int8 model files, -q and the bench curve."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from bsqcodec.bench import bench
from bsqcodec.codec import codec
from bsqcodec.format import container
from bsqcodec.model import weights
from bsqcodec.cli.cli import app
from bsqcodec.config import LADDER, RUNG_NAMES, SECOND_RUNGS, ModelConfig, PriorConfig, TokenizerConfig
from bsqcodec.errors import FormatError
from bsqcodec.model.tokenizer import Tokenizer, resize_bits
from bsqcodec.train.train import TrainOptions, train
from conftest import TINY, repack_1_2, smooth_image

runner = CliRunner()


def _wide(bits: int, seed: int = 0) -> Tokenizer:
    torch.manual_seed(seed)
    tok = Tokenizer(dataclasses.replace(TINY.tokenizer, bits=bits)).eval()
    with torch.no_grad():  # a decoder that uses every bit (from_code starts at random, not zero)
        tok.from_code.weight.normal_()
    return tok


def test_truncated_tokenizer_equals_masked_code():
    tok = _wide(24)
    x = torch.rand(3, 3, 24, 32)
    keep = torch.tensor([5, 12, 24])
    with torch.no_grad():
        y, _ = tok(x, keep)
        for b, k in enumerate(keep.tolist()):
            yk, _ = tok.truncated(k)(x[b : b + 1])
            assert torch.allclose(y[b : b + 1], yk, atol=1e-5)


def test_truncated_tokens_are_the_first_bits():
    tok = _wide(24, seed=1)
    arr = np.asarray(smooth_image(np.random.default_rng(0), 40, 28))[:28, :40]
    full = tok.image_to_tokens(arr)
    for k in (1, 7, 12, 23):
        assert torch.equal(tok.truncated(k).image_to_tokens(arr), full >> (24 - k))
    with pytest.raises(ValueError):
        tok.truncated(25)


def test_widening_keeps_the_reconstruction():
    narrow = _wide(12, seed=2)
    wide = Tokenizer(dataclasses.replace(TINY.tokenizer, bits=20)).eval()
    wide.load_state_dict(resize_bits(narrow.state_dict(), 20))
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(narrow(x)[0], wide(x)[0], atol=1e-5)
        assert torch.equal(wide.truncated(12).state_dict()["to_code.weight"], narrow.state_dict()["to_code.weight"])


def _dataset(root):
    rng = np.random.default_rng(0)
    for i in range(4):
        smooth_image(rng, 64, 48).save(root / f"im{i}.png")
    return root


def test_nested_training_then_narrow_prior_and_export(tmp_path):
    data = _dataset(tmp_path)
    wide_cfg = dataclasses.replace(TINY, tokenizer=dataclasses.replace(TINY.tokenizer, bits=16),
                                   prior=dataclasses.replace(TINY.prior, bits=16, groups=2))
    narrow_cfg = dataclasses.replace(TINY, name="narrow")  # 12 bits: the first 12 of the 16
    arch_w, arch_n = tmp_path / "w.json", tmp_path / "n.json"
    arch_w.write_text(json.dumps(wide_cfg.to_dict()))
    arch_n.write_text(json.dumps(narrow_cfg.to_dict()))
    common = dict(data=str(data), steps=4, batch=4, crop=32, per_image=2, eval_every=100, warmup=1)
    base = train(TrainOptions(stage="tokenizer", out=str(tmp_path / "base"), arch=str(arch_n), **common))
    run = tmp_path / "nested"
    train(TrainOptions(stage="tokenizer", out=str(run), arch=str(arch_w), init=str(tmp_path / "base" / "tokenizer.ckpt"),
                       nested=(6, 12, 16, 16), code_lr_mult=10.0, steps=0, **{k: v for k, v in common.items() if k != "steps"}))
    st = weights.load_checkpoint(run / "tokenizer.ckpt")
    assert torch.equal(st["model"]["to_code.weight"][:12], base["model"]["to_code.weight"])  # --init kept the bits
    train(TrainOptions(stage="tokenizer", out=str(run), arch=str(arch_w), nested=(6, 12, 16, 16), code_lr_mult=10.0,
                       resume=True, **{**common, "steps": 3}))
    groups = weights.load_checkpoint(run / "tokenizer.ckpt")["opt"]["param_groups"]
    assert [g["lr_mult"] for g in groups] == [1.0, 10.0]
    prun = tmp_path / "prior12"
    train(TrainOptions(stage="prior", out=str(prun), arch=str(arch_n), tokenizer_ckpt=str(run / "tokenizer.ckpt"),
                       **common))
    r = runner.invoke(app, ["train", "export", "--run", str(prun), "--data", str(data), "-o", str(tmp_path / "m.safetensors"),
                            "--calib", "8"])
    assert r.exit_code == 0, r.output
    m = weights.load(tmp_path / "m.safetensors")
    assert m.config.tokenizer.bits == 12
    wide_tok = weights.load_tokenizer_any(run / "tokenizer.ckpt")
    arr = np.asarray(Image.open(data / "im0.png").convert("RGB"))
    # the shipped tokenizer is the nested one cut to 12 bits (int8-stored weights: tokens may differ a little)
    agree = (m.tokenizer.image_to_tokens(arr) == wide_tok.image_to_tokens(arr) >> 4).float().mean()
    assert agree > 0.8
    enc = codec.encode_array(arr, m)
    assert torch.equal(codec.decode_detailed(enc.data, [m])[1], enc.tokens)


def test_nested_rejects_bad_budgets(tmp_path):
    data = _dataset(tmp_path)
    arch = tmp_path / "a.json"
    arch.write_text(json.dumps(TINY.to_dict()))
    r = runner.invoke(app, ["train", "tokenizer", "--data", str(data), "--out", str(tmp_path / "r"), "--arch", str(arch),
                            "--nested", "4,13", "--steps", "1"])
    assert r.exit_code == 1 and "--nested" in r.output


def test_48_bit_tokens_round_trip_in_version_2_and_1_2():
    cfg = ModelConfig(name="wide", tokenizer=dataclasses.replace(TINY.tokenizer, bits=48),
                      prior=dataclasses.replace(TINY.prior, bits=48, groups=6))
    m = weights.random_model(cfg, seed=3)
    arr = np.asarray(smooth_image(np.random.default_rng(1), 30, 22))
    enc = codec.encode_array(arr, m)
    header, streams = container.unpack(enc.data)
    assert (header.major, header.minor, header.bits) == (2, 0, 48)
    assert torch.equal(codec.decode_detailed(enc.data, [m])[1], enc.tokens)
    assert int(enc.tokens.max()) >= 2**32  # really wider than 32 bits
    old = repack_1_2(enc.data, m)  # 1.2: the token checksum chunk; 1.1: 48 bits
    assert torch.equal(codec.decode_detailed(old, [m])[1], enc.tokens)
    header = container.unpack(old)[0]
    assert container.lowest_minor(48) == 1 and container.lowest_minor(32) == 0  # without the checksum chunk
    header.minor = 0  # a 1.0 header may not claim more than 32 bits
    with pytest.raises(FormatError):
        header.validate()


def test_int8_model_file_round_trip(tmp_path, tiny_model):
    assert tiny_model.tensors["tokenizer.enc_conv.weight"].dtype == torch.int8
    assert "tokenizer.enc_conv.weight.scale" in tiny_model.tensors
    weights.save(tiny_model, tmp_path / "t.safetensors")
    again = weights.load(tmp_path / "t.safetensors")
    assert again.sha256 == tiny_model.sha256
    w = torch.randn(8, 4, 3, 3)
    q, s = weights.quantize_weight(w)
    assert (q.float() * s.view(-1, 1, 1, 1) - w).abs().max() <= s.max() / 2 + 1e-7


def test_ladder_is_ordered_and_names_quality_levels():
    assert len(LADDER) == 5 and LADDER[2].name == "default"
    bits = [c.tokenizer.bits for c in LADDER]
    assert bits == sorted(bits) and len(set(bits)) == 5
    assert all(c.tokenizer == dataclasses.replace(LADDER[-1].tokenizer, bits=c.tokenizer.bits) for c in LADDER)
    assert all(c.prior.group_bits <= 8 for c in LADDER)


def test_quality_option_picks_the_rung(tmp_path):
    img = tmp_path / "p.png"
    smooth_image(np.random.default_rng(2), 40, 24).save(img)
    inst = weights.installed()
    for q, name in enumerate(RUNG_NAMES, 1):
        if name not in inst:
            continue
        out = tmp_path / f"p{q}.bsq"
        r = runner.invoke(app, ["encode", str(img), "-q", str(q), "-o", str(out), "--json", "--quiet"])
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout)["preset"] == name
        header, _ = container.unpack(out.read_bytes())
        if name in SECOND_RUNGS:  # a second-stage rung: a 2.1 file on the default rung's
            assert (header.minor, header.preset) == (1, name) and header.second is not None
            assert codec.decode_detailed(out.read_bytes())[2].shape == (24, 40, 3)
        else:
            assert header.second is None
    # qN names rung N where no preset has that name (q3: the default rung); a preset's own name wins
    if "default" in inst:
        assert weights.preset("q3").name == "default"
    for name in ("q4", "q5"):  # the first-stage models of 0.5, off the ladder since 0.6.0, kept for their files
        if name in inst:
            assert weights.preset(name).name == name and RUNG_NAMES[int(name[1]) - 1] != name
    assert runner.invoke(app, ["encode", str(img), "-q", "10"]).exit_code == 2  # usage error from the parser
    # a rung that is not installed (here: every rung but q1, in a models folder of its own): one clear line
    only = tmp_path / "models"
    only.mkdir()
    if "q1" in inst:
        (only / "q1.safetensors").write_bytes(Path(inst["q1"][0]).read_bytes())
    (only / "retired.json").write_bytes((weights.MODELS_DIR / "retired.json").read_bytes())
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(weights, "MODELS_DIR", only)
        r = runner.invoke(app, ["encode", str(img), "-q", "6", "-o", str(tmp_path / "x.bsq")])
    assert r.exit_code == 1 and "quality 6 (preset 'q6') is not installed" in r.output, r.output
    assert not (tmp_path / "x.bsq").exists()
    r = runner.invoke(app, ["encode", str(img), "-q", "1", "--preset", "default"])
    assert r.exit_code == 1 and "choose one" in r.output


def test_bench_curve_is_the_ladder(tmp_path):
    img = tmp_path / "b.png"
    smooth_image(np.random.default_rng(3), 24, 16).save(img)
    models = [weights.random_model(dataclasses.replace(TINY, name=n), seed=i) for i, n in enumerate(("q1", "q2", "other"))]
    res = bench.run(img, models, codecs=(), sweep=False)
    assert sorted(p["preset"] for p in res["curves"]["bsqc"]) == ["q1", "q2"]
    assert set(res["totals"]) == {"q1", "q2", "other"}
