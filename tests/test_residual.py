"""The second token stage (model/residual.py) and its training loop (train/residual.py)."""

import copy

import numpy as np
import pytest
import torch

from bsqcodec.model import weights
from bsqcodec.errors import BsqError
from bsqcodec.model.residual import ResidualCoder, ResidualConfig
from bsqcodec.train.residual import ResidualOptions, base_pixels, train_residual

from conftest import image_folder

CFG = ResidualConfig(patch=2, channels=8, bits=6, enc_blocks=1, dec_blocks=1)


def test_a_fresh_stage_returns_the_base_pixels_and_zeroed_bits_read_as_nothing():
    torch.manual_seed(0)
    res = ResidualCoder(CFG).eval()
    x, base = torch.rand(2, 3, 12, 8), torch.rand(2, 3, 12, 8)
    y, code = res(x, base)
    assert torch.equal(y, base) and code.shape == (2, 6, 6, 4)  # the output layer starts at zero
    with torch.no_grad():
        for p in res.parameters():
            p.normal_(0, 0.3)
    keep = torch.tensor([2, 6])
    y, code = res(x, base, keep)
    assert (code[0, 2:] == 0).all() and (code[1] != 0).all()
    full = res.quant(res.encode_latent(x, base))
    cut = full * (torch.arange(6) < 2).float()[None, :, None, None]
    assert torch.allclose(y[0], res.decode_code(cut, base)[0:1][0])  # a kept prefix is the code with the rest zeroed
    assert not torch.allclose(res.decode_code(full, base)[0], y[0])


def test_odd_patches_are_refused():
    with pytest.raises(ValueError):
        ResidualConfig(patch=3)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return image_folder(tmp_path_factory.mktemp("rdata"), [(48 + 8 * i, 40) for i in range(3)], 0)


def _opts(data, out, model_file, **kw):
    base = dict(data=str(data), out=str(out), base=str(model_file), config=CFG, steps=4, batch=2, crop=16,
                cache_crop=32, per_image=2, warmup=1, eval_every=2, nested=(2, 6), checkpoint_seconds=1e9)
    base.update(kw)
    return ResidualOptions(**base)


def test_training_lowers_the_error_and_resumes_exactly(data, model_file, tmp_path):
    a = train_residual(_opts(data, tmp_path / "a", model_file, steps=4))
    b1 = train_residual(_opts(data, tmp_path / "b", model_file, steps=2))
    b2 = train_residual(_opts(data, tmp_path / "b", model_file, steps=4, resume=True))
    assert (a["step"], b1["step"], b2["step"]) == (4, 2, 4)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b2["model"][k]), k
    assert any(not torch.equal(v, ResidualCoder(CFG).state_dict()[k]) for k, v in a["model"].items())


def test_base_pixels_are_the_first_stage_decoders_and_cached(model_file, tmp_path):
    tok = weights.load(model_file).tokenizer.eval()
    crops = np.random.default_rng(1).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    got = base_pixels(tok, crops, str(tmp_path), str(model_file), "t")
    for i in range(3):
        want = tok.tokens_to_image(tok.image_to_tokens(crops[i]), bf16=False).numpy()
        assert np.abs(got[i].astype(int) - want.astype(int)).max() <= 1
    assert list(tmp_path.glob("base-*.npy")) and np.array_equal(base_pixels(tok, crops, str(tmp_path), str(model_file), "t"), got)


def test_the_rate_term_trains_a_bit_prior_and_resumes_exactly(data, model_file, tmp_path):
    a = train_residual(_opts(data, tmp_path / "a", model_file, steps=4, rate_weight=1e-3, crop=16))
    train_residual(_opts(data, tmp_path / "b", model_file, steps=2, rate_weight=1e-3, crop=16))
    b2 = train_residual(_opts(data, tmp_path / "b", model_file, steps=4, resume=True))  # the rate term is the run's
    for k in a["bit_prior"]:
        assert torch.equal(a["bit_prior"][k], b2["bit_prior"][k]), k
    assert weights.load_checkpoint(tmp_path / "b" / "residual.ckpt")["rate_weight"] == 1e-3


def test_bit_prior_sees_only_what_a_decoder_has():
    """A second-pass token's probabilities change with its first-pass neighbours' kept bits; nothing changes them
    for first-pass tokens, and unkept bits change nothing."""
    from bsqcodec.model.residual import BitPrior

    torch.manual_seed(0)
    prior = BitPrior(base_bits=5, ratio=2, bits=4, width=16)
    base = torch.randint(0, 2, (1, 5, 3, 3)).float() * 2 - 1
    bits = torch.randint(0, 2, (1, 4, 6, 6)).float()
    kept = torch.tensor([1.0, 1, 0, 0])[None, :, None, None]
    lg = prior.logits(base, bits, kept)
    flipped = bits.clone()
    flipped[0, 0, 2, 2] = 1 - flipped[0, 0, 2, 2]  # a first-pass token ((2 + 2) even), a kept bit
    lg2 = prior.logits(base, flipped, kept)
    changed = (lg2 != lg).any(1)[0]
    assert changed[2, 1] and changed[2, 3] and changed[1, 2] and changed[3, 2]  # its second-pass neighbours
    assert changed.sum() == 4 and not changed[2, 2]
    unkept = bits.clone()
    unkept[0, 3] = 1 - unkept[0, 3]
    assert torch.equal(prior.logits(base, unkept, kept), lg)


