"""Conformance of format 2.1 (a second token stage): the files in formats/vectors/v21-* must decode, forever,
to their recorded first-stage tokens and second-stage tokens (each its bit count times 2^32 plus its kept
bits), with the conformance models tiny-model.safetensors and tiny-second.safetensors (the checker context)
or tiny-second-quad.safetensors (the quad3x3 context, v21-quad-*).

They were written once: BSQ_REGENERATE_VECTORS=2.1 pytest tests/test_vectors_21.py (the checker ones), and
BSQ_REGENERATE_VECTORS=2.1-quad (the quad3x3 ones).
"""

import json
import os
import pytest
import torch

from bsqcodec.codec import codec, stage2, twostage
from bsqcodec.format import container
from bsqcodec.model import weights

from test_vectors import VEC, _image

CASES = {"v21-70x150": (70, 150, None), "v21-9x5-icc": (9, 5, b"not a real ICC profile"), "v21-nothing-24x20": (24, 20, 1e12)}
QUAD = {"v21-quad-70x150": (70, 150, None), "v21-quad-13x7": (13, 7, None)}
MODEL = {**{n: "tiny-second" for n in CASES}, **{n: "tiny-second-quad" for n in QUAD}}
REGEN = os.environ.get("BSQ_REGENERATE_VECTORS")


def _second_tokens(bits01: torch.Tensor, budget: torch.Tensor) -> list[int]:
    return stage2.second_tokens(bits01, budget).reshape(-1).tolist()


def _regenerate(base, quad: bool):
    from test_second import tiny_second

    name = "tiny-second-quad" if quad else "tiny-second"
    smodel = tiny_second(base, seed=2026 if quad else 2025, name=name, kind="quad3x3" if quad else "checker")
    weights.save(smodel, VEC / f"{name}.safetensors")
    for name, (w, h, extra) in (QUAD if quad else CASES).items():
        icc = extra if isinstance(extra, bytes) else None
        lam = extra if isinstance(extra, float) else None
        enc = codec.encode_array(_image(w, h), smodel, icc, effort=1, lam=lam, models=[base])
        (VEC / f"{name}.bsq").write_bytes(enc.data)
        header, _ = container.unpack(enc.data)
        _, bits, budget = twostage.decode_tokens(header, base, enc.tokens.numpy(), [smodel])
        (VEC / f"{name}.tokens.json").write_text(json.dumps({
            "grid": list(enc.tokens.shape), "tokens": enc.tokens.reshape(-1).tolist(),
            "second_grid": list(budget.shape), "second_tokens": _second_tokens(bits, budget)}) + "\n")


@pytest.fixture(scope="module")
def all_models():
    base = weights.load(VEC / "tiny-model.safetensors")
    if REGEN in ("2.1", "2.1-quad"):
        _regenerate(base, REGEN == "2.1-quad")
    return {"tiny-model": base, **{n: weights.load(VEC / f"{n}.safetensors") for n in set(MODEL.values())}}


@pytest.mark.parametrize("name", sorted(MODEL))
def test_vector_decodes_to_recorded_tokens_of_both_stages(all_models, name):
    models = [all_models["tiny-model"], all_models[MODEL[name]]]
    data = (VEC / f"{name}.bsq").read_bytes()
    want = json.loads((VEC / f"{name}.tokens.json").read_text())
    header, tokens, arr = codec.decode_detailed(data, models)
    assert (header.major, header.minor) == (2, 1) and header.second is not None
    assert list(tokens.shape) == want["grid"] and tokens.reshape(-1).tolist() == want["tokens"]
    _, bits, budget = twostage.decode_tokens(header, models[0], tokens.numpy(), models)
    assert list(budget.shape) == want["second_grid"] and _second_tokens(bits, budget) == want["second_tokens"]
    w, h, _ = {**CASES, **QUAD}[name]
    assert arr.shape == (h, w, 3)
    # the cut: the first stage's file, whose tokens are the same
    cut = container.first_stage(data, "tiny")
    assert torch.equal(codec.decode_detailed(cut, models[:1])[1], tokens)


def test_the_quad_vectors_code_four_passes_a_band(all_models):
    for name in QUAD:
        header, _ = container.unpack((VEC / f"{name}.bsq").read_bytes())
        assert header.second.passes(header) == 4 and header.second.model_hash == all_models[MODEL[name]].sha256[:16]
    assert all_models["tiny-second-quad"].config.context == "quad3x3"


def test_the_nothing_vector_keeps_no_bits_and_has_empty_pass_streams(all_models):
    header, _ = container.unpack((VEC / "v21-nothing-24x20.bsq").read_bytes())
    assert header.second.streams[1:] == [b"", b""]


WRONG = ("rows_first_pass", "neighbours_all", "budget_fraction", "swapped_tables", "band_edges", "bands_128")
WRONG_QUAD = ("quad_passes_swapped", "quad_window_major", "quad_all_neighbours", "neighbours_all", "band_edges")


def _spec_inputs(name):
    data = (VEC / f"{name}.bsq").read_bytes()
    want = json.loads((VEC / f"{name}.tokens.json").read_text())
    header, _ = container.unpack(data)
    rows, cols = want["grid"]
    base = [want["tokens"][i * cols : (i + 1) * cols] for i in range(rows)]
    from safetensors.torch import load_file

    model = VEC / f"{MODEL[name]}.safetensors"
    t = {k: v.tolist() for k, v in load_file(str(model)).items() if k.startswith("bits.")}
    cfg = json.loads(json.dumps(weights.load(model).config.to_dict()))
    return header, base, t, cfg, want


@pytest.mark.parametrize("name", sorted(MODEL))
def test_a_decoder_written_from_the_spec_decodes_every_vector(name):
    import spec_ref_second

    header, base, t, cfg, want = _spec_inputs(name)
    got = spec_ref_second.decode(header, base, t, cfg)
    assert got is not None
    bits, k = got
    tokens = [k[y][x] * 2**32 + sum(b << (len(bits[0][0]) - 1 - i) for i, b in enumerate(bits[y][x][: k[y][x]]))
              for y in range(len(k)) for x in range(len(k[0]))]
    assert tokens == want["second_tokens"]


@pytest.mark.parametrize("wrong", WRONG)
def test_every_wrong_reading_of_the_second_stage_fails_a_vector(wrong):
    import spec_ref_second

    header, base, t, cfg, want = _spec_inputs("v21-70x150")
    assert spec_ref_second.decode(header, base, t, cfg, frozenset([wrong])) is None


@pytest.mark.parametrize("wrong", WRONG_QUAD)
def test_every_wrong_reading_of_the_quad_context_fails_a_quad_vector(wrong):
    import spec_ref_second

    header, base, t, cfg, want = _spec_inputs("v21-quad-70x150")
    assert spec_ref_second.decode(header, base, t, cfg, frozenset([wrong])) is None
