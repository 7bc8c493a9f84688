"""Encoder-side search (`--effort`): effort 1 is the plain sign encoder, every effort's file decodes to
the tokens the encoder chose, and the search finds better rate-distortion than the signs."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from bsqcodec.codec import codec, search
from bsqcodec.format import container
from bsqcodec.model import weights
from bsqcodec.cli.cli import app

from conftest import smooth_image


@pytest.fixture(scope="module")
def photo():
    return np.asarray(smooth_image(np.random.default_rng(11), 45, 27))


def plain_sign_bytes(model, arr) -> bytes:
    """The encoder as it was before the search existed: the tokenizer's signs, coded."""
    tokens = codec.image_to_tokens(model, arr)
    header = codec.make_header(model, arr.shape[1], arr.shape[0], None, tokens)
    return container.pack(header, codec.encode_tokens(model, header, tokens)[0])


def test_effort_1_gives_exactly_the_bytes_of_the_plain_sign_encoder(tiny_model, photo):
    assert codec.encode(photo, tiny_model, effort=1) == plain_sign_bytes(tiny_model, photo)
    shipped = weights.preset("default")
    assert codec.encode(photo, shipped, effort=1) == plain_sign_bytes(shipped, photo)


@pytest.mark.parametrize("effort", range(search.MIN_EFFORT, search.MAX_EFFORT + 1))
def test_every_effort_decodes_to_the_tokens_the_encoder_chose(tiny_model, photo, effort):
    enc = codec.encode_array(photo, tiny_model, effort=effort)
    _, tokens, arr = codec.decode_detailed(enc.data, [tiny_model])
    assert torch.equal(tokens, enc.tokens)
    assert np.array_equal(arr, codec.tokens_to_array(tiny_model, enc.tokens, photo.shape[1], photo.shape[0]))
    if effort > 1:  # the search did change tokens (so that this test checks searched files)
        assert not torch.equal(enc.tokens, codec.image_to_tokens(tiny_model, photo))


def test_searched_files_decode_the_same_with_any_number_of_workers(photo):
    m = weights.preset("q2")
    data = codec.encode(photo, m, effort=5)
    a = np.asarray(codec.decode(data, workers=1))
    torch.set_num_threads(1)
    b = np.asarray(codec.decode(data, workers=2))
    assert np.array_equal(a, b)


def test_higher_effort_buys_quality_for_little_rate_with_a_shipped_model():
    # 12 x 8 tokens: on a few tokens (a 45x27 image is 6 x 4) the search has too little to work with
    photo = np.asarray(smooth_image(np.random.default_rng(11), 96, 64))
    m = weights.preset("default")
    h, w = photo.shape[:2]
    q, size = {}, {}
    for e in (1, 5):
        enc = codec.encode_array(photo, m, effort=e)
        q[e], size[e] = codec.psnr(photo, codec.tokens_to_array(m, enc.tokens, w, h)), len(enc.data)
    assert q[5] > q[1] + 0.2
    assert size[5] < size[1] * 1.15


def test_the_rate_term_keeps_bits_the_prior_is_sure_of():
    m = weights.preset("q4")
    arr = np.asarray(smooth_image(np.random.default_rng(3), 64, 48))
    latent, costs = codec.search_inputs(m, arr)
    lam = search.rate_weight(m.config.tokenizer.bits)
    bits = {}
    for weight in (0.0, 20 * lam):
        tokens = search.refine(m.tokenizer, latent, arr, 16, costs, weight)
        header = codec.make_header(m, 64, 48, None, tokens)
        bits[weight] = codec.encode_tokens(m, header, tokens)[1]
    assert bits[20 * lam] < bits[0.0]


def test_trajectory_matches_refine_at_each_iteration_count(tiny_model, photo):
    tok = tiny_model.tokenizer
    latent, costs = codec.search_inputs(tiny_model, photo)
    start = codec.image_to_tokens(tiny_model, photo)
    found = search.trajectory(tok, latent, photo, [0, 2, 5], costs=costs, lam=0.01)
    assert torch.equal(found[0], start)
    for k in (2, 5):
        assert torch.equal(found[k], search.refine(tok, latent, photo, k, costs, 0.01))
    assert not torch.equal(found[2], found[5])


def test_large_images_are_searched_in_strips(tiny_model, monkeypatch):
    arr = np.asarray(smooth_image(np.random.default_rng(4), 40, 64))  # 16 rows of 10 tokens
    monkeypatch.setattr(search, "WINDOW_TOKENS", 40)  # strips of 4 token rows
    assert len(search._windows(16, 10)) == 4
    seen = []
    enc = codec.encode_array(arr, tiny_model, effort=3, progress=lambda s, d, t: seen.append((s, d, t)))
    _, tokens, _ = codec.decode_detailed(enc.data, [tiny_model])
    assert torch.equal(tokens, enc.tokens)
    steps = search.ITERATIONS[3]
    assert [x for x in seen if x[0] == "search"] == [("search", i, 4 * steps) for i in range(1, 4 * steps + 1)]
    changed = (enc.tokens != codec.image_to_tokens(tiny_model, arr)).any(1)
    assert changed[:4].any() and changed[-4:].any()  # every strip was searched


