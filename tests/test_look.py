"""Looks (look.py): another decoder of the same files, found by the model it decodes for."""

import numpy as np
import pytest
import torch
from PIL import Image

from bsqcodec.codec import codec
from bsqcodec.model import look, weights
from bsqcodec.format import modelfile
from bsqcodec.config import LookConfig
from bsqcodec.errors import BsqError, ModelError, ModelNotFoundError
from bsqcodec.model.tokenizer import Tokenizer

from conftest import smooth_image


def tiny_sharp(base, seed=0):
    """A look of `base` whose decoder is base's with noise added (a decoder-only run's checkpoint stands for it)."""
    torch.manual_seed(seed)
    state = {k: v.clone() for k, v in base.tokenizer.state_dict().items()}
    for k, v in state.items():
        if not k.startswith(Tokenizer.ENCODER) and v.dtype.is_floating_point:
            v.add_(torch.randn_like(v) * 0.05)
    return look.build(base, "sharp", "tiny-sharp", state)


@pytest.fixture(scope="module")
def sharp(tiny_model):
    return tiny_sharp(tiny_model)


@pytest.fixture(scope="module")
def file(tiny_model):
    return codec.encode_array(np.asarray(smooth_image(np.random.default_rng(6), 30, 22)), tiny_model, effort=1)


def test_a_look_decodes_the_same_file_with_its_own_decoder(file, tiny_model, sharp, tmp_path):
    faithful = codec.decode_detailed(file.data, [tiny_model])[2]
    _, tokens, px = codec.decode_detailed(file.data, [tiny_model, sharp], look="sharp")
    assert torch.equal(tokens, file.tokens) and not np.array_equal(px, faithful)
    assert np.array_equal(px, sharp.tokenizer.tokens_to_image(tokens)[:22, :30].numpy())
    assert np.array_equal(codec.decode_detailed(file.data, [tiny_model, sharp])[2], faithful)  # the default is faithful
    path = tmp_path / "tiny-sharp.safetensors"
    weights.save(sharp, path)
    config, h = modelfile.summary(path)
    assert isinstance(config, LookConfig) and h == sharp.sha256
    back = weights.load(path)
    assert isinstance(back, look.LookModel) and back.sha256 == sharp.sha256 and back.fits(tiny_model)
    assert not any(k.startswith("tokenizer.enc_") or k.startswith("tokenizer.patchify") for k in back.tensors)


def test_missing_or_unknown_looks_and_looks_of_other_models_are_refused(file, tiny_model, sharp):
    with pytest.raises(ModelNotFoundError, match="no sharp look"):
        codec.decode_detailed(file.data, [tiny_model], look="sharp")
    with pytest.raises(BsqError, match="unknown look"):
        codec.decode_detailed(file.data, [tiny_model, sharp], look="blurry")
    other = weights.random_model(tiny_model.config.__class__.from_dict({**tiny_model.config.to_dict(), "name": "o"}), seed=4)
    with pytest.raises(ModelNotFoundError):  # a look of another model is not this model's
        codec.decode_detailed(codec.encode_array(np.zeros((8, 8, 3), np.uint8), other, effort=1).data, [other, sharp],
                              look="sharp")


def test_bad_look_files_are_refused(sharp, tiny_model):
    t = dict(sharp.tensors)
    t["tokenizer.patchify.weight"] = torch.zeros(1)  # an encoder tensor: a look holds none
    with pytest.raises(ModelError):
        look.from_tensors(sharp.config, t)
    t = {k: v for k, v in sharp.tensors.items() if not k.startswith("tokenizer.from_code")}
    with pytest.raises(ModelError):
        look.from_tensors(sharp.config, t)
    with pytest.raises(ValueError):
        LookConfig(name="x", look="blurry", base="tiny", base_hash="ab" * 16, tokenizer=tiny_model.config.tokenizer)


def test_the_command_line_decodes_either_look(file, tiny_model, sharp, tmp_path):
    from typer.testing import CliRunner

    from bsqcodec.cli.cli import app

    weights.save(tiny_model, tmp_path / "tiny.safetensors")
    weights.save(sharp, tmp_path / "sharp.safetensors")
    (tmp_path / "a.bsq").write_bytes(file.data)
    run = lambda *a: CliRunner().invoke(app, [str(x) for x in a])  # noqa: E731
    models = ["--model", tmp_path / "tiny.safetensors", "--model", tmp_path / "sharp.safetensors"]
    r = run("decode", tmp_path / "a.bsq", "-o", tmp_path / "s.png", "--look", "sharp", *models, "--quiet")
    assert r.exit_code == 0, r.output
    want = codec.decode_detailed(file.data, [tiny_model, sharp], look="sharp")[2]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "s.png")), want)
    r = run("decode", tmp_path / "a.bsq", "-o", tmp_path / "t.png", "--look", "sharp", "--model", tmp_path / "tiny.safetensors")
    assert r.exit_code == 1 and "no sharp look" in r.output and not (tmp_path / "t.png").exists()


