"""The conformance vectors cover the spec's blind spots: a decoder that follows any one wrong reading of
formats/bsq.md or formats/intprior.md fails at least one of them.

The coder's readings are switched in tests/spec_ref.py (a coder written from the spec's text); the prior's
by changing one rule of bsqcodec's own arithmetic; the model hash's by serialising the config otherwise.
The crafted vectors (v1-/v2-crafted-48x24: the conformance model, a token grid chosen tile by tile) were
written once by BSQ_REGENERATE_SPEC_VECTORS=1 pytest tests/test_spec_vectors.py, as were the 2.0
vectors of the presets (presets/v2/).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import spec_ref
from bsqcodec.codec import codec
from bsqcodec.format import container
from bsqcodec.model import intprior, weights
from bsqcodec.model.tokenizer import join_groups

from conftest import as_version_1_2, empty_streams_file

VEC = Path(__file__).resolve().parent.parent / "formats" / "vectors"
CRAFTED = {1: VEC / "v1-crafted-48x24.bsq", 2: VEC / "v2-crafted-48x24.bsq"}
# the conformance model with every output table uniform at 7,977 (its stored out_exp_table is that constant):
# the binary64 cum(i) of such a table differs from the exact rational floor for many i
UNIFORM_MODEL, UNIFORM = VEC / "uniform-model.safetensors", VEC / "v2-uniform-40x16.bsq"
UNIFORM_VALUE = 7977
PRESET_V2 = VEC / "presets" / "v2"
REGEN = os.environ.get("BSQ_REGENERATE_SPEC_VECTORS") == "1"


# ---- writing the vectors (once) ----------------------------------------------------------------------

def _tile_tables(ip, sym: np.ndarray, r: int, c: int) -> list[list[int]]:
    """The tables of every symbol of a tile of these symbols (T, G), in coding order."""
    tabs = torch.stack(ip.tables(torch.as_tensor(sym)[None], r, c), 2)[0]
    return [tabs[t, k].tolist() for t in range(len(sym)) for k in range(sym.shape[1])]


def _keep_pending(ip, r: int, c: int, G: int, rng) -> np.ndarray:
    """A tile's symbols chosen one by one to keep the coder's words pending as long as they can, until a
    carry resolves two or more of them, and then pending again to the end."""
    sym = np.zeros((r * c, G), np.int64)
    for t in range(r * c):
        for k in range(G):
            tabs = _tile_tables(ip, sym[: t + 1], r, c)[: t * G + k + 1]
            flat = sym[: t + 1].reshape(-1)[: t * G + k].tolist()
            scores = []
            for i in range(len(tabs[-1])):
                st = spec_ref.Stats()
                spec_ref.words_of(flat + [i], tabs, stats=st)
                scores.append((st.carried_multi, st.pending_now))  # a carry into several words, then pending again
            best = [i for i, s in enumerate(scores) if s == max(scores)]
            sym[t, k] = rng.choice(best)
    return sym


def _regenerate() -> None:
    model = weights.load(VEC / "tiny-model.safetensors")
    cfg = model.config.prior
    w, h = 48, 24  # 12 x 6 tokens: tiles of 4x5, 4x5, 4x2, 2x5, 2x5, 2x2
    zero = codec.decode_detailed(empty_streams_file(model, w, h), [model])[1]  # what empty streams decode to
    header = codec.make_header(model, w, h)
    slices = codec.tile_slices(header)
    rs, cs = slices[1]
    crafted = _keep_pending(model.prior, rs.stop - rs.start, cs.stop - cs.start, cfg.groups, np.random.default_rng(0))
    for seed in range(1000):
        rng = np.random.default_rng(seed)
        tokens = torch.from_numpy(rng.integers(0, 2**cfg.bits, zero.shape))
        tokens[slices[0]] = zero[slices[0]]  # tile 0: an empty 2.0 stream
        tokens[slices[1]] = join_groups(torch.from_numpy(crafted), cfg.bits).reshape(rs.stop - rs.start, -1)
        h1 = as_version_1_2(codec.make_header(model, w, h, tokens=tokens), model)
        streams = codec.encode_tokens(model, h1, tokens)[0]
        if any(_coverage(model, h1, tokens, streams)["extra_word"]):
            break
    enc2 = codec.encode_grid(model, tokens, w, h)
    CRAFTED[1].write_bytes(container.pack(h1, streams))
    CRAFTED[2].write_bytes(enc2.data)
    for major in CRAFTED:
        CRAFTED[major].with_suffix(".tokens.json").write_text(
            json.dumps({"grid": list(tokens.shape), "tokens": tokens.reshape(-1).tolist(), "seed": seed}) + "\n")
    t = dict(model.tensors)
    t["prior.out_exp_table"] = torch.full_like(t["prior.out_exp_table"], UNIFORM_VALUE)
    import dataclasses

    uniform = weights.from_tensors(dataclasses.replace(model.config, name="uniform"), t)
    weights.save(uniform, UNIFORM_MODEL)
    tokens = torch.from_numpy(np.random.default_rng(7).integers(0, 2**cfg.bits, (4, 10)))
    UNIFORM.write_bytes(codec.encode_grid(uniform, tokens, 40, 16).data)
    UNIFORM.with_suffix(".tokens.json").write_text(json.dumps({"grid": [4, 10], "tokens": tokens.reshape(-1).tolist()}) + "\n")
    PRESET_V2.mkdir(parents=True, exist_ok=True)
    for name in _first_stage_presets():
        old = (VEC / "presets" / f"{name}.bsq").read_bytes()
        m = weights.preset(name)
        hdr, toks, _ = codec.decode_detailed(old, [m])
        enc = codec.encode_grid(m, toks, hdr.width, hdr.height)
        (PRESET_V2 / f"{name}.bsq").write_bytes(enc.data)
        (PRESET_V2 / f"{name}.tokens.json").write_bytes((VEC / "presets" / f"{name}.tokens.json").read_bytes())


def _coverage(model, header, tokens, streams) -> dict[str, list]:
    """Per tile: the blind spots its stream exercises."""
    out = {"max_pending": [], "pending_at_end": [], "extra_word": [], "empty": [], "carried_multi": []}
    for i, (sym, tabs) in enumerate(_tables_by_tile(model, header, tokens)):
        st = spec_ref.Stats()
        spec_ref.words_of(sym, tabs, stats=st)
        out["max_pending"].append(st.max_pending)
        out["pending_at_end"].append(st.pending_at_end)
        out["carried_multi"].append(st.carried_multi)
        out["extra_word"].append(st.extra_word and header.major == 1)
        out["empty"].append(len(streams[i]) == 0)
    return out


# ---- reading them ------------------------------------------------------------------------------------

def _tables_by_tile(model, header, tokens) -> list[tuple[list[int], list[list[int]]]]:
    """(symbols, tables) of every tile in coding order, the tables as bsqcodec's prior computes them."""
    out: dict[int, tuple] = {}
    for batch, sym, tabs in codec.tile_tables(model, header, tokens):
        for b, i in enumerate(batch):
            G = sym.shape[-1]
            s = sym[b].reshape(-1).tolist()
            t = tabs[b].reshape(len(s), -1).long().tolist()
            out[i] = (s, t)
    return [out[i] for i in range(len(out))]