def test_the_search_does_not_depend_on_the_decoders_up_stage(photo):
    """The search decodes without the up stage (cheaper steps); the file still decodes with it."""
    from bsqcodec.config import TokenizerConfig
    from bsqcodec.model.tokenizer import Tokenizer

    torch.manual_seed(5)
    tok = Tokenizer(TokenizerConfig(patch=4, channels=8, bits=10, enc_blocks=1, dec_blocks=1, up_channels=6, up_blocks=1)).eval()
    up = list(tok.up.parameters()) + list(tok.up_blocks.parameters()) + list(tok.up_out.parameters())
    with torch.no_grad():
        for p in tok.parameters():  # no zero-initialised layer: every part of the decoder does something
            p.normal_(0, 0.3)
    arr = photo[:24, :40]
    latent = tok.image_to_latent(arr)
    found = search.refine(tok, latent, arr, 8)
    assert not torch.equal(found, tok.quant.codes_to_tokens(latent)[0])  # the search did move
    with torch.no_grad():
        for p in up:
            p.normal_(0, 0.3)
    assert torch.equal(search.refine(tok, latent, arr, 8), found)


def test_bit_costs_sum_the_table_over_each_bit():
    tables = torch.tensor([[1, 1, 1, 5], [2, 2, 2, 2]])  # symbols 00, 01, 10, 11
    c0, c1 = search.bit_costs(tables, 2)
    p1 = torch.tensor([[6 / 8, 6 / 8], [0.5, 0.5]], dtype=torch.float64)
    assert torch.allclose(c1, -torch.log2(p1)) and torch.allclose(c0, -torch.log2(1 - p1))
    tables = torch.tensor([[1, 2, 3, 4]])
    c0, c1 = search.bit_costs(tables, 2)  # msb first: P(msb) = (3+4)/10, P(lsb) = (2+4)/10
    assert torch.allclose(c1, -torch.log2(torch.tensor([[0.7, 0.6]], dtype=torch.float64)))


@pytest.mark.parametrize("bad", [0, 10, 2.5, True, "4"])
def test_a_bad_effort_is_refused_before_any_work(tiny_model, photo, bad):
    with pytest.raises(ValueError, match="effort"):
        codec.encode(photo, tiny_model, effort=bad)


def test_cli_effort_option_and_json(tmp_path, model_file, photo):
    src = tmp_path / "a.png"
    Image.fromarray(photo).save(src)
    runner = CliRunner()
    r = runner.invoke(app, ["encode", str(src), "--model", str(model_file), "-e", "1", "-o", str(tmp_path / "1.bsq"), "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["effort"] == 1
    assert (tmp_path / "1.bsq").read_bytes() == plain_sign_bytes(weights.load(model_file), photo)
    r = runner.invoke(app, ["encode", str(src), "--model", str(model_file), "-o", str(tmp_path / "d.bsq"), "--json"])
    assert json.loads(r.stdout)["effort"] == search.DEFAULT_EFFORT
    assert (tmp_path / "d.bsq").read_bytes() == codec.encode(photo, weights.load(model_file))
    r = runner.invoke(app, ["encode", str(src), "--model", str(model_file), "--effort", "10", "-o", str(tmp_path / "x.bsq")])
    assert r.exit_code != 0 and not (tmp_path / "x.bsq").exists()


def test_pillow_save_takes_effort(tmp_path, photo):
    im = Image.fromarray(photo)
    im.save(tmp_path / "a.bsq", quality=2, effort=1)
    assert (tmp_path / "a.bsq").read_bytes() == plain_sign_bytes(weights.preset("q2"), photo)
    im.save(tmp_path / "b.bsq", quality=2, effort=6)
    assert (tmp_path / "b.bsq").read_bytes() == codec.encode(photo, "q2", effort=6)


def test_the_searches_adam_takes_torchs_steps_exactly():
    """bsqcodec.codec.adam.Adam (no torch._dynamo import) updates a tensor exactly as torch.optim.Adam does,
    with the learning rate changed between steps as the search changes it."""
    from bsqcodec.codec.adam import Adam

    g = torch.Generator().manual_seed(0)
    start = torch.randn(3, 5, 7, generator=g)
    ours, theirs = start.clone(), start.clone().requires_grad_(True)
    opt_ours, opt_theirs = Adam(ours, 0.006), torch.optim.Adam([theirs], lr=0.006)
    for i in range(1, 9):
        grad = torch.randn(3, 5, 7, generator=g) * 10.0 ** (i % 4 - 2)
        lr = search.learning_rate(i)
        opt_ours.lr = lr
        opt_ours.step(grad)
        for group in opt_theirs.param_groups:
            group["lr"] = lr
        theirs.grad = grad.clone()
        opt_theirs.step()
        assert torch.equal(ours, theirs.detach()), i
    assert not torch.equal(ours, start)


def test_encoding_does_not_import_torch_dynamo(tmp_path):
    """Creating torch.optim's Adam imports torch._dynamo, about a second of every encode; the searches
    use their own."""
    import subprocess
    import sys

    code = ("import sys, numpy as np; from bsqcodec.codec import codec; "
            "codec.encode_array(np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8), 'q6', effort=4); "
            "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
