"""Conformance: the files in formats/vectors/ must decode to their recorded tokens, forever.

Regenerate them only on purpose, for a new format version: BSQ_REGENERATE_VECTORS=1 pytest tests/test_vectors.py
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bsqcodec import codec, container, weights

VEC = Path(__file__).resolve().parent.parent / "formats" / "vectors"
CASES = {"v1-1x1": (1, 1, None), "v1-37x23-icc": (37, 23, b"not a real ICC profile"), "v1-70x100": (70, 100, None)}
REGEN = os.environ.get("BSQ_REGENERATE_VECTORS") == "1"


def _image(w: int, h: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([(xx * 255 // max(1, w - 1)), (yy * 255 // max(1, h - 1)), (xx + yy) % 256], -1).astype(np.uint8)


def _regenerate():
    from conftest import TINY

    VEC.mkdir(parents=True, exist_ok=True)
    model = weights.random_model(TINY, seed=2024)
    weights.save(model, VEC / "tiny-model.safetensors")
    for name, (w, h, icc) in CASES.items():
        enc = codec.encode_array(_image(w, h), model, icc)
        (VEC / f"{name}.bsq").write_bytes(enc.data)
        (VEC / f"{name}.tokens.json").write_text(json.dumps({"grid": list(enc.tokens.shape), "tokens": enc.tokens.reshape(-1).tolist()}) + "\n")


@pytest.fixture(scope="module")
def vector_model():
    if REGEN:
        _regenerate()
    path = VEC / "tiny-model.safetensors"
    if not path.exists():
        pytest.fail(f"missing conformance model {path}")
    return weights.load(path)


@pytest.mark.parametrize("name", sorted(CASES))
def test_vector_decodes_to_recorded_tokens(vector_model, name):
    bsq, toks = VEC / f"{name}.bsq", VEC / f"{name}.tokens.json"
    if not (bsq.exists() and toks.exists()):
        pytest.fail(f"missing conformance vector {name}")
    data = bsq.read_bytes()
    expected = json.loads(toks.read_text())
    want = torch.tensor(expected["tokens"]).reshape(expected["grid"])
    for bt in (1, 4):
        header, tokens, arr = codec.decode_detailed(data, [vector_model], batch_tiles=bt)
        assert torch.equal(tokens, want)
    w, h, icc = CASES[name]
    assert (header.width, header.height) == (w, h) and arr.shape == (h, w, 3)
    assert header.chunk(b"iCCP") == icc
    # the encoder still produces the very same bytes from the same tokens
    streams, _ = codec.encode_tokens(vector_model, header, want)
    assert container.pack(header, streams) == data


def test_vector_model_hash_is_stable(vector_model):
    h, _ = container.unpack((VEC / "v1-1x1.bsq").read_bytes())
    assert h.model_hash == vector_model.sha256
