import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from bsqcodec.codec import codec
from bsqcodec.model import weights
from bsqcodec.errors import BsqError
from bsqcodec.cli.cli import app
from bsqcodec.train.train import TrainOptions, train

runner = CliRunner()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    from conftest import smooth_image

    rng = np.random.default_rng(0)
    for i in range(6):
        img = smooth_image(rng, 80 + 8 * i, 64)
        sub = root / ("a" if i % 2 else "b")
        sub.mkdir(exist_ok=True)
        img.save(sub / f"im{i}.{'png' if i % 3 else 'jpg'}")
    return root


@pytest.fixture(scope="module")
def arch(tmp_path_factory):
    from conftest import TINY

    p = tmp_path_factory.mktemp("arch") / "tiny.json"
    p.write_text(json.dumps(TINY.to_dict()))
    return p


def _opts(stage, dataset, out, arch, **kw):
    base = dict(stage=stage, data=str(dataset), out=str(out), arch=str(arch), steps=6, batch=4, crop=32,
                per_image=2, eval_every=3, warmup=2)
    base.update(kw)
    return TrainOptions(**base)


def test_train_export_encode_decode(dataset, arch, tmp_path):
    run = tmp_path / "run"
    args = ["--data", dataset, "--out", run, "--arch", arch, "--steps", "5", "--batch", "4", "--eval-every", "2"]
    r = runner.invoke(app, ["train", "tokenizer", *map(str, args), "--crop", "32"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["train", "prior", *map(str, args), "--tokenizer", str(run / "tokenizer.ckpt"), "--per-image", "2"])
    assert r.exit_code == 0, r.output
    model_path = tmp_path / "mine.safetensors"
    r = runner.invoke(app, ["train", "export", "--run", str(run), "--data", str(dataset), "-o", str(model_path), "--calib", "8"])
    assert r.exit_code == 0, r.output
    model = weights.load(model_path)
    arr = np.asarray(Image.open(next(dataset.rglob("*.png"))).convert("RGB"))
    enc = codec.encode_array(arr, model)
    _, tokens, out = codec.decode_detailed(enc.data, [model])
    assert torch.equal(tokens, enc.tokens) and out.shape == arr.shape


def test_resume_is_exact(dataset, arch, tmp_path):
    a = train(_opts("tokenizer", dataset, tmp_path / "a", arch, steps=6))
    train(_opts("tokenizer", dataset, tmp_path / "b", arch, steps=3))
    b = train(_opts("tokenizer", dataset, tmp_path / "b", arch, steps=6, resume=True))
    assert b["step"] == 6
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_ema_is_kept_resumed_exactly_and_exported(dataset, arch, tmp_path):
    a = train(_opts("tokenizer", dataset, tmp_path / "a", arch, steps=6, ema=0.9))
    train(_opts("tokenizer", dataset, tmp_path / "b", arch, steps=3, ema=0.9))
    b = train(_opts("tokenizer", dataset, tmp_path / "b", arch, steps=6, ema=0.9, resume=True))
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    st = weights.load_checkpoint(tmp_path / "a" / "tokenizer.ckpt")
    assert any(not torch.equal(st["ema"][k], st["model"][k]) for k in st["model"])  # really an average
    assert all(torch.equal(a["model"][k], st["ema"][k]) for k in a["model"])  # what a run returns and exports
    tok = weights.load_tokenizer_any(tmp_path / "a" / "tokenizer.ckpt")
    assert all(torch.equal(v, st["ema"][k]) for k, v in tok.state_dict().items())


def test_init_takes_the_averaged_weights(dataset, arch, tmp_path):
    from bsqcodec.config import ModelConfig
    from bsqcodec.model.tokenizer import Tokenizer
    from bsqcodec.train.train import _init_from

    train(_opts("tokenizer", dataset, tmp_path / "a", arch, steps=4, ema=0.9))
    st = weights.load_checkpoint(tmp_path / "a" / "tokenizer.ckpt")
    fresh = Tokenizer(ModelConfig.from_dict(st["config"]).tokenizer)
    _init_from(fresh, "tokenizer", str(tmp_path / "a" / "tokenizer.ckpt"))
    assert all(torch.equal(v, st["ema"][k]) for k, v in fresh.state_dict().items())
    assert any(not torch.equal(st["ema"][k], st["model"][k]) for k in st["model"])


def test_bf16_training_keeps_float32_weights(dataset, arch, tmp_path):
    r = train(_opts("tokenizer", dataset, tmp_path / "a", arch, steps=6, bf16=True))
    assert r["step"] == 6 and all(torch.isfinite(v).all() for v in r["model"].values())
    assert all(v.dtype == torch.float32 for v in r["model"].values() if v.is_floating_point())


def test_decoder_only_keeps_the_encoder_and_tokens(dataset, arch, tmp_path):
    from bsqcodec.model.tokenizer import Tokenizer

    base = train(_opts("tokenizer", dataset, tmp_path / "a", arch, steps=3))
    r = runner.invoke(app, ["train", "tokenizer", "--data", str(dataset), "--out", str(tmp_path / "b"), "--arch", str(arch),
                            "--steps", "4", "--batch", "4", "--crop", "32", "--init", str(tmp_path / "a" / "tokenizer.ckpt"),
                            "--decoder-only", "--ema", "0.9", "--lr", "0.01"])
    assert r.exit_code == 0, r.output
    tuned = weights.load_checkpoint(tmp_path / "b" / "tokenizer.ckpt")
    for part in ("model", "ema"):
        enc = [k for k in tuned[part] if k.startswith(Tokenizer.ENCODER)]
        dec = [k for k in tuned[part] if not k.startswith(Tokenizer.ENCODER) and tuned[part][k].is_floating_point()]
        assert enc and all(torch.equal(tuned[part][k], base["model"][k]) for k in enc), part
        assert any(not torch.equal(tuned[part][k], base["model"][k]) for k in dec), part
    a, b = weights.load_tokenizer_any(tmp_path / "a" / "tokenizer.ckpt"), weights.load_tokenizer_any(tmp_path / "b" / "tokenizer.ckpt")
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(a.quant(a.encode_latent(x)), b.quant(b.encode_latent(x)))
        assert not torch.equal(a.decode_code(a.quant(a.encode_latent(x))), b.decode_code(b.quant(b.encode_latent(x))))


def test_a_new_decoder_ships_with_the_old_tokens_and_prior(dataset, arch, tmp_path):
    """--decoder-only into a wider decoder (an up stage); export pairs it with the prior of the old tokens."""
    import dataclasses

    from conftest import TINY

    run = tmp_path / "run"
    train(_opts("tokenizer", dataset, run, arch, steps=3))
    train(_opts("prior", dataset, run, arch, steps=2, tokenizer_ckpt=str(run / "tokenizer.ckpt")))
    up = dataclasses.replace(TINY, tokenizer=dataclasses.replace(TINY.tokenizer, up_channels=8, up_blocks=1))
    (tmp_path / "up.json").write_text(json.dumps(up.to_dict()))
    train(_opts("tokenizer", dataset, tmp_path / "dec", tmp_path / "up.json", steps=3, decoder_only=True,
                init=str(run / "tokenizer.ckpt")))
    both = tmp_path / "both"
    both.mkdir()
    (both / "prior.ckpt").write_bytes((run / "prior.ckpt").read_bytes())
    (both / "tokenizer.ckpt").write_bytes((tmp_path / "dec" / "tokenizer.ckpt").read_bytes())
    r = runner.invoke(app, ["train", "export", "--run", str(both), "--data", str(dataset), "-o", str(tmp_path / "m.safetensors"),
                            "--calib", "8"])
    assert r.exit_code == 0, r.output
    m = weights.load(tmp_path / "m.safetensors")
    assert m.config.tokenizer == up.tokenizer and m.config.prior == TINY.prior
    old = weights.load_tokenizer_any(run / "tokenizer.ckpt")
    arr = np.asarray(Image.open(next(dataset.rglob("*.png"))).convert("RGB"))
    h, w = (s // 4 * 4 for s in arr.shape[:2])
    assert torch.equal(m.tokenizer.image_to_tokens(arr[:h, :w]), old.image_to_tokens(arr[:h, :w]))
    enc = codec.encode_array(arr, m)
    assert codec.decode_detailed(enc.data, [m])[2].shape == arr.shape


def test_decoder_only_is_for_the_tokenizer(dataset, arch, tmp_path):
    with pytest.raises(BsqError, match="decoder-only"):
        train(_opts("prior", dataset, tmp_path / "p", arch, decoder_only=True, tokenizer_ckpt="x"))


def test_seed_reproducible(dataset, arch, tmp_path):
    a = train(_opts("tokenizer", dataset, tmp_path / "a", arch, steps=3, seed=5))
    b = train(_opts("tokenizer", dataset, tmp_path / "b", arch, steps=3, seed=5))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_invalid_empty_data(tmp_path, arch):
    (tmp_path / "empty").mkdir()
    r = runner.invoke(app, ["train", "tokenizer", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "r"), "--arch", str(arch)])
    assert r.exit_code == 1 and "no .png or .jpg" in r.output


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes(dataset, arch, tmp_path):
    """The same training entry point under torchrun-style env vars, 2 processes, gloo on CPU."""
    code = (
        "import sys; from bsqcodec.train.train import TrainOptions, train;"
        f"train(TrainOptions(stage='tokenizer', data={str(dataset)!r}, out={str(tmp_path / 'ddp')!r},"
        f" arch={str(arch)!r}, steps=3, batch=2, crop=32, per_image=2, eval_every=100, warmup=1, threads=1))"
    )
    port = _free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()[-2000:]
    state = torch.load(tmp_path / "ddp" / "tokenizer.ckpt", weights_only=False)
    assert state["step"] == 3 and len(state["rng"]) == 2


def test_tokenizing_memory_mapped_crops_warns_nothing(tmp_path, tiny_model):
    """The crop cache is a read-only memory map; torch warns on tensors over non-writable arrays."""
    import warnings

    from bsqcodec.train.train import _tokenize_crops

    p = tmp_path / "crops.npy"
    np.save(p, np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8))
    arr = np.load(p, mmap_mode="r")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        toks = _tokenize_crops(tiny_model.tokenizer, arr, tiny_model.config, "cpu", None, str(p), "crops")
    patch = tiny_model.config.tokenizer.patch
    assert toks.shape == (3, 16 // patch, 16 // patch)


def test_adversarial_decoder_training_keeps_the_tokens_and_resumes_exactly(dataset, arch, tmp_path):
    """--adversarial (issue 26): a discriminator trains beside the decoder; the encoder stays as it was, and
    the discriminator's state is checkpointed with the rest, so a resumed run continues exactly."""
    from bsqcodec.model.tokenizer import Tokenizer

    base = train(_opts("tokenizer", dataset, tmp_path / "a", arch, steps=3))
    init = str(tmp_path / "a" / "tokenizer.ckpt")
    kw = dict(init=init, decoder_only=True, adversarial=0.1, feature_matching=1.0)
    whole = train(_opts("tokenizer", dataset, tmp_path / "b", arch, steps=4, **kw))
    train(_opts("tokenizer", dataset, tmp_path / "c", arch, steps=2, **kw))
    resumed = train(_opts("tokenizer", dataset, tmp_path / "c", arch, steps=4, resume=True, **kw))
    for k in whole["model"]:
        assert torch.equal(whole["model"][k], resumed["model"][k]), k
    ck = weights.load_checkpoint(tmp_path / "b" / "tokenizer.ckpt")
    assert ck["disc"] and ck["disc_opt"]
    for k in ck["model"]:
        if k.startswith(Tokenizer.ENCODER):
            assert torch.equal(ck["model"][k], base["model"][k]), k
    plain = train(_opts("tokenizer", dataset, tmp_path / "d", arch, steps=4, init=init, decoder_only=True))
    assert any(not torch.equal(plain["model"][k], whole["model"][k]) for k in plain["model"])  # the terms weigh in


def test_adversarial_needs_decoder_only(dataset, arch, tmp_path):
    with pytest.raises(BsqError, match="decoder-only"):
        train(_opts("tokenizer", dataset, tmp_path / "e", arch, steps=2, adversarial=0.1))


def test_perceptual_decoder_training_moves_the_decoder_only_and_logs_its_score(dataset, arch, tmp_path):
    """--perceptual (issue 26): SSIMULACRA2 as a loss beside squared error, for a decoder alone; the
    held-out evaluations then carry the decoder's SSIMULACRA2 as well as its PSNR."""
    from bsqcodec.model.tokenizer import Tokenizer

    base = train(_opts("tokenizer", dataset, tmp_path / "a", arch, steps=3))
    init = str(tmp_path / "a" / "tokenizer.ckpt")
    opts = _opts("tokenizer", dataset, tmp_path / "b", arch, steps=4, init=init, decoder_only=True, perceptual=0.05)
    res = train(opts)
    plain = train(_opts("tokenizer", dataset, tmp_path / "c", arch, steps=4, init=init, decoder_only=True))
    for k in res["model"]:
        if k.startswith(Tokenizer.ENCODER):
            assert torch.equal(res["model"][k], base["model"][k]), k
    assert any(not torch.equal(plain["model"][k], res["model"][k]) for k in plain["model"])  # the term weighs in
    evals = [e for e in opts.log if "eval" in e]
    assert evals and all(-200 < e["eval_ssimulacra2"] <= 100 for e in evals)
    with pytest.raises(BsqError, match="decoder-only"):
        train(_opts("tokenizer", dataset, tmp_path / "e", arch, steps=2, perceptual=0.1))


def test_discriminator_sees_the_tokens():
    from bsqcodec.train.discriminator import PatchDiscriminator

    torch.manual_seed(0)
    d = PatchDiscriminator(bits=12, width=8)
    x = torch.rand(1, 3, 32, 32)
    c1, c2 = torch.randn(1, 12, 8, 8), torch.randn(1, 12, 8, 8)
    l1, feats = d(x, c1)
    assert l1.shape == (1, 1, 4, 4) and len(feats) == 3
    assert not torch.equal(l1, d(x, c2)[0])


def test_a_decoder_only_run_exports_a_look_of_its_model(dataset, arch, tmp_path, model_file, tiny_model):
    """bsqc train export-look: the run's decoder, for the files of the model the run started from."""
    from bsqcodec.codec import codec
    from bsqcodec.model import look

    train(_opts("tokenizer", dataset, tmp_path / "s", arch, steps=2, init=str(model_file), decoder_only=True, lr=0.01))
    out = tmp_path / "sharp.safetensors"
    r = runner.invoke(app, ["train", "export-look", "--run", str(tmp_path / "s"), "--base", str(model_file),
                            "-o", str(out), "--name", "tiny-sharp"])
    assert r.exit_code == 0, r.output
    m = weights.load(out)
    assert isinstance(m, look.LookModel) and m.fits(tiny_model) and m.config.look == "sharp"
    enc = codec.encode_array(np.zeros((8, 12, 3), np.uint8), tiny_model, effort=1)
    _, tokens, px = codec.decode_detailed(enc.data, [tiny_model, m], look="sharp")
    assert np.array_equal(px, m.tokenizer.tokens_to_image(tokens)[:8, :12].numpy())
    r = runner.invoke(app, ["train", "export-look", "--run", str(tmp_path / "s"), "--base", str(model_file),
                            "-o", str(out), "--name", "tiny-sharp"])
    assert r.exit_code == 1  # exists: --force


def test_a_look_is_repointed_at_a_model_with_its_bases_tokenizer(dataset, arch, tmp_path, model_file, tiny_model):
    """export-look --from-look: a retrained prior (same tokenizer, new hash) keeps its look's decoder as it is;
    a model with another tokenizer is refused, since its files hold other tokens."""
    from bsqcodec.model import look

    train(_opts("tokenizer", dataset, tmp_path / "s", arch, steps=2, init=str(model_file), decoder_only=True, lr=0.01))
    sharp = tmp_path / "sharp.safetensors"
    assert runner.invoke(app, ["train", "export-look", "--run", str(tmp_path / "s"), "--base", str(model_file),
                               "-o", str(sharp), "--name", "tiny-sharp"]).exit_code == 0
    t = dict(tiny_model.tensors)
    t["prior.start"] = t["prior.start"] + 1  # another prior: another model, the same tokens
    new_prior = weights.from_tensors(tiny_model.config, t)
    weights.save(new_prior, tmp_path / "new.safetensors")
    out = tmp_path / "sharp2.safetensors"
    r = runner.invoke(app, ["train", "export-look", "--from-look", str(sharp), "--base", str(tmp_path / "new.safetensors"),
                            "-o", str(out)])
    assert r.exit_code == 1 and "give its file with --from-base" in r.output  # tiny is not installed
    r = runner.invoke(app, ["train", "export-look", "--from-look", str(sharp), "--base", str(tmp_path / "new.safetensors"),
                            "--from-base", str(model_file), "-o", str(out)])
    assert r.exit_code == 0, r.output
    old, m = weights.load(sharp), weights.load(out)
    assert isinstance(m, look.LookModel) and m.fits(new_prior) and not m.fits(tiny_model) and m.name == "tiny-sharp"
    assert m.tensors.keys() == old.tensors.keys() and all(torch.equal(m.tensors[k], old.tensors[k]) for k in m.tensors)
    t = dict(tiny_model.tensors)
    k = next(k for k in t if k.startswith("tokenizer.dec") and t[k].is_floating_point())
    t[k] = t[k] + 1  # another decoder: the faithful look of its files differs, so the tokenizer is not the same
    weights.save(weights.from_tensors(tiny_model.config, t), tmp_path / "other.safetensors")
    r = runner.invoke(app, ["train", "export-look", "--from-look", str(sharp), "--base", str(tmp_path / "other.safetensors"),
                            "--from-base", str(model_file), "-o", str(tmp_path / "x.safetensors")])
    assert r.exit_code == 1 and "tokenizer is not that of" in r.output
    r = runner.invoke(app, ["train", "export-look", "--base", str(model_file), "-o", str(tmp_path / "y.safetensors")])
    assert r.exit_code == 1 and "either --run or --from-look" in r.output
