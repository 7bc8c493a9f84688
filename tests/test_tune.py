"""`--tune sharp`: the encoder's search aims at the sharp look (its decoder and SSIMULACRA2) instead of the
model's own decoder and squared error. The files are the same kind and decode with either look."""

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from typer.testing import CliRunner

from bsqcodec import perceptual
from bsqcodec.bench import baselines, bench
from bsqcodec.cli.cli import app
from bsqcodec.codec import codec, search
from bsqcodec.errors import BsqError, ModelNotFoundError
from bsqcodec.model import look, weights

from conftest import image_folder, smooth_image
from test_look import tiny_sharp


@pytest.fixture(scope="module")
def photo():
    return np.asarray(smooth_image(np.random.default_rng(21), 45, 27))


@pytest.fixture(scope="module")
def sharp(tiny_model):
    return tiny_sharp(tiny_model)


def sharp_score(data: bytes, arr: np.ndarray) -> float:
    """The sharp look's SSIMULACRA2 of a file (the differentiable copy: no optional package needed)."""
    px = np.asarray(codec.decode(data, look="sharp"))
    return float(perceptual.score(perceptual.to_tensor(arr), perceptual.to_tensor(px))[0])


def textured(rng, width: int, height: int) -> np.ndarray:
    """A smooth_image with fine grain on it: detail for a perceptual score to find missing."""
    base = np.asarray(smooth_image(rng, width, height)).astype(np.float32)
    grain = Image.fromarray(rng.integers(0, 256, (height, width), dtype="uint8")).filter(ImageFilter.GaussianBlur(0.8))
    return np.clip(base + (np.asarray(grain, np.float32)[..., None] - 128) * 0.6, 0, 255).astype(np.uint8)


def test_a_tuned_search_scores_higher_in_the_sharp_look_with_the_shipped_model():
    arr = textured(np.random.default_rng(5), 128, 96)  # under 256 pixels: the metric's layout of fewer scales
    m = weights.preset("default")
    plain, tuned = (codec.encode_array(arr, m, tune=t) for t in ("faithful", "sharp"))
    assert sharp_score(tuned.data, arr) > sharp_score(plain.data, arr) + 5  # about +18 here
    for data, enc in ((plain.data, plain), (tuned.data, tuned)):  # the same kind of file: both looks decode it
        _, tokens, _ = codec.decode_detailed(data, look="sharp")
        assert torch.equal(tokens, enc.tokens)


def test_the_tuned_search_uses_the_looks_decoder_and_its_file_decodes_either_way(tiny_model, sharp, photo):
    plain = codec.encode_array(photo, tiny_model)
    tuned = codec.encode_array(photo, tiny_model, models=[tiny_model, sharp], tune="sharp")
    assert not torch.equal(plain.tokens, tuned.tokens)
    for lk in ("faithful", "sharp"):
        _, tokens, px = codec.decode_detailed(tuned.data, [tiny_model, sharp], look=lk)
        assert torch.equal(tokens, tuned.tokens) and px.shape == photo.shape
    other = tiny_sharp(tiny_model, seed=1)  # another look's decoder: other tokens
    assert not torch.equal(codec.encode_array(photo, tiny_model, models=[other], tune="sharp").tokens, tuned.tokens)
    assert codec.encode(photo, tiny_model) == plain.data  # the default is the faithful search


def test_what_cannot_be_tuned_is_refused_before_any_work(tiny_model, sharp, photo):
    with pytest.raises(BsqError, match="unknown tune 'blurry'"):
        codec.encode_array(photo, tiny_model, tune="blurry")
    with pytest.raises(ModelNotFoundError, match="no sharp look"):
        codec.encode_array(photo, tiny_model, tune="sharp")
    with pytest.raises(BsqError, match="effort 1 does not search"):
        codec.encode_array(photo, tiny_model, effort=1, models=[sharp], tune="sharp")
    with pytest.raises(BsqError, match="two-stage rung 'q6'"):
        codec.tuned_look(weights.preset("q6"), "sharp", 4)
    with pytest.raises(ValueError, match="give a preset"):
        codec.encode(photo, target_size=10_000, tune="sharp")
    assert codec.tuned_look(tiny_model, "faithful", 1) is None
    assert isinstance(codec.tuned_look(weights.preset("q1"), "sharp", 4), look.LookModel)  # every one-stage rung has one


