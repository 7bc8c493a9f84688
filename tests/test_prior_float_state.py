"""A model file's integer prior read back as a float prior (intprior.float_state): what `bsqc train prior
--init MODEL.safetensors` starts from, so that a run continues from shipped weights."""

import dataclasses

import numpy as np
import pytest
import torch

from bsqcodec.codec import codec
from bsqcodec.model import intprior, weights
from bsqcodec.model.prior import Prior
from bsqcodec.train import train

from conftest import smooth_image


def _tiles(model, rng_seed):
    arr = np.asarray(smooth_image(np.random.default_rng(rng_seed), 128, 128))
    tok = codec.image_to_tokens(model, arr)
    p = model.config.prior
    r, c = tok.shape[0] // p.tile_rows, tok.shape[1] // p.tile_cols
    return tok[: r * p.tile_rows, : c * p.tile_cols].reshape(r, p.tile_rows, c, p.tile_cols).permute(0, 2, 1, 3).reshape(
        -1, p.tile_rows, p.tile_cols)


@pytest.mark.parametrize("name", ["tiny", "q2"])
def test_the_float_prior_codes_as_the_integer_prior_does(tiny_model, name):
    model = tiny_model if name == "tiny" else weights.preset(name)
    prior = Prior(model.config.prior)
    prior.load_state_dict(intprior.float_state(model.config.prior, model.prior_tensors()))
    prior.eval()
    tiles = _tiles(model, 3)
    B, r, c = tiles.shape
    header = codec.make_header(model, c * model.config.tokenizer.patch, B * r * model.config.tokenizer.patch)
    exact = codec.encode_tokens(model, header, tiles.reshape(B * r, c))[1]
    assert abs(prior.bits(tiles) / exact - 1) < 0.002


def test_the_gelu_unit_is_recovered_from_its_table():
    for st in (0.0007, 0.004, 0.013):
        assert abs(intprior._gelu_scale(intprior.gelu_table(st)) / st - 1) < 2e-3


def test_init_from_a_model_file_starts_a_prior_with_fewer_layers_from_its_first_ones(model_file, tiny_model):
    cfg = tiny_model.config.prior
    fewer = Prior(dataclasses.replace(cfg, layers=max(1, cfg.layers - 1)))
    train._init_from(fewer, "prior", str(model_file))
    want = intprior.float_state(cfg, tiny_model.prior_tensors())
    got = fewer.state_dict()
    for k, v in got.items():
        assert torch.equal(v, want[k]), k
    assert any(k not in got for k in want)  # the dropped layer's
