"""Structured fuzzing in the suite: mutations that keep every checksum valid (tests/mutate.py).

The same mutations run 100,000+ times in benchmarks/fuzz.py; here hypothesis draws a few hundred.
"""

import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bsqcodec.codec import codec
from bsqcodec.format import container
from bsqcodec.model import weights
from bsqcodec.errors import ModelError

from conftest import repack_1_2, smooth_image
from mutate import KINDS, MODEL_KINDS, classify, mutate, mutate_model


@pytest.fixture(scope="module")
def files(tiny_model):
    rng = np.random.default_rng(4)
    out = []
    for w, h, icc in ((1, 1, None), (16, 12, b"icc"), (45, 33, None)):
        enc = codec.encode_array(np.asarray(smooth_image(rng, w, h)), tiny_model, icc)
        out.append((enc.data, enc.tokens))
    out.append((repack_1_2(out[-1][0], tiny_model), out[-1][1]))  # and the last one as a version 1.2 file
    return out


@settings(max_examples=200)
@given(st.integers(0, 2**32 - 1), st.sampled_from(KINDS), st.integers(0, 3))
def test_mutated_files_are_rejected_or_harmless(tiny_model, files, seed, kind, which):
    data, tokens = files[which]
    mutated, _ = mutate(data, np.random.default_rng(seed), kind, foreign=files[(which + 1) % 4][0])
    t0 = time.perf_counter()
    outcome, detail = classify(data, tokens, mutated, lambda d: codec.decode_detailed(d, [tiny_model]))
    assert outcome in ("rejected", "accepted_same", "accepted_header_variant"), (outcome, detail)
    assert time.perf_counter() - t0 < 10


def test_mutations_keep_checksums_valid(files):
    """The mutator's own check: unmutated parts reassemble to the very same bytes."""
    from mutate import assemble, split

    for data, _ in files:
        assert assemble(split(data)) == data
        container.unpack(data)


@settings(max_examples=60)
@given(st.integers(0, 2**32 - 1), st.sampled_from(MODEL_KINDS))
def test_mutated_model_files_load_or_fail_with_one_error(tiny_model, tmp_path_factory, seed, kind):
    import json

    from safetensors.torch import save_file

    cfg, tensors, meta, _ = mutate_model(tiny_model.config.to_dict(), tiny_model.tensors, np.random.default_rng(seed), kind)
    p = tmp_path_factory.mktemp("m") / "m.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(p),
              metadata={"format": weights.FORMAT, "config": json.dumps(cfg), **meta})
    try:
        m = weights.load(p)
    except ModelError:
        return
    # accepted: then it is a model that works
    enc = codec.encode_array(np.zeros((8, 8, 3), np.uint8), m)  # the default effort: the search runs too
    assert torch.equal(codec.decode_detailed(enc.data, [m])[1], enc.tokens)
