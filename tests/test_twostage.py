"""Files with a second token stage (format 2.1): encode, decode, the cut to the first stage, refusals."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bsqcodec.codec import codec, twostage
from bsqcodec.format import container
from bsqcodec.model import residual
from bsqcodec.errors import BsqError, FormatError, ModelNotFoundError

from conftest import smooth_image
from test_second import tiny_second


@pytest.fixture(scope="module")
def tiny_r(tiny_model):
    return tiny_second(tiny_model)


@pytest.fixture(scope="module")
def image():
    return np.asarray(smooth_image(np.random.default_rng(3), 45, 150))  # 150 rows: two bands of the second grid


@pytest.fixture(scope="module")
def two(tiny_model, tiny_r, image):
    return codec.encode_array(image, tiny_r, effort=1, models=[tiny_model])


def test_a_two_stage_file_decodes_to_the_first_stages_pixels_plus_the_correction(two, tiny_model, tiny_r, image):
    h, streams = container.unpack(two.data)
    assert (h.major, h.minor, h.preset) == (2, 1, "tiny-r") and h.second.model_hash == tiny_r.sha256[:16]
    assert len(h.second.streams) == 1 + 2 * 2
    header, tokens, arr = codec.decode_detailed(two.data, [tiny_model, tiny_r])
    assert arr.shape == image.shape and torch.equal(tokens, two.tokens)
    base = codec.padded_pixels(tiny_model, tokens)
    assert not np.array_equal(arr, base[:150, :45])  # the second stage changed the pixels
    # the same as running the pieces by hand
    bits = twostage.second_bits(tiny_r.coder, codec._pad(image, 4), base)
    from bsqcodec.codec import stage2

    got, budget = stage2.decode(tiny_r.prior, tokens.numpy(), 12, h.second.streams, h.second.table,
                                tiny_r.config.choices, 2, 6)
    kept = torch.arange(6)[None, None, :] < budget[..., None]
    assert torch.equal(got, bits * kept)
    assert np.array_equal(arr, twostage.pixels(tiny_r, base, got, budget)[:150, :45])


def test_a_32_bit_second_stage_codes_and_decodes_every_bit(tiny_model, image):
    """The widest code the format holds (L2 = 32: a token's checksum entry is k x 2^32 + its bits)."""
    wide = tiny_second(tiny_model, seed=5, name="tiny-w", kind="quad3x3", bits=32, choices=(0, 8, 24, 32))
    enc = codec.encode_array(image, wide, effort=3, lam=1, models=[tiny_model])
    header, tokens, arr = codec.decode_detailed(enc.data, [tiny_model, wide])
    assert np.array_equal(arr, enc.pixels()) and torch.equal(tokens, enc.tokens)
    _, bits, budget = twostage.decode_tokens(header, tiny_model, tokens.numpy(), [tiny_model, wide])
    assert int(budget.max()) == 32 and bool(bits[..., 31].any())  # the last bit is kept and coded
    assert header.second.bits == 32
    import json

    import spec_ref_second  # and a decoder written from the spec alone reads them too

    t = {k: v.tolist() for k, v in wide.tensors.items() if k.startswith("bits.")}
    cfg = json.loads(json.dumps(wide.config.to_dict()))
    ref_bits, ref_k = spec_ref_second.decode(header, tokens.tolist(), t, cfg)
    assert ref_k == budget.tolist()
    assert ref_bits == [[[b if i < k else 0 for i, b in enumerate(row)] for row, k in zip(r1, r2)]
                        for r1, r2 in zip(bits.tolist(), budget.tolist())]


def test_a_quad_context_model_codes_four_passes_a_band(tiny_model, image):
    quad = tiny_second(tiny_model, seed=4, name="tiny-q", kind="quad3x3")
    assert quad.config.context == "quad3x3" and "context" in quad.config.to_dict()
    assert "context" not in tiny_second(tiny_model).config.to_dict()  # checker models keep their 2.1 hashes
    enc = codec.encode_array(image, quad, effort=1, models=[tiny_model])
    h, _ = container.unpack(enc.data)
    assert len(h.second.streams) == 1 + 4 * 2 and h.second.passes(h) == 4
    header, tokens, arr = codec.decode_detailed(enc.data, [tiny_model, quad])
    assert np.array_equal(arr, enc.pixels()) and torch.equal(tokens, enc.tokens)
    _, bits, budget = twostage.decode_tokens(header, tiny_model, tokens.numpy(), [tiny_model, quad])
    assert int(budget.max()) > 0  # bits were kept and coded in the four passes


def test_the_cut_is_the_first_stages_own_file(two, tiny_model, image):
    cut = container.first_stage(two.data, "tiny")
    assert cut == codec.encode_array(image, tiny_model, effort=1).data
    _, _, arr = codec.decode_detailed(cut, [tiny_model])
    assert np.array_equal(arr, codec.padded_pixels(tiny_model, two.tokens)[:150, :45])


def test_budgets_follow_lambda(tiny_model, tiny_r, image):
    """A huge lambda keeps no bits (the decoder still corrects the first stage's pixels from what it sees of
    them); lambda 0 keeps whatever lowers the error."""
    none = codec.encode_array(image, tiny_r, effort=1, models=[tiny_model], lam=1e12)
    h, _ = container.unpack(none.data)
    assert h.second.table[0] > 1 and h.second.table[1:] == [1, 1, 1]  # every region at choice 0
    _, _, arr = codec.decode_detailed(none.data, [tiny_model, tiny_r])
    base = codec.padded_pixels(tiny_model, none.tokens)
    nothing = twostage.pixels(tiny_r, base, torch.zeros(76, 24, 6, dtype=torch.uint8), torch.zeros(76, 24, dtype=torch.long))
    assert np.array_equal(arr, nothing[:150, :45])


def test_the_budget_map_is_the_rate_distortion_choice_region_by_region(tiny_model, tiny_r, image):
    enc = codec.encode_array(image, tiny_model, effort=1)
    base = codec.padded_pixels(tiny_model, enc.tokens)
    arr = codec._pad(image, 4)
    bits = twostage.second_bits(tiny_r.coder, arr, base)
    args = (tiny_r, arr, base, enc.tokens.numpy(), 12, bits)
    pick = twostage.choose_budgets(*args, 0.0, 45, 150)
    se = []
    for k in tiny_r.config.choices:  # by hand: each region's error with every token at k bits, inside the image
        px = twostage.pixels(tiny_r, base, bits, torch.full(bits.shape[:2], k)).astype(float)
        e = ((px - arr) ** 2).sum(-1)
        e[150:], e[:, 45:] = 0, 0
        se.append(e.reshape(38, 4, 12, 4).sum((1, 3)))
    assert np.array_equal(pick, np.argmin(np.stack(se), 0))
    fast = twostage.choose_budgets(*args, 0.0, 45, 150, twostage.candidates(4, 1))
    assert twostage.candidates(4, 1) == [0, 2, 3] and twostage.candidates(4, 3) == [0, 1, 2, 3]
    assert set(np.unique(fast)) <= {0, 2, 3} and np.array_equal(fast, np.asarray([0, 2, 3])[np.argmin(np.stack(se)[[0, 2, 3]], 0)])
    means = [np.asarray(tiny_r.config.choices)[twostage.choose_budgets(*args, lam, 45, 150)].mean()
             for lam in (0.0, 30.0, 300.0, 3000.0, 1e12)]
    assert means == sorted(means, reverse=True) and means[0] > means[-1] == 0


def test_missing_wrong_or_altered_second_stages_are_refused(two, tiny_model, tiny_r):
    with pytest.raises(ModelNotFoundError):
        codec.decode_detailed(two.data, [tiny_model])
    other = tiny_second(tiny_model, seed=1, name="tiny-r")
    with pytest.raises(ModelNotFoundError):  # another second-stage model: the hash names the right one
        codec.decode_detailed(two.data, [tiny_model, other])
    h, streams = container.unpack(two.data)
    for i, s in enumerate(h.second.streams):
        if not s:
            continue
        bad = list(h.second.streams)
        bad[i] = bytes([s[0] ^ 0x21]) + s[1:]
        h.second.streams = bad
        with pytest.raises(FormatError, match="second stage|second-stage"):
            codec.decode_detailed(container.pack(h, streams), [tiny_model, tiny_r])
        h.second.streams = container.unpack(two.data)[0].second.streams
    h.second.token_crc ^= 1
    with pytest.raises(FormatError, match="second-stage token checksum"):
        codec.decode_detailed(container.pack(h, streams), [tiny_model, tiny_r])
    blob = bytearray(two.data)
    blob[-6] ^= 0x01  # inside the second payload
    with pytest.raises(BsqError):
        codec.decode_detailed(bytes(blob), [tiny_model, tiny_r])


def test_the_command_line_encodes_decodes_and_describes_two_stage_files(tiny_model, tiny_r, tmp_path, monkeypatch):
    import json

    from PIL import Image
    from typer.testing import CliRunner

    from bsqcodec.format import modelfile
    from bsqcodec.model import weights
    from bsqcodec.cli.cli import app

    models = tmp_path / "models"
    models.mkdir()
    weights.save(tiny_model, models / "tiny.safetensors")
    weights.save(tiny_r, models / "tiny-r.safetensors")
    (models / "retired.json").write_text('{"models": {}}')
    monkeypatch.setattr(weights, "MODELS_DIR", models)
    found, broken = modelfile.installed(models)
    assert not broken and found["tiny-r"][1] == tiny_r.sha256 and found["tiny-r"][2].base == "tiny"
    img = tmp_path / "a.png"
    Image.fromarray(np.asarray(smooth_image(np.random.default_rng(4), 30, 21))).save(img)
    run = lambda *a: CliRunner().invoke(app, [str(x) for x in a])  # noqa: E731
    r = run("encode", img, "--preset", "tiny-r", "--effort", "1", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    bsq = tmp_path / "a.bsq"
    assert res["preset"] == "tiny-r" and res["bytes"] == bsq.stat().st_size and res["second_stage_bytes"] > 0
    r = run("info", bsq, "--json")
    info = json.loads(r.stdout)
    assert info["version"] == "2.1" and info["second_stage"]["model"] == tiny_r.sha256[:16].hex()
    assert info["second_stage"]["payload_bytes"] == res["second_stage_bytes"] and info["second_stage"]["grid"] == [12, 16]
    assert info["second_stage"]["passes"] == 2
    r = run("decode", bsq, "-o", tmp_path / "b.png", "--quiet")
    assert r.exit_code == 0, r.output
    out = np.asarray(Image.open(tmp_path / "b.png"))
    ref = np.asarray(Image.open(img))
    assert abs(10 * np.log10(255**2 / ((out.astype(float) - ref) ** 2).mean()) - res["psnr"]) < 1e-9


KINDS2 = ("flip", "cut", "grow", "swap", "empty", "table", "patch", "bits", "crc", "hash", "streams")


@settings(max_examples=120, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from(KINDS2))
def test_mutated_second_stages_are_rejected_or_decode_the_same(two, tiny_model, tiny_r, seed, kind):
    """Every field and stream of the second stage changed (checksums made valid again): a clear error, or the
    very same pixels."""
    rng = np.random.default_rng(seed)
    h, streams = container.unpack(two.data)
    s = h.second
    i = int(rng.integers(len(s.streams)))
    st_ = list(s.streams)
    if kind == "flip" and st_[i]:
        j = int(rng.integers(len(st_[i])))
        st_[i] = st_[i][:j] + bytes([st_[i][j] ^ (1 << int(rng.integers(8)))]) + st_[i][j + 1 :]
    elif kind == "cut":
        st_[i] = st_[i][: int(rng.integers(len(st_[i]) + 1))]
    elif kind == "grow":
        st_[i] = st_[i] + bytes(rng.integers(0, 256, int(rng.integers(1, 4))).tolist())
    elif kind == "swap":
        j = int(rng.integers(len(st_)))
        st_[i], st_[j] = st_[j], st_[i]
    elif kind == "empty":
        st_[i] = b""
    elif kind == "table":
        s.table = [max(1, int(t) + int(rng.integers(-3, 4))) for t in s.table]
    elif kind == "patch":
        s.patch = int(rng.choice([1, 2, 4, 8]))
    elif kind == "bits":
        s.bits = int(rng.integers(1, 33))
    elif kind == "crc":
        s.token_crc = int(rng.integers(2**32))
    elif kind == "hash":
        s.model_hash = bytes(rng.integers(0, 256, 16).tolist())
    elif kind == "streams":
        st_ = st_ + [b""] if rng.random() < 0.5 else st_[:-1]
    s.streams = st_
    try:
        data = container.pack(h, streams)
    except BsqError:
        return  # no writer can make it
    try:
        _, _, arr = codec.decode_detailed(data, [tiny_model, tiny_r])
    except BsqError:
        return
    assert np.array_equal(arr, codec.decode_detailed(two.data, [tiny_model, tiny_r])[2]), kind


def test_model_files_given_twice_encode_and_decode_a_second_stage(tiny_model, tiny_r, tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    from bsqcodec.model import weights
    from bsqcodec.cli.cli import app

    weights.save(tiny_model, tmp_path / "tiny.safetensors")
    weights.save(tiny_r, tmp_path / "tiny-r.safetensors")
    img = tmp_path / "a.png"
    Image.fromarray(np.asarray(smooth_image(np.random.default_rng(5), 20, 16))).save(img)
    run = lambda *a: CliRunner().invoke(app, [str(x) for x in a])  # noqa: E731
    both = ["--model", tmp_path / "tiny-r.safetensors", "--model", tmp_path / "tiny.safetensors"]
    r = run("encode", img, *both, "--effort", "1", "--quiet")
    assert r.exit_code == 0, r.output
    assert container.unpack((tmp_path / "a.bsq").read_bytes())[0].second is not None
    r = run("decode", tmp_path / "a.bsq", "-o", tmp_path / "b.png", *both, "--quiet")
    assert r.exit_code == 0, r.output
    r = run("decode", tmp_path / "a.bsq", "-o", tmp_path / "c.png", "--model", tmp_path / "tiny.safetensors")
    assert r.exit_code == 1 and "tiny-r" in r.output and not (tmp_path / "c.png").exists()
    r = run("encode", img, "--model", tmp_path / "tiny.safetensors", "--model", tmp_path / "tiny.safetensors", "-o", tmp_path / "d.bsq")
    assert r.exit_code == 1 and "second-stage" in r.output
    r = run("generate", "--model", tmp_path / "tiny-r.safetensors", "-o", tmp_path / "g.png")
    assert r.exit_code == 1 and "second-stage model" in r.output and "Traceback" not in r.output


def test_cut_writes_the_first_stages_file(two, tiny_model, tiny_r, image, tmp_path):
    from typer.testing import CliRunner

    from bsqcodec.model import weights
    from bsqcodec.cli.cli import app

    weights.save(tiny_model, tmp_path / "tiny.safetensors")
    weights.save(tiny_r, tmp_path / "tiny-r.safetensors")
    src = tmp_path / "two.bsq"
    src.write_bytes(two.data)
    run = lambda *a: CliRunner().invoke(app, [str(x) for x in a])  # noqa: E731
    for m in ("tiny.safetensors", "tiny-r.safetensors"):  # either model names the first stage
        r = run("cut", src, "--model", tmp_path / m, "-o", tmp_path / "one.bsq", "--force")
        assert r.exit_code == 0, r.output
        assert (tmp_path / "one.bsq").read_bytes() == codec.encode_array(image, tiny_model, effort=1).data
    r = run("cut", src, "--model", tmp_path / "tiny.safetensors")
    assert r.exit_code == 0 and (tmp_path / "two.first.bsq").exists()
    r = run("cut", src, "--model", tmp_path / "tiny.safetensors")  # exists: refused without --force
    assert r.exit_code == 1 and "Traceback" not in r.output
    r = run("cut", tmp_path / "one.bsq", "-o", tmp_path / "x.bsq")
    assert r.exit_code == 1 and "no second stage" in r.output
    r = run("cut", src, "-o", tmp_path / "y.bsq")  # neither model installed nor given
    assert r.exit_code == 1 and "--model" in r.output and not (tmp_path / "y.bsq").exists()


def test_strips_give_the_whole_images_pixels(tiny_r, tiny_model, image, monkeypatch):
    """The residual coder runs in strips of rows with a halo: the same bits and pixels (within one level) as
    one pass over the whole image, for strips of any height the image's width gives."""
    enc = codec.encode_array(image, tiny_model, effort=1)
    base = codec.padded_pixels(tiny_model, enc.tokens)
    arr = codec._pad(image, 4)
    monkeypatch.setattr(twostage, "STRIP_POSITIONS", 8 * 24)  # strips of 8 rows here (the 24-wide grid)
    assert twostage.strip_rows(24) == 8
    bits = twostage.second_bits(tiny_r.coder, arr, base)
    with torch.no_grad():
        x, b = residual.to_float(arr), residual.to_float(base)
        whole = (tiny_r.coder.encode_latent(x, b)[0] > 0).permute(1, 2, 0).to(torch.uint8)
        assert torch.equal(bits, whole)
        budget = torch.from_numpy(np.random.default_rng(0).choice([0, 2, 6], bits.shape[:2]))
        kept = torch.arange(6)[None, None, :] < budget[..., None]
        code = ((bits.float() * 2 - 1) * kept).permute(2, 0, 1)[None] / 6**0.5
        got = {}
        for bf16 in (False, True):
            px = got[bf16] = twostage.pixels(tiny_r, base, bits, budget, bf16)
            ref = (tiny_r.coder.decode_code(code, b, bf16)[0].clamp(0, 1) * 255).round().permute(1, 2, 0)
            ref = ref.to(torch.uint8).numpy()
            assert np.abs(px.astype(int) - ref).max() <= 1 and (px != ref).mean() < 0.001, bf16
    diff = np.abs(got[True].astype(int) - got[False].astype(int))
    assert diff.max() >= 1 and diff.mean() < 0.5  # bfloat16 is really used, and close to float32


def _objective(smodel, arr, base_px, b1, bits, budget, lam, r):
    """Squared 8-bit error of the decoded pixels + lam x the kept bits' costs (the search's rule)."""
    px = twostage.pixels(smodel, base_px, bits, budget).astype(np.float64)
    c0, c1 = twostage.bit_costs(smodel, b1, bits, budget, r)
    kept = torch.arange(bits.shape[-1])[None, None, :] < budget[..., None]
    rate = float((torch.where(bits.bool(), c1, c0) * kept).sum())
    return float(((px - arr) ** 2).sum()) + lam * rate


def test_the_search_lowers_error_plus_lambda_rate_and_effort_1_keeps_the_coders_signs(tiny_model, tiny_r, image):
    from bsqcodec.codec import search2, stage2
    from bsqcodec.model.tokenizer import tokens_to_bits

    tokens = codec.image_to_tokens(tiny_model, image)
    base_px = codec.padded_pixels(tiny_model, tokens)
    arr = codec._pad(image, 4)
    latent = twostage.second_latent(tiny_r.coder, arr, base_px)
    start = (latent > 0).to(torch.uint8)
    assert torch.equal(start, twostage.second_bits(tiny_r.coder, arr, base_px))
    budget = stage2.budgets(np.full(tokens.shape, 2), tiny_r.config.choices, 2)  # 4 of 6 bits everywhere
    b1 = tokens_to_bits(tokens, 12)
    costs = twostage.bit_costs(tiny_r, b1, start, budget, 2)
    lam = 300.0
    h, w = image.shape[:2]
    u = torch.nn.functional.normalize(latent, dim=-1)
    assert torch.equal(search2.refine(tiny_r.coder, u, arr, base_px, budget, costs, lam, 0, w, h), start)
    found = search2.refine(tiny_r.coder, u, arr, base_px, budget, costs, lam, 8, w, h)
    kept = torch.arange(6)[None, None, :] < budget[..., None]
    assert (found[kept] != start[kept]).any()  # it moved
    before = _objective(tiny_r, arr, base_px, b1, start, budget, lam, 2)
    after = _objective(tiny_r, arr, base_px, b1, found, budget, lam, 2)
    assert after < before
    # effort 1 files hold the coder's own signs
    enc = codec.encode_array(image, tiny_r, effort=1, models=[tiny_model])
    header, _ = container.unpack(enc.data)
    _, bits, bud = twostage.decode_tokens(header, tiny_model, enc.tokens.numpy(), [tiny_model, tiny_r])
    keep = torch.arange(6)[None, None, :] < bud[..., None]
    assert torch.equal(bits[keep], twostage.second_bits(tiny_r.coder, arr, codec.padded_pixels(tiny_model, enc.tokens))[keep])


def test_a_searched_file_decodes_to_the_encoders_pixels(tiny_model, tiny_r, image):
    enc = codec.encode_array(image, tiny_r, effort=4, models=[tiny_model])
    _, tokens, arr = codec.decode_detailed(enc.data, [tiny_model, tiny_r])
    assert np.array_equal(arr, enc.pixels())


def test_second_stage_pixels_are_the_same_for_any_thread_count(two, tiny_model, tiny_r):
    header, _ = container.unpack(two.data)
    _, bits, budget = twostage.decode_tokens(header, tiny_model, two.tokens.numpy(), [tiny_model, tiny_r])
    base = codec.padded_pixels(tiny_model, two.tokens)
    n = torch.get_num_threads()
    got = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            got.append(twostage.pixels(tiny_r, base, bits, budget))
    finally:
        torch.set_num_threads(n)
    assert all(np.array_equal(got[0], g) for g in got[1:])
    assert bits.shape[0] > twostage.strip_rows(bits.shape[1])  # more than one strip
