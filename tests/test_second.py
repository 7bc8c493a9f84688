"""Second-stage model files (second.py): export, save, load, hash, and refusal of bad ones."""

import pytest
import torch

from bsqcodec.model import intbits, second, weights
from bsqcodec.format import modelfile
from bsqcodec.config import ResidualConfig, SecondConfig
from bsqcodec.errors import ModelError
from bsqcodec.model.residual import BitPrior, ResidualCoder

RCFG = ResidualConfig(patch=2, channels=8, bits=6, enc_blocks=1, dec_blocks=1)


def tiny_second(base, seed=0, name="tiny-r", kind="checker", bits=6, choices=(0, 2, 4, 6)) -> second.SecondModel:
    """A random second-stage model for `base` (the tiny model): patch 2 under its patch 4, bit prior context
    `kind`, `bits` bits per token."""
    RCFG = ResidualConfig(patch=2, channels=8, bits=bits, enc_blocks=1, dec_blocks=1)
    torch.manual_seed(seed)
    coder = ResidualCoder(RCFG)
    tok = base.config.tokenizer
    fp = BitPrior(tok.bits, tok.patch // RCFG.patch, RCFG.bits, width=16, kind=kind)
    with torch.no_grad():
        for p in list(coder.parameters()) + list(fp.parameters()):
            p.normal_(0, 0.2)
    ckpt = {"config": RCFG.to_dict(), "model": coder.state_dict(), "bit_prior": fp.state_dict()}
    if kind != "checker":
        ckpt["context"] = kind
    g = torch.Generator().manual_seed(seed)
    r = tok.patch // RCFG.patch
    calib = intbits.context(torch.randint(0, 2, (4, 4, tok.bits), generator=g),
                            torch.randint(0, 2, (4 * r, 4 * r, RCFG.bits), generator=g),
                            torch.randint(0, RCFG.bits + 1, (4 * r, 4 * r), generator=g), r, kind=kind)
    return second.export(ckpt, base, name, tuple(choices), 300, calib.reshape(-1, calib.shape[-1]))


@pytest.fixture(scope="module")
def tiny_r(tiny_model):
    return tiny_second(tiny_model)


def test_export_save_and_load_keep_the_model_and_its_hash(tiny_r, tiny_model, tmp_path):
    assert tiny_r.fits(tiny_model) and tiny_r.config.base == "tiny" and tiny_r.config.budget
    path = tmp_path / "tiny-r.safetensors"
    weights.save(tiny_r, path)
    config, h = modelfile.summary(path)  # the standard-library reader agrees
    assert isinstance(config, SecondConfig) and config == tiny_r.config and h == tiny_r.sha256
    back = weights.load(path)
    assert isinstance(back, second.SecondModel) and back.sha256 == tiny_r.sha256
    ctx = intbits.context(torch.randint(0, 2, (3, 3, 12)), torch.randint(0, 2, (6, 6, 6)), torch.full((6, 6), 4), 2)
    assert torch.equal(back.prior.tables(ctx), tiny_r.prior.tables(ctx))
    assert tiny_second(tiny_model, seed=1).sha256 != tiny_r.sha256


def test_the_config_is_checked():
    good = dict(name="x", base="tiny", base_hash="ab" * 16, residual=RCFG, prior_width=16, budget=True,
                choices=(0, 2, 6), lam=300)
    SecondConfig(**good)
    for bad in (dict(base_hash="AB" * 16), dict(base_hash="ab"), dict(choices=(0,)), dict(choices=(2, 0)),
                dict(choices=(0, 7)), dict(budget=1), dict(lam=-1), dict(choices=(0, True))):
        with pytest.raises(ValueError):
            SecondConfig(**{**good, **bad})
    assert SecondConfig.from_dict(SecondConfig(**good).to_dict()) == SecondConfig(**good)


def test_bad_tensors_are_refused(tiny_r):
    t = tiny_r.tensors
    cases = [
        {**t, "bits.fc2.w": t["bits.fc2.w"][:, :-1]},
        {**t, "bits.fc1.s": torch.tensor(1)},  # a shift that breaks the exactness bound
        {k: v for k, v in t.items() if k != "residual.from_code.weight"},
        {**t, "extra.x": torch.zeros(1)},
        {**t, "bits.out_exp_table": torch.zeros_like(t["bits.out_exp_table"])},
    ]
    for bad in cases:
        with pytest.raises(ModelError):
            second.from_tensors(tiny_r.config, bad)


def test_a_model_for_another_first_stage_does_not_fit(tiny_r, tiny_model):
    from bsqcodec.config import ModelConfig

    other = weights.random_model(ModelConfig.from_dict({**tiny_model.config.to_dict(), "name": "other"}), seed=3)
    assert not tiny_r.fits(other)