def test_an_installed_look_is_found_by_the_model_it_decodes_for(file, tiny_model, sharp, tmp_path, monkeypatch):
    weights.save(tiny_model, tmp_path / "tiny.safetensors")
    weights.save(sharp, tmp_path / "tiny-sharp.safetensors")
    (tmp_path / "retired.json").write_text('{"models": {}}')
    monkeypatch.setattr(weights, "MODELS_DIR", tmp_path)
    want = codec.decode_detailed(file.data, [tiny_model, sharp], look="sharp")[2]
    assert np.array_equal(codec.decode_detailed(file.data, look="sharp")[2], want)


def test_presets_lists_an_installed_look_with_the_model_it_decodes_for(tiny_model, sharp, tmp_path, monkeypatch):
    import json

    from typer.testing import CliRunner

    from bsqcodec.cli.cli import app

    weights.save(tiny_model, tmp_path / "tiny.safetensors")
    weights.save(sharp, tmp_path / "tiny-sharp.safetensors")
    monkeypatch.setattr(modelfile, "MODELS_DIR", tmp_path)
    run = lambda *a: CliRunner().invoke(app, [str(x) for x in a])  # noqa: E731
    r = run("presets", "--json")
    assert r.exit_code == 0, r.output
    rows = {row["preset"]: row for row in json.loads(r.stdout)["presets"]}
    assert rows[sharp.name]["look_of"] == tiny_model.name and rows[sharp.name]["look"] == "sharp"
    assert "look_of" not in rows[tiny_model.name]
    r = run("presets")
    assert r.exit_code == 0 and f"{tiny_model.name}, sharp look" in r.stdout


def test_the_pillow_plugin_decodes_either_look(file, tiny_model, sharp, tmp_path, monkeypatch):
    import bsqcodec  # noqa: F401 - registers the plugin

    weights.save(tiny_model, tmp_path / "tiny.safetensors")
    weights.save(sharp, tmp_path / "tiny-sharp.safetensors")
    (tmp_path / "retired.json").write_text('{"models": {}}')
    monkeypatch.setattr(weights, "MODELS_DIR", tmp_path)
    (tmp_path / "a.bsq").write_bytes(file.data)
    faithful = codec.decode_detailed(file.data)[2]
    want = codec.decode_detailed(file.data, look="sharp")[2]
    assert not np.array_equal(faithful, want)
    with Image.open(tmp_path / "a.bsq") as im:
        assert np.array_equal(np.asarray(im.convert("RGB")), faithful)  # the default look
    with Image.open(tmp_path / "a.bsq") as im:
        im.set_look("sharp")
        assert np.array_equal(np.asarray(im.convert("RGB")), want)
        with pytest.raises(ValueError, match="already loaded"):
            im.set_look("faithful")
    with Image.open(tmp_path / "a.bsq") as im, pytest.raises(ValueError, match="unknown look"):
        im.set_look("blurry")


def test_a_look_model_cannot_encode_sample_or_be_benched_alone(tiny_model, sharp, tmp_path):
    from typer.testing import CliRunner

    from bsqcodec.bench import bench
    from bsqcodec.cli.cli import app

    with pytest.raises(BsqError, match="tiny-sharp is a look model: it decodes the files of tiny"):
        codec.encode_array(np.zeros((8, 8, 3), np.uint8), sharp, effort=1)
    weights.save(sharp, tmp_path / "sharp.safetensors")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    for args in (["encode", tmp_path / "a.png", "--model", tmp_path / "sharp.safetensors"],
                 ["generate", "-n", "1", "-o", tmp_path / "g.png", "--model", tmp_path / "sharp.safetensors"]):
        r = CliRunner().invoke(app, [str(a) for a in args])
        assert r.exit_code == 1 and "is a look model" in r.output, r.output
    assert not (tmp_path / "a.bsq").exists() and not (tmp_path / "g.png").exists()
    with pytest.raises(BsqError, match="look models only decode"):
        bench.run(tmp_path, [sharp], look="sharp")