def _vector(path: Path, model=None):
    data = path.read_bytes()
    rec = json.loads(path.with_suffix(".tokens.json").read_text())
    tokens = torch.tensor(rec["tokens"]).reshape(rec["grid"])
    header, streams = container.unpack(data)
    model = model or weights.find(header.model_hash, header.preset)
    return model, header, streams, tokens


def _all_vectors():
    tiny, uniform = weights.load(VEC / "tiny-model.safetensors"), weights.load(UNIFORM_MODEL)
    out = [(p.name, uniform if "uniform" in p.name else tiny) for p in sorted(VEC.glob("v*.bsq"))]
    out += [(f"presets/{p.name}", None) for p in sorted((VEC / "presets").glob("*.bsq"))]
    out += [(f"presets/v2/{p.name}", None) for p in sorted(PRESET_V2.glob("*.bsq"))]
    return out


@pytest.fixture(scope="module")
def coded():
    """Every vector as (name, major, [(stream, symbols, tables) per tile])."""
    out = []
    for name, model in _all_vectors():
        m, header, streams, tokens = _vector(VEC / name, model)
        tiles = [(s, sym, tabs) for s, (sym, tabs) in zip(streams, _tables_by_tile(m, header, tokens))]
        out.append((name, header.major, tiles))
    return out