def test_budgets_per_token_keep_each_tokens_own_prefix():
    from bsqcodec.model.residual import kept_mask

    torch.manual_seed(0)
    res = ResidualCoder(CFG).eval()
    with torch.no_grad():
        for p in res.parameters():
            p.normal_(0, 0.3)
    x, base = torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8)
    keep = torch.tensor([[[0, 2, 6, 6], [2, 2, 6, 0], [6, 6, 0, 0], [2, 0, 2, 6]]])
    y, code = res(x, base, keep)
    for i in range(4):
        for j in range(4):
            k = int(keep[0, i, j])
            assert (code[0, k:, i, j] == 0).all() and (code[0, :k, i, j] != 0).all()
    assert torch.equal(kept_mask(torch.tensor([2]), 6)[0, :, 0, 0], torch.tensor([1.0, 1, 0, 0, 0, 0]))
    uniform = res(x, base, torch.full((1, 4, 4), 2))[0]
    assert torch.equal(uniform, res(x, base, torch.tensor([2]))[0])  # a map of one budget is that budget


def test_budget_maps_vary_by_region_in_the_mixed_share_only():
    from bsqcodec.train.residual import budget_maps

    rng = np.random.default_rng(0)
    m = budget_maps(rng, (4, 8, 24), 400, 16, 2, 0.5).numpy()
    assert m.shape == (400, 16, 16) and set(np.unique(m)) == {0, 4, 8, 24}  # regions may keep nothing
    assert (m[:, ::2, ::2] == m[:, 1::2, 1::2]).all()  # constant on 2 x 2 regions
    varies = np.array([len(np.unique(s)) > 1 for s in m])
    assert 0.4 < varies.mean() < 0.6
    whole = budget_maps(rng, (4, 8), 50, 16, 2, 0.0).numpy()
    assert not any(len(np.unique(s)) > 1 for s in whole) and whole.min() == 4


def test_a_prior_gains_the_budget_input_from_one_without_it_unchanged():
    from bsqcodec.model.residual import BitPrior

    torch.manual_seed(0)
    old = BitPrior(base_bits=5, ratio=2, bits=4, width=16, budget=False)
    new = BitPrior(base_bits=5, ratio=2, bits=4, width=16)
    new.load_older(old.state_dict())
    base = torch.randint(0, 2, (1, 5, 3, 3)).float() * 2 - 1
    bits = torch.randint(0, 2, (1, 4, 6, 6)).float()
    kept = torch.tensor([1.0, 1, 0, 0])[None, :, None, None]
    assert torch.allclose(new.logits(base, bits, kept), old.logits(base, bits, kept))
    again = BitPrior.from_state(new.state_dict(), 5, 2, 4)
    assert again.budget and not BitPrior.from_state(old.state_dict(), 5, 2, 4).budget
    with torch.no_grad():
        new.net[0].weight[:, -1] = 1.0
    assert not torch.allclose(new.logits(base, bits, kept), old.logits(base, bits, kept))  # the budget is seen
    other = BitPrior(base_bits=9, ratio=2, bits=4, width=16)  # another first stage: all but the input layer
    before = other.net[0].weight.clone()
    other.load_older(old.state_dict())
    assert torch.equal(other.net[0].weight, before) and torch.equal(other.net[2].weight, old.net[2].weight)


