"""The float prior read back from the integer one (Model.float_prior): the search's rate estimates, never
a file's tables."""

import numpy as np
import pytest
import torch

from bsqcodec.codec import codec, search
from bsqcodec.model import weights

from conftest import smooth_image


def _costs(model, arr, approx):
    tokens = codec.image_to_tokens(model, arr)
    header = codec.make_header(model, arr.shape[1], arr.shape[0])
    return codec.rate_costs(model, header, tokens, approx=approx)


@pytest.mark.parametrize("name", ["tiny", "default", "q5"])
def test_the_float_prior_gives_the_exact_priors_bit_costs_to_a_tenth_of_a_bit(tiny_model, name):
    model = tiny_model if name == "tiny" else weights.preset(name)
    arr = np.asarray(smooth_image(np.random.default_rng(5), 96, 80))
    exact, approx = _costs(model, arr, False), _costs(model, arr, True)
    diff = torch.maximum((exact[0] - approx[0]).abs(), (exact[1] - approx[1]).abs())
    assert float(diff.max()) < 0.15
    assert float(diff.mean()) < 0.01
    if name != "tiny":  # a trained prior is sure of some bits: they cost far more one way than the other
        assert float((exact[0] - exact[1]).abs().max()) > 2


def test_the_float_priors_tables_are_distributions_of_every_group(tiny_model):
    sym = torch.randint(0, tiny_model.prior.n, (3, 12, tiny_model.config.prior.groups))
    exact = tiny_model.prior.tables(sym, 3, 4)
    twin = tiny_model.float_prior()
    assert tiny_model.float_prior() is twin  # made once per model
    for e, a in zip(exact, twin.tables(sym, 3, 4)):
        assert a.shape == e.shape
        assert torch.allclose(a.sum(-1), torch.ones(a.shape[:-1]))
        assert float((a - e.double() / e.double().sum(-1, keepdim=True)).abs().max()) < 0.02


def test_the_search_uses_the_float_prior_and_its_file_is_coded_by_the_exact_prior(tiny_model, monkeypatch):
    arr = np.asarray(smooth_image(np.random.default_rng(6), 45, 27))
    seen = []
    real = codec.rate_costs
    monkeypatch.setattr(codec, "rate_costs", lambda *a, **k: seen.append(k.get("approx")) or real(*a, **k))
    enc = codec.encode_array(arr, tiny_model, effort=search.DEFAULT_EFFORT)
    assert seen == [True]
    header, tokens, _ = codec.decode_detailed(enc.data, [tiny_model])
    assert torch.equal(tokens, enc.tokens)
    assert codec.encode_tokens(tiny_model, header, tokens)[0] == codec.encode_tokens(tiny_model, header, enc.tokens)[0]