def test_cli_encode_and_bench_take_tune(tmp_path, tiny_model, sharp, photo):
    weights.save(tiny_model, tmp_path / "tiny.safetensors")
    weights.save(sharp, tmp_path / "sharp.safetensors")
    Image.fromarray(photo).save(tmp_path / "a.png")
    models = ["--model", str(tmp_path / "tiny.safetensors"), "--model", str(tmp_path / "sharp.safetensors")]
    r = CliRunner().invoke(app, ["encode", str(tmp_path / "a.png"), *models, "--tune", "sharp", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output.strip().splitlines()[-1])
    data = (tmp_path / "a.bsq").read_bytes()
    assert res["tune"] == "sharp" and data == codec.encode_array(photo, tiny_model, models=[sharp], tune="sharp").data
    for args, msg in ((["-e", "1"], "effort 1 does not search"), (["--target-size", "900"], "not a target"),
                      (["--tune", "blurry"], "unknown tune")):
        r = CliRunner().invoke(app, ["encode", str(tmp_path / "a.png"), "-o", str(tmp_path / "b.bsq"), "--tune", "sharp",
                                     *(models if "--target-size" not in args else []), *args])
        assert r.exit_code == 1 and msg in r.output, r.output
        assert not (tmp_path / "b.bsq").exists()
    (tmp_path / "imgs").mkdir()
    folder = image_folder(tmp_path / "imgs", [(40, 32)], 2)
    res = bench.run(folder, [tiny_model, sharp], codecs=(baselines.JPEG,), look="sharp", tune="sharp")
    row = res["per_image"][0]
    arr = np.asarray(Image.open(folder / row["image"]).convert("RGB"))
    assert res["tune"] == "sharp"
    assert res["tuned_search"] == {"steps_times": search.TUNED_STEPS, "lr_first": search.TUNED_LR[0], "lr_last": search.TUNED_LR[1]}
    assert row["bsqc"]["tiny"]["bytes"] == len(codec.encode_array(arr, tiny_model, models=[sharp], tune="sharp").data)


def test_pillow_save_takes_tune(tmp_path):
    arr = textured(np.random.default_rng(7), 64, 48)
    Image.fromarray(arr).save(tmp_path / "a.bsq", quality=3, tune="sharp")
    assert (tmp_path / "a.bsq").read_bytes() == codec.encode(arr, "default", tune="sharp") != codec.encode(arr, "default")


def test_a_tuned_search_of_a_large_image_goes_in_strips(tiny_model, sharp, monkeypatch):
    arr = textured(np.random.default_rng(8), 40, 64)  # 16 rows of 10 tokens
    monkeypatch.setattr(search, "WINDOW_TOKENS", 40)  # strips of 4 token rows
    seen, whole = [], []
    score = search._Search._perceptual
    monkeypatch.setattr(search._Search, "_perceptual", staticmethod(lambda r, d, w: whole.append(w) or score(r, d, w)))
    enc = codec.encode_array(arr, tiny_model, effort=2, models=[sharp], tune="sharp",
                             progress=lambda s, d, t: seen.append((s, d, t)))
    steps = search.ITERATIONS[2] * search.TUNED_STEPS
    assert [x for x in seen if x[0] == "search"] == [("search", i, 4 * steps) for i in range(1, 4 * steps + 1)]
    assert whole == [False] * 4 * (steps + 1)  # each strip scored as a part of a larger image, each step and its last codes
    _, tokens, _ = codec.decode_detailed(enc.data, [tiny_model, sharp], look="sharp")
    assert torch.equal(tokens, enc.tokens)


def test_a_tuned_search_steps_its_learning_rate_down_in_a_straight_line(tiny_model, sharp, monkeypatch):
    from bsqcodec.codec import adam

    first, last = search.TUNED_LR
    assert first > last > 0
    assert search.tuned_learning_rate(1, 16) == first and search.tuned_learning_rate(16, 16) == pytest.approx(last)
    assert search.tuned_learning_rate(1, 1) == first
    rates = {}
    step = adam.Adam.step
    monkeypatch.setattr(adam.Adam, "step", lambda self, g: rates.setdefault(id(self), []).append(self.lr) or step(self, g))
    arr = textured(np.random.default_rng(9), 32, 24)
    codec.encode_array(arr, tiny_model, effort=2, models=[sharp], tune="sharp")
    n = search.ITERATIONS[2] * search.TUNED_STEPS
    (seen,) = rates.values()
    assert seen == pytest.approx([first + (last - first) * i / (n - 1) for i in range(n)])
    rates.clear()
    codec.encode_array(arr, tiny_model, effort=2)  # the squared-error search keeps its own schedule
    (seen,) = rates.values()
    assert seen == [search.learning_rate(i) for i in range(1, search.ITERATIONS[2] + 1)]


def test_a_reference_scores_exactly_as_its_image_does():
    """The search scores every step against a Reference of its target: the same numbers and gradients."""
    rng = np.random.default_rng(11)
    for h, w in ((40, 56), (300, 260)):  # fewer scales, and all of them
        ref = perceptual.to_tensor(textured(rng, w, h))
        dist = (ref + torch.from_numpy(rng.normal(0, 0.05, ref.shape))).clamp(0, 1)
        for full in (False, True):
            got = []
            for r in (ref, perceptual.Reference(ref)):
                d = dist.clone().requires_grad_(True)
                s = perceptual.score(r, d, full_layout=full)
                (g,) = torch.autograd.grad(s.sum(), [d])
                got.append((s, g))
            assert torch.equal(got[0][0], got[1][0]) and torch.equal(got[0][1], got[1][1])


def test_a_tuned_search_keeps_its_best_codes_not_its_last(tiny_model, sharp, monkeypatch):
    """A last step far too long ruins the codes; the search then ends where it was before that step."""
    arr = textured(np.random.default_rng(10), 32, 24)
    model_latent, costs = codec.search_inputs(tiny_model, arr)
    lam = search.rate_weight(tiny_model.config.tokenizer.bits)

    def tokens(steps):
        return search.refine(tiny_model.tokenizer, model_latent, arr, steps, costs, lam, look=sharp.tokenizer)

    monkeypatch.setattr(search, "tuned_learning_rate", lambda i, n: 0.009)
    before = tokens(3)
    monkeypatch.setattr(search, "tuned_learning_rate", lambda i, n: 0.009 if i < n else 50.0)
    assert torch.equal(tokens(4), before)
    monkeypatch.setattr(search, "KEEP_BEST", False)
    assert not torch.equal(tokens(4), before)  # the long step did change the codes
