"""Looks of the second stage (look.SecondLookModel): one decoder for the files of every second-stage model that
shares its coder, the first stage's faithful pixels under it."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from bsqcodec.codec import codec, twostage
from bsqcodec.model import look, weights
from bsqcodec.format import modelfile
from bsqcodec.config import SecondLookConfig
from bsqcodec.errors import BsqError, ModelError, ModelNotFoundError
from bsqcodec.model.residual import ResidualCoder

from conftest import image_folder, smooth_image
from test_second import RCFG, tiny_second


def noisy_decoder(smodel, seed=0) -> dict:
    """smodel's coder state with noise on its decoder (a decoder-only run's checkpoint stands for it)."""
    torch.manual_seed(seed)
    state = {k: v.clone() for k, v in smodel.coder.state_dict().items()}
    for k, v in state.items():
        if not k.startswith(ResidualCoder.ENCODER):
            v.add_(torch.randn_like(v) * 0.1)
    return state


@pytest.fixture(scope="module")
def rungs(tiny_model):
    """Two second-stage models of one coder (as q4s ... q9): the same tensors, other names, so other hashes."""
    a, b = tiny_second(tiny_model, name="tiny-ra"), tiny_second(tiny_model, name="tiny-rb")
    assert a.sha256 != b.sha256 and all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    return a, b


@pytest.fixture(scope="module")
def sharp2(rungs):
    return look.build_second(list(rungs), "sharp", "tiny-r-sharp", noisy_decoder(rungs[0]))


@pytest.fixture(scope="module")
def files(tiny_model, rungs):
    img = np.asarray(smooth_image(np.random.default_rng(5), 37, 26))
    return img, [codec.encode_array(img, m, effort=1, models=[tiny_model]) for m in rungs]


def test_one_look_decodes_the_second_stage_of_every_model_it_names(tiny_model, rungs, sharp2, files):
    for m, f in zip(rungs, files[1]):
        h, tokens, faithful = codec.decode_detailed(f.data, [tiny_model, m])
        _, tokens2, px = codec.decode_detailed(f.data, [tiny_model, m, sharp2], look="sharp")
        assert torch.equal(tokens, tokens2) and not np.array_equal(px, faithful)
        # the look's decoder on the first stage's faithful pixels and the file's own second-stage tokens
        _, bits01, budget = twostage.decode_tokens(h, tiny_model, tokens.numpy(), [tiny_model, m])
        want = twostage.pixels(sharp2, codec.padded_pixels(tiny_model, tokens), bits01, budget)
        assert np.array_equal(px, want[: h.height, : h.width])
        assert np.array_equal(codec.decode_detailed(f.data, [tiny_model, m, sharp2])[2], faithful)  # default: faithful


def test_save_load_and_hash(sharp2, rungs, tmp_path):
    path = tmp_path / "s.safetensors"
    weights.save(sharp2, path)
    config, h = modelfile.summary(path)  # the standard-library reader agrees, and so does the spec's text
    assert isinstance(config, SecondLookConfig) and config == sharp2.config and h == sharp2.sha256
    from test_spec_vectors import _spec_hash

    assert _spec_hash(path) == sharp2.sha256
    back = weights.load(path)
    assert isinstance(back, look.SecondLookModel) and back.sha256 == sharp2.sha256
    assert all(back.fits(m) for m in rungs)
    assert not any(k.startswith(tuple(f"residual.{e}" for e in ResidualCoder.ENCODER)) for k in back.tensors)
    assert not any(k.startswith("bits.") for k in back.tensors)
    assert config.to_dict()["bases"] == [{"name": "tiny-ra", "hash": rungs[0].sha256[:16].hex()},
                                         {"name": "tiny-rb", "hash": rungs[1].sha256[:16].hex()}]


def test_looks_of_other_models_bad_configs_and_bad_files_are_refused(tiny_model, rungs, sharp2, files):
    other = tiny_second(tiny_model, seed=1, name="tiny-rc")
    with pytest.raises(ModelError, match="share one coder"):
        look.build_second([rungs[0], other], "sharp", "x", noisy_decoder(rungs[0]))
    f = codec.encode_array(files[0], other, effort=1, models=[tiny_model])
    with pytest.raises(ModelNotFoundError, match="no sharp look"):
        codec.decode_detailed(f.data, [tiny_model, other, sharp2], look="sharp")
    with pytest.raises(ModelNotFoundError, match="no sharp look"):  # before any token is decoded
        codec.decode_detailed(files[1][0].data, [tiny_model, rungs[0]], look="sharp")
    t = dict(sharp2.tensors)
    t["residual.enc_in.bias"] = torch.zeros(RCFG.channels, dtype=torch.float16)  # an encoder tensor: a look holds none
    with pytest.raises(ModelError):
        look.from_tensors(sharp2.config, t)
    with pytest.raises(ModelError):
        look.from_tensors(sharp2.config, {k: v for k, v in sharp2.tensors.items() if "from_code" not in k})
    good = sharp2.config.to_dict()
    for bad in ({"bases": []}, {"bases": [{"name": "a", "hash": "AB" * 16}]}, {"look": "blurry"},
                {"bases": [{"name": "a", "hash": "ab" * 16}] * 2}, {"bases": "ab"}):
        with pytest.raises((ValueError, KeyError, TypeError)):
            SecondLookConfig.from_dict({**good, **bad})


def _train(data, out, model_file, **kw):
    from bsqcodec.train.residual import ResidualOptions, train_residual

    train_residual(ResidualOptions(data=str(data), out=str(out), base=str(model_file), config=RCFG, batch=2, crop=16,
                                   cache_crop=32, per_image=2, warmup=1, eval_every=5, nested=(2, 6),
                                   checkpoint_seconds=1e9, **kw))


def test_a_decoder_only_run_exports_to_a_look_that_the_command_line_decodes(tiny_model, model_file, rungs, tmp_path,
                                                                            monkeypatch):
    from typer.testing import CliRunner

    from bsqcodec.cli.cli import app
    models = tmp_path / "models"
    models.mkdir()
    for m in (tiny_model, *rungs):
        weights.save(m, models / f"{m.name}.safetensors")
    (models / "retired.json").write_text('{"models": {}}')
    (tmp_path / "data").mkdir()
    data = image_folder(tmp_path / "data", [(40, 32), (48, 40)], 1)
    _train(data, tmp_path / "run", model_file, steps=2, init=str(models / "tiny-ra.safetensors"), decoder_only=True)
    run = lambda *a: CliRunner().invoke(app, [str(x) for x in a])  # noqa: E731
    out = models / "tiny-r-sharp.safetensors"
    bases = ["--base", models / "tiny-ra.safetensors", "--base", models / "tiny-rb.safetensors"]
    r = run("train", "export-look", "--run", tmp_path / "run", *bases, "-o", out, "--name", "tiny-r-sharp")
    assert r.exit_code == 0, r.output
    assert "sharp look of tiny-ra, tiny-rb" in r.stdout
    exported = weights.load(out)
    assert isinstance(exported, look.SecondLookModel) and all(exported.fits(m) for m in rungs)
    # a run from another coder's weights is refused: its codes are not these models'
    _train(data, tmp_path / "run2", model_file, steps=1)
    r = run("train", "export-look", "--run", tmp_path / "run2", *bases, "-o", tmp_path / "x.safetensors", "--name", "x")
    assert r.exit_code == 1 and "decoder-only" in r.output and not (tmp_path / "x.safetensors").exists()
    weights.save(tiny_second(tiny_model, seed=1, name="tiny-rc"), tmp_path / "rc.safetensors")  # another coder
    _train(data, tmp_path / "run3", model_file, steps=1, init=str(tmp_path / "rc.safetensors"), decoder_only=True)
    r = run("train", "export-look", "--run", tmp_path / "run3", *bases, "-o", tmp_path / "x.safetensors", "--name", "x")
    assert r.exit_code == 1 and "encoder is not" in r.output and not (tmp_path / "x.safetensors").exists()

    monkeypatch.setattr(weights, "MODELS_DIR", models)
    monkeypatch.setattr(modelfile, "MODELS_DIR", models)
    img = tmp_path / "a.png"
    Image.fromarray(np.asarray(smooth_image(np.random.default_rng(8), 30, 21))).save(img)
    assert run("encode", img, "--preset", "tiny-rb", "--effort", "1", "--quiet").exit_code == 0
    r = run("decode", tmp_path / "a.bsq", "-o", tmp_path / "s.png", "--look", "sharp", "--quiet")
    assert r.exit_code == 0, r.output
    want = codec.decode_detailed((tmp_path / "a.bsq").read_bytes(), look="sharp")[2]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "s.png")), want)
    assert not np.array_equal(want, codec.decode_detailed((tmp_path / "a.bsq").read_bytes())[2])
    r = run("presets", "--json")
    rows = {row["preset"]: row for row in json.loads(r.stdout)["presets"]}
    assert rows["tiny-r-sharp"]["look_of"] == "tiny-ra, tiny-rb" and rows["tiny-r-sharp"]["look"] == "sharp"
    with pytest.raises(BsqError, match="no sharp look"):
        codec.decode_detailed(codec.encode_array(np.asarray(Image.open(img)), tiny_model, effort=1).data, look="sharp")


def test_bench_scores_a_second_stages_look_and_keeps_its_faithful_scores(tiny_model, rungs, sharp2, tmp_path):
    from bsqcodec.bench import baselines, bench
    from bsqcodec.metrics import psnr

    (tmp_path / "imgs").mkdir()
    folder = image_folder(tmp_path / "imgs", [(37, 26)], 2)
    from test_look import tiny_sharp

    models = [tiny_model, rungs[0], tiny_sharp(tiny_model), sharp2]  # each rung's look
    res = bench.run(folder, models, codecs=(baselines.JPEG,), sweep=False, effort=1, look="sharp")
    assert list(res["totals"]) == ["tiny", "tiny-ra"]  # the rungs; a look only decodes
    row = res["per_image"][0]["bsqc"]["tiny-ra"]
    arr = np.asarray(Image.open(next(folder.glob("*.png"))).convert("RGB"))
    data = codec.encode_array(arr, rungs[0], effort=1, models=[tiny_model]).data
    assert row["psnr"] == psnr(arr, codec.decode_detailed(data, [tiny_model, rungs[0], sharp2], look="sharp")[2])
    assert row["faithful"]["psnr"] == psnr(arr, codec.decode_detailed(data, [tiny_model, rungs[0]])[2])
    assert row["psnr"] != row["faithful"]["psnr"]