def test_crafted_vectors_decode_to_their_tokens():
    tiny = weights.load(VEC / "tiny-model.safetensors")
    for major, path in CRAFTED.items():
        _, header, _, tokens = _vector(path, tiny)
        got = codec.decode_detailed(path.read_bytes(), [tiny])[1]
        assert header.major == major and torch.equal(got, tokens)
        assert len(set(tokens.reshape(-1).tolist())) > 20  # the prior sees varied tokens, not one constant


def test_uniform_vector_has_tables_whose_binary64_cum_is_not_the_exact_floor():
    uniform = weights.load(UNIFORM_MODEL)
    _, header, streams, tokens = _vector(UNIFORM, uniform)
    assert torch.equal(codec.decode_detailed(UNIFORM.read_bytes(), [uniform])[1], tokens)
    sym, tabs = _tables_by_tile(uniform, header, tokens)[0]
    assert all(t == [UNIFORM_VALUE] * len(t) for t in tabs)
    exact, binary64 = spec_ref.cums(tabs[0], frozenset({"exact_cum"})), spec_ref.cums(tabs[0])
    assert sum(a != b for a, b in zip(exact, binary64)) > 5


def test_crafted_vectors_cover_the_coders_blind_spots():
    tiny = weights.load(VEC / "tiny-model.safetensors")
    _, h1, s1, tokens = _vector(CRAFTED[1], tiny)
    _, h2, s2, _ = _vector(CRAFTED[2], tiny)
    c1, c2 = _coverage(tiny, h1, tokens, s1), _coverage(tiny, h2, tokens, s2)
    assert max(c2["max_pending"]) >= 2  # more than one pending word
    assert any(c2["carried_multi"])  # a carry into several pending words
    assert any(c2["pending_at_end"])  # pending words at the end of a stream
    assert any(c1["extra_word"])  # the final extra word of a 1.x stream
    assert any(c2["empty"])  # an empty 2.0 stream


def _first_stage_presets() -> list[str]:
    """The installed presets that are first stages (second-stage rungs exist in 2.1 files only)."""
    from bsqcodec.config import ModelConfig

    return sorted(n for n, cfg in weights.installed_configs().items() if isinstance(cfg, ModelConfig))


@pytest.mark.parametrize("name", _first_stage_presets())
def test_every_preset_has_a_2_0_vector_of_the_same_tokens(name):
    path = PRESET_V2 / f"{name}.bsq"
    header, tokens, _ = codec.decode_detailed(path.read_bytes())
    old = codec.decode_detailed((VEC / "presets" / f"{name}.bsq").read_bytes())[1]
    assert (header.major, header.preset) == (2, name) and torch.equal(tokens, old)
    assert header.chunk(container.TOKEN_CRC) == container.token_crc(tokens.numpy())


def test_the_spec_coder_accepts_every_vector(coded):
    for name, major, tiles in coded:
        for i, (stream, sym, tabs) in enumerate(tiles):
            assert spec_ref.stream_ok(stream, sym, tabs, major), (name, i)


@pytest.mark.parametrize("wrong", ["exact_cum", "carry_first_only", "no_extra_word", "pending_as_words", "no_wrap_shift",
                                   "drop_pending_at_end", "empty_invalid"])
def test_every_wrong_reading_of_the_coder_fails_a_vector(coded, wrong):
    failed = [(name, i) for name, major, tiles in coded for i, (stream, sym, tabs) in enumerate(tiles)
              if not spec_ref.stream_ok(stream, sym, tabs, major, frozenset({wrong}))]
    assert failed, f"no vector catches the reading {wrong!r}"


# ---- the prior's rounding: bsqcodec's arithmetic with one rule changed -------------------------------

def _half_away_from_zero(self, r):
    pv, wsum = r[..., :-1], r[..., -1:]
    return torch.sign(pv) * torch.add(wsum, pv.abs(), alpha=2).div_(wsum * 2).floor_()


def _truncating(self, r):
    pv, wsum = r[..., :-1], r[..., -1:]
    return torch.add(wsum, pv, alpha=2).div_(wsum * 2).trunc_()