def test_mixed_budgets_train_and_resume_exactly(data, model_file, tmp_path):
    kw = dict(rate_weight=1e-3, crop=16, mixed=0.5)
    a = train_residual(_opts(data, tmp_path / "a", model_file, steps=4, **kw))
    train_residual(_opts(data, tmp_path / "b", model_file, steps=2, **kw))
    b2 = train_residual(_opts(data, tmp_path / "b", model_file, steps=4, resume=True))  # mixed is the run's
    for k in a["bit_prior"]:
        assert torch.equal(a["bit_prior"][k], b2["bit_prior"][k]), k
    st = weights.load_checkpoint(tmp_path / "b" / "residual.ckpt")
    from bsqcodec.model.residual import BitPrior

    tok = weights.load(model_file).config.tokenizer
    ctx = BitPrior.context_size(tok.bits, tok.patch // CFG.patch, CFG.bits, True)
    assert st["mixed"] == 0.5 and st["bit_prior"]["net.0.weight"].shape[1] == ctx


def test_the_quad_context_sees_only_earlier_passes_and_the_first_stage_around():
    """Kind quad3x3: a bit flipped in a token changes the logits of exactly its neighbours of later passes; a
    first-stage token changes those of the tokens under it and around it."""
    from bsqcodec.model.residual import BitPrior

    torch.manual_seed(0)
    prior = BitPrior(base_bits=5, ratio=2, bits=4, width=16, kind="quad3x3")
    base = torch.randint(0, 2, (1, 5, 4, 4)).float() * 2 - 1
    bits = torch.randint(0, 2, (1, 4, 8, 8)).float()
    kept = torch.ones(1, 4, 1, 1)
    lg = prior.logits(base, bits, kept)
    ps = BitPrior.quad_pass(8, 8)
    for y, x in ((3, 3), (4, 4), (4, 3), (3, 4)):
        flipped = bits.clone()
        flipped[0, 1, y, x] = 1 - flipped[0, 1, y, x]
        changed = (prior.logits(base, flipped, kept) != lg).any(1)[0]
        want = torch.zeros(8, 8, dtype=torch.bool)
        for dy, dx in BitPrior.NEIGH8:
            if ps[y + dy, x + dx] > ps[y, x]:
                want[y + dy, x + dx] = True
        assert torch.equal(changed, want), (y, x)
    b2 = base.clone()
    b2[0, 0, 1, 1] = -b2[0, 0, 1, 1]
    changed = (prior.logits(b2, bits, kept) != lg).any(1)[0]
    assert changed[0:6, 0:6].all() and not changed[6:, :].any() and not changed[:, 6:].any()
    assert BitPrior.context_size(5, 2, 4, True, "quad3x3") == prior.net[0].weight.shape[1]
    with pytest.raises(ValueError):
        BitPrior(5, 2, 4, kind="hex")


def test_a_quad_context_run_resumes_exactly_and_records_its_kind(data, model_file, tmp_path):
    kw = dict(rate_weight=1e-3, crop=16, mixed=0.5, context="quad3x3")
    a = train_residual(_opts(data, tmp_path / "a", model_file, steps=4, **kw))
    train_residual(_opts(data, tmp_path / "b", model_file, steps=2, **kw))
    b2 = train_residual(_opts(data, tmp_path / "b", model_file, steps=4, resume=True))  # the kind is the run's
    for k in a["bit_prior"]:
        assert torch.equal(a["bit_prior"][k], b2["bit_prior"][k]), k
    from bsqcodec.train.residual import load_run

    run = load_run(tmp_path / "b" / "residual.ckpt")
    assert run.checkpoint["context"] == "quad3x3" and run.prior.kind == "quad3x3" and run.prior.budget
    from bsqcodec.train.export import export_second_run

    smodel = export_second_run(tmp_path / "b", data, tmp_path / "x.safetensors", "x", (0, 2, 6), 300, calib=4)
    assert smodel.config.context == "quad3x3" and smodel.prior.kind == "quad3x3" and smodel.prior.passes == 4
    assert weights.load(tmp_path / "x.safetensors").sha256 == smodel.sha256
    # a run can start from the model file alone (checkpoints may be lost): its coder and bit prior read back
    c = train_residual(_opts(data, tmp_path / "c", model_file, steps=0, init=str(tmp_path / "x.safetensors"), **kw))
    ema = run.checkpoint["ema"]
    for k, v in c["model"].items():
        tol = 1e-3 + ema[k].abs().max() / 100  # int8 per channel, float16
        assert torch.allclose(v, ema[k], atol=float(tol)), k
    assert c["model"].keys() == ema.keys() and not all(torch.equal(v, ema[k]) for k, v in c["model"].items())
    back = copy.deepcopy(run.prior)
    back.load_state_dict(c["bit_prior"])
    nets = [run.prior.net, back.net]
    x = torch.randint(-1, 2, (500, nets[0][0].weight.shape[1], 1, 1), generator=torch.Generator().manual_seed(0)).float()
    with torch.no_grad():
        assert float((nets[0](x) - nets[1](x)).abs().max()) < 0.02  # nats: the same bit prior, up to its export
    with pytest.raises(BsqError, match="not a second-stage model file"):
        train_residual(_opts(data, tmp_path / "d", model_file, steps=0, init=str(model_file), **kw))


def test_a_decoder_only_run_keeps_the_encoder_and_resumes_exactly(data, model_file, tmp_path):
    """--decoder-only --perceptual: the encoder (so every code and file) stays the init's; the decoder learns."""
    init = train_residual(_opts(data, tmp_path / "i", model_file, steps=2))
    kw = dict(init=str(tmp_path / "i" / "residual.ckpt"), decoder_only=True, perceptual=0.5, crop=32, eval_every=3)
    a = train_residual(_opts(data, tmp_path / "a", model_file, steps=3, **kw))
    for k, v in a["model"].items():
        assert torch.equal(v, init["model"][k]) == k.startswith(ResidualCoder.ENCODER), k
    train_residual(_opts(data, tmp_path / "b", model_file, steps=2, **kw))
    b2 = train_residual(_opts(data, tmp_path / "b", model_file, steps=3, resume=True, **{**kw, "init": None}))
    for k in a["model"]:
        assert torch.equal(a["model"][k], b2["model"][k]), k
    from bsqcodec.train.residual import evaluate, load_run

    run = load_run(tmp_path / "a" / "residual.ckpt")
    crops = np.random.default_rng(2).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    base = base_pixels(run.base.tokenizer, crops, None, str(model_file), "t")
    res = evaluate(run.coder, crops, base, (0, 2, 6), ssimulacra2=True)  # held-out SSIMULACRA2, as a run logs it
    s2 = res.pop("ssimulacra2")
    assert res.keys() == {0, 2, 6} and res == evaluate(run.coder, crops, base, (0, 2, 6))
    assert -300 < s2 < 100
    with pytest.raises(BsqError, match="decoder only"):
        train_residual(_opts(data, tmp_path / "d", model_file, steps=1, perceptual=0.5))
    with pytest.raises(BsqError, match="--init"):
        train_residual(_opts(data, tmp_path / "e", model_file, steps=1, decoder_only=True))


def test_a_wider_coder_starts_as_the_narrower_one_on_its_bits():
    torch.manual_seed(0)
    narrow = ResidualCoder(CFG).eval()
    with torch.no_grad():
        for p in narrow.parameters():
            p.normal_(0, 0.3)
    wide = ResidualCoder(ResidualConfig(patch=2, channels=8, bits=10, enc_blocks=1, dec_blocks=1)).eval()
    fresh = wide.to_code.weight[6:].clone()
    wide.load_narrower(narrow.state_dict())
    x, base = torch.rand(2, 3, 12, 8), torch.rand(2, 3, 12, 8)
    lat_n, lat_w = narrow.encode_latent(x, base), wide.encode_latent(x, base)
    assert torch.allclose(lat_w[:, :6], lat_n, atol=1e-6)  # the old bits are the same signs
    assert torch.equal(wide.to_code.weight[6:], fresh)  # the new bits' projections keep their init
    code_w = wide.quant(lat_w)
    code_n = narrow.quant(lat_n)
    for k in (3, 6, 10):  # every budget reads only the old bits' part, scaled to the same +-1 entries
        kept_w = code_w * (torch.arange(10) < k).float()[None, :, None, None]
        kept_n = code_n * (torch.arange(6) < min(k, 6)).float()[None, :, None, None]
        assert torch.allclose(wide.decode_code(kept_w, base), narrow.decode_code(kept_n, base), atol=1e-5), k
    with pytest.raises(ValueError):
        narrow.load_narrower(wide.state_dict())


@pytest.mark.parametrize("kind", ["checker", "quad3x3"])
def test_a_wider_prior_gives_the_old_bits_the_old_logits(kind):
    from bsqcodec.model.residual import BitPrior

    torch.manual_seed(0)
    old = BitPrior(base_bits=5, ratio=2, bits=4, width=16, kind=kind)
    new = BitPrior(base_bits=5, ratio=2, bits=7, width=16, kind=kind)
    new.load_older(old.state_dict())
    base = torch.randint(0, 2, (1, 5, 3, 3)).float() * 2 - 1
    bits = torch.randint(0, 2, (1, 7, 6, 6)).float()
    for k in (1, 3, 4):
        kept_old = (torch.arange(4) < k).float()[None, :, None, None]
        kept_new = (torch.arange(7) < k).float()[None, :, None, None]
        lg_new = new.logits(base, bits, kept_new)
        assert torch.allclose(lg_new[:, :4], old.logits(base, bits[:, :4], kept_old), atol=1e-5), k
        assert torch.equal(lg_new[:, 4:], torch.zeros_like(lg_new[:, 4:]))  # new bits start at p = 1/2
    kept = torch.ones(1, 7, 1, 1)
    flipped = bits.clone()
    flipped[:, 5] = 1 - flipped[:, 5]
    assert torch.equal(new.logits(base, bits, kept), new.logits(base, flipped, kept))  # new bits read at zero weight
    old_flip = bits.clone()
    old_flip[:, 1] = 1 - old_flip[:, 1]
    assert not torch.allclose(new.logits(base, bits, kept), new.logits(base, old_flip, kept))  # old ones as before
