"""Conformance: the files in formats/vectors/ must decode to their recorded tokens, forever.

They are never regenerated within a major version. The 2.0 files were written once, from the same
conformance model and images as the 1.x ones: BSQ_REGENERATE_VECTORS=2 pytest tests/test_vectors.py
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import bsqcodec
from bsqcodec.codec import codec
from bsqcodec.format import container, entropy
from bsqcodec.model import weights
from bsqcodec.config import LookConfig, SecondLookConfig

VEC = Path(__file__).resolve().parent.parent / "formats" / "vectors"
IMAGES = {"1x1": (1, 1, None), "37x23-icc": (37, 23, b"not a real ICC profile"), "70x100": (70, 100, None)}
MAJORS = (1, 2)
CASES = {f"v{major}-{name}": case for major in MAJORS for name, case in IMAGES.items()}
REGEN = os.environ.get("BSQ_REGENERATE_VECTORS")  # "2": write the 2.0 files (once, when 2.0 was defined)


def _image(w: int, h: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([(xx * 255 // max(1, w - 1)), (yy * 255 // max(1, h - 1)), (xx + yy) % 256], -1).astype(np.uint8)


def _regenerate(major: str):
    """The files of the version this encoder writes, from the conformance model (random, seed 2024, as
    written with the 1.0 files: weights.random_model(conftest.TINY, seed=2024))."""
    if major != str(container.MAJOR):
        raise RuntimeError(f"this encoder writes version {container.MAJOR}, not {major}")
    model = weights.load(VEC / "tiny-model.safetensors")
    for name, (w, h, icc) in IMAGES.items():
        name = f"v{major}-{name}"
        enc = codec.encode_array(_image(w, h), model, icc, effort=1)  # the tokens of the 1.0 files
        (VEC / f"{name}.bsq").write_bytes(enc.data)
        (VEC / f"{name}.tokens.json").write_text(json.dumps({"grid": list(enc.tokens.shape), "tokens": enc.tokens.reshape(-1).tolist()}) + "\n")


@pytest.fixture(scope="module")
def vector_model():
    if REGEN:
        _regenerate(REGEN)
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
    assert header.major == int(name[1]) and (header.width, header.height) == (w, h) and arr.shape == (h, w, 3)
    assert header.chunk(b"iCCP") == icc
    # the encoder still produces the very same bytes from the same tokens
    streams, _ = codec.encode_tokens(vector_model, header, want)
    assert container.pack(header, streams) == data


def test_vector_model_hash_is_stable(vector_model):
    h, _ = container.unpack((VEC / "v1-1x1.bsq").read_bytes())
    assert h.model_hash == vector_model.sha256
    h, _ = container.unpack((VEC / "v2-1x1.bsq").read_bytes())
    assert h.model_hash == vector_model.sha256[:16]


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_version_2_is_a_smaller_header_and_trimmed_streams(vector_model, name):
    """The 2.0 file of an image: the 1.0 file's tokens and chunks (and the token checksum chunk that 1.0
    files lack) under the smaller header, each stream its 1.0 words trimmed (entropy.trim)."""
    (h1, s1), (h2, s2) = (container.unpack((VEC / f"v{m}-{name}.bsq").read_bytes()) for m in MAJORS)
    assert (h1.major, h1.minor, h2.major, h2.minor) == (1, 0, 2, 0)
    assert h2.chunks == h1.chunks + [(container.TOKEN_CRC, h2.chunk(container.TOKEN_CRC))]
    n1, n2 = (container.header_size((VEC / f"v{m}-{name}.bsq").read_bytes()) for m in MAJORS)
    saved = 16 + 4 + sum(4 - len(container.varint(len(s))) for s in s2) + 1 + 3 * len(h1.chunks)
    assert n1 - n2 == saved - (4 + 1 + 4)
    tokens = codec.decode_detailed((VEC / f"v1-{name}.bsq").read_bytes(), [vector_model])[1]
    for batch, sym, tabs in codec.tile_tables(vector_model, h1, tokens):
        for b, i in enumerate(batch):
            symbols = sym[b].reshape(-1).numpy()
            tables = tabs[b].reshape(len(symbols), -1).numpy().astype(np.float64)
            assert entropy.trim(np.frombuffer(s1[i], "<u4"), symbols, tables) == s2[i]
            assert len(s2[i]) <= len(s1[i])


# ---- one vector per shipped preset: any change that alters how a shipped model decodes fails here ----
PRESET_VEC = VEC / "presets"
REGEN_PRESETS = os.environ.get("BSQ_REGENERATE_PRESET_VECTORS") == "1"  # only when a preset is added or retrained


def _preset_image() -> np.ndarray:
    """136x72 pixels: with 8x8 patches two tiles of a 16x16-token tiling, one of them an edge tile."""
    rng = np.random.default_rng(11)
    small = rng.integers(0, 256, (6, 10, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(small).resize((136, 72), Image.BICUBIC)).astype(int)
    return np.clip(smooth + _image(136, 72) // 4 - 32, 0, 255).astype(np.uint8)


def _installed_presets() -> list[str]:
    """The installed models that encode (look models only decode other models' files)."""
    return sorted(n for n, c in weights.installed_configs().items() if not isinstance(c, (LookConfig, SecondLookConfig)))


def _installed_looks() -> list[str]:
    return sorted(n for n, c in weights.installed_configs().items() if isinstance(c, (LookConfig, SecondLookConfig)))


@pytest.mark.parametrize("name", _installed_looks())
def test_every_installed_look_decodes_the_vectors_of_its_models(name):
    """The same tokens, other pixels of the same shape: a look of a second stage keeps the first stage's."""
    config = weights.installed_configs()[name]
    for base, _ in config.bases:
        data = (PRESET_VEC / f"{base}.bsq").read_bytes()
        header, tokens, faithful = codec.decode_detailed(data)
        _, tokens2, px = codec.decode_detailed(data, look=config.look)
        assert torch.equal(tokens, tokens2) and px.shape == faithful.shape and not np.array_equal(px, faithful)


def _second_tokens(data: bytes, tokens: torch.Tensor) -> dict:
    """A 2.1 file's second-stage tokens as its vector records them (test_vectors_21.py)."""
    from bsqcodec.codec import stage2, twostage

    header, _ = container.unpack(data)
    _, bits, budget = twostage.decode_tokens(header, weights.find(header.model_hash, header.preset), tokens.numpy())
    return {"second_grid": list(budget.shape), "second_tokens": stage2.second_tokens(bits, budget).reshape(-1).tolist()}


if REGEN_PRESETS:  # writes the vectors of presets that have none; existing vectors are never rewritten
    PRESET_VEC.mkdir(parents=True, exist_ok=True)
    for _name in _installed_presets():
        if (PRESET_VEC / f"{_name}.bsq").exists():
            continue
        _enc = codec.encode_array(_preset_image(), weights.preset(_name), effort=1)  # the coders' own tokens
        (PRESET_VEC / f"{_name}.bsq").write_bytes(_enc.data)
        _rec = {"grid": list(_enc.tokens.shape), "tokens": _enc.tokens.reshape(-1).tolist()}
        if _enc.header.second is not None:
            _rec.update(_second_tokens(_enc.data, _enc.tokens))
        (PRESET_VEC / f"{_name}.tokens.json").write_text(json.dumps(_rec) + "\n")


def test_every_shipped_preset_has_a_vector_and_every_vector_a_preset():
    have = sorted(p.name[: -len(".bsq")] for p in PRESET_VEC.glob("*.bsq"))
    assert have == _installed_presets()


def test_retired_models_are_not_installed_and_name_an_earlier_release():
    installed = {h.hex() for _, h in weights.installed().values()}
    retired = weights.retired()
    assert retired and not installed & set(retired)
    now = tuple(int(x) for x in bsqcodec.__version__.split("."))
    for entry in retired.values():
        assert entry["name"] and tuple(int(x) for x in entry["release"].split(".")) < now


@pytest.mark.parametrize("name", _installed_presets())
def test_preset_vector_decodes_to_recorded_tokens_and_bytes(name):
    data = (PRESET_VEC / f"{name}.bsq").read_bytes()
    expected = json.loads((PRESET_VEC / f"{name}.tokens.json").read_text())
    want = torch.tensor(expected["tokens"]).reshape(expected["grid"])
    header, tokens, arr = codec.decode_detailed(data)  # the installed model, found by its hash
    assert header.preset == name and torch.equal(tokens, want) and arr.shape == (72, 136, 3)
    model = weights.find(header.model_hash, header.preset)  # of a second-stage rung: its first stage
    if header.second is not None:  # its second stage's tokens too
        assert {k: expected[k] for k in ("second_grid", "second_tokens")} == _second_tokens(data, tokens)
    streams, _ = codec.encode_tokens(model, header, want)
    assert container.pack(header, streams) == data


@pytest.mark.parametrize("path", ["int8", "float32", "float64"])
def test_every_path_of_the_prior_products_decodes_the_vectors(path, monkeypatch):
    """The conformance vectors decode to their tokens whichever exact path the prior's products take
    (intprior.product_path: int8 where the CPU has int8 dot products, float32 digits, float64)."""
    from bsqcodec.model import intprior

    monkeypatch.setenv(intprior.PRODUCTS_ENV, path)
    cases = [(VEC / "v2-70x100.bsq", VEC / "tiny-model.safetensors"),
             (PRESET_VEC / "default.bsq", Path(weights.installed()["default"][0]))]
    for bsq, model_path in cases:
        model = weights.load(model_path)  # a fresh load: its layers take the forced path
        assert {lin.path for L in model.prior.layers for lin in (L["qkv"], L["fc2"])} == {path}
        expected = json.loads(bsq.with_suffix(".tokens.json").read_text())
        tokens = codec.decode_detailed(bsq.read_bytes(), [model])[1]
        assert tokens.reshape(-1).tolist() == expected["tokens"]
        header, streams = container.unpack(bsq.read_bytes())
        assert codec.encode_tokens(model, header, tokens)[0] == streams  # teacher forcing by the same path