@pytest.mark.parametrize("rule", [_half_away_from_zero, _truncating])
def test_every_wrong_rounding_of_the_attention_fails_a_vector(coded, rule, monkeypatch):
    monkeypatch.setattr(intprior.IntPrior, "_rounded_mean", rule)
    failed = []
    for name, model in _all_vectors():
        m, header, streams, tokens = _vector(VEC / name, model)
        for i, (s, (sym, tabs)) in enumerate(zip(streams, _tables_by_tile(m, header, tokens))):
            if not spec_ref.stream_ok(s, sym, tabs, header.major):
                failed.append((name, i))
        if failed:
            break
    assert failed, f"no vector catches {rule.__name__}"


# ---- the model file and its hash, from the text of section 6 -----------------------------------------

def _spec_hash(path: Path, always_up: bool | None = None) -> bytes:
    """The model hash by formats/bsq.md section 6; always_up: the up stage's keys always (True) or never (False)."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    head = json.loads(raw[8 : 8 + n])
    meta = head.pop("__metadata__")
    fmt = meta["format"]
    # section 6, section 9's looks, section 11's second-stage models and their looks
    assert fmt in ("bsqcodec-model-1", "bsqcodec-look-1", "bsqcodec-second-1", "bsqcodec-second-look-1")
    cfg = json.loads(meta["config"])
    if fmt in ("bsqcodec-model-1", "bsqcodec-look-1"):  # a tokenizer's config, as section 6 writes it
        tok = cfg["tokenizer"]
        for k in ("up_channels", "up_blocks"):
            v = tok.get(k, 0)
            if always_up or (always_up is None and v):
                tok[k] = v
            else:
                tok.pop(k, None)
    names = {"I8": "torch.int8", "I64": "torch.int64", "F16": "torch.float16", "F32": "torch.float32"}
    h = hashlib.sha256(fmt.encode())
    h.update(json.dumps(cfg, sort_keys=True, separators=(",", ":")).encode())
    for name in sorted(head):
        t = head[name]
        shape = "(" + ", ".join(str(d) for d in t["shape"]) + ("," if len(t["shape"]) == 1 else "") + ")"
        h.update(f"\n{name}|{names[t['dtype']]}|{shape}\n".encode())
        a, b = t["data_offsets"]
        h.update(raw[8 + n + a : 8 + n + b])
    return h.digest()


def test_model_hash_from_the_spec_text_names_every_vectors_model():
    files = [VEC / "tiny-model.safetensors", VEC / "tiny-second.safetensors", VEC / "tiny-second-quad.safetensors",
             *(Path(p) for p, _ in weights.installed().values())]
    for path in files:
        digest = _spec_hash(path)
        assert digest == weights.load(path).sha256
    tiny = container.unpack((VEC / "v2-crafted-48x24.bsq").read_bytes())[0].model_hash
    assert _spec_hash(VEC / "tiny-model.safetensors")[:16] == tiny
    # the up stage's keys: written only when not 0 (the tiny model has none; the default rung's are 64 and 2)
    assert _spec_hash(VEC / "tiny-model.safetensors", always_up=True)[:16] != tiny
    default = container.unpack((VEC / "presets" / "v2" / "default.bsq").read_bytes())[0].model_hash
    assert weights.preset("default").config.tokenizer.up_channels
    assert _spec_hash(Path(weights.installed()["default"][0]))[:16] == default


def test_geometry_names_the_config_keys():
    """Section 6: (P, L, G, R, C) are tokenizer.patch, tokenizer.bits, prior.groups, prior.tile_rows/cols."""
    for name in _first_stage_presets():
        m = weights.preset(name)
        h = container.unpack((PRESET_V2 / f"{name}.bsq").read_bytes())[0]
        c = m.config
        assert (h.patch, h.bits, h.groups, h.tile_rows, h.tile_cols) == (
            c.tokenizer.patch, c.tokenizer.bits, c.prior.groups, c.prior.tile_rows, c.prior.tile_cols)


def test_gap_clamp_never_binds():
    """intprior.md section 5: every attention gap is at most 2 QMAX^2 hs < GAP_MAX for hs <= 128 (the config's
    bound), so the clamp cannot change a value and no vector can exercise it."""
    from bsqcodec.config import PriorConfig

    with pytest.raises(ValueError):
        PriorConfig(dim=129 * 2, heads=2)  # head size 129: refused
    assert 2 * intprior.QMAX**2 * 128 < intprior.CLAMP_GAP


if REGEN:  # after every helper is defined
    _regenerate()
