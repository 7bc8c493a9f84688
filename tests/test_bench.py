import csv
import dataclasses
import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from bsqcodec.bench import baselines, bench
from bsqcodec.codec import codec
from bsqcodec.model import weights
from bsqcodec.cli.cli import app
from bsqcodec.metrics import psnr

from conftest import image_folder, smooth_image


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = image_folder(tmp_path_factory.mktemp("imgs"), [(64 + 8 * i, 48) for i in range(3)], 3)
    (root / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def result(folder, tiny_model):
    return bench.run(folder, [tiny_model], codecs=(baselines.JPEG, baselines.WEBP))


class TestBench:
    def test_bytes_are_real_file_sizes(self, folder, result, tiny_model):
        for row in result["per_image"]:
            arr = np.asarray(Image.open(folder / row["image"]).convert("RGB"))
            data = codec.encode_array(arr, tiny_model).data
            b = row["bsqc"]["tiny"]
            assert b["bytes"] == len(data)
            assert b["bpp"] == pytest.approx(len(data) * 8 / arr[..., 0].size)

    def test_matched_baselines_reach_target(self, folder, result):
        for row in result["per_image"]:
            arr = np.asarray(Image.open(folder / row["image"]).convert("RGB"))
            target = row["bsqc"]["tiny"]["psnr"]
            for name, m in row["matched"]["tiny"].items():
                c = {"jpeg": baselines.JPEG, "webp": baselines.WEBP}[name]
                data = baselines.encode(arr, c, m["quality"])
                assert len(data) == m["bytes"]
                assert psnr(arr, baselines.decode(data)) >= target
                assert m["psnr"] >= target

    def test_ratios_follow_from_bytes(self, result):
        t = result["totals"]["tiny"]
        for name, m in t["matched"].items():
            rows = [r for r in result["per_image"] if r["matched"]["tiny"][name]]
            assert m["bytes"] == sum(r["matched"]["tiny"][name]["bytes"] for r in rows)
            assert m["ratio"] == pytest.approx(m["bytes"] / sum(r["bsqc"]["tiny"]["bytes"] for r in rows))
        assert t["png_ratio"] == pytest.approx(t["png_bytes"] / t["bsqc_bytes"])
        assert result["images"] == 3

    def test_several_presets_give_curves_and_bd_rate(self, folder):
        from conftest import TINY

        models = [weights.random_model(dataclasses.replace(TINY, name=f"t{i}", tokenizer=dataclasses.replace(TINY.tokenizer, patch=p)), seed=i)
                  for i, p in enumerate((2, 3, 4, 6))]
        res = bench.run(folder, models, limit=1, codecs=(baselines.JPEG,))
        assert len(res["curves"]["bsqc"]) == 4 and len(res["curves"]["jpeg"]) == len(bench.SWEEP["jpeg"])
        assert "jpeg" in res["bd_rate_psnr"]


def test_cli_bench(folder, tiny_model, tmp_path):
    mf = tmp_path / "m.safetensors"
    weights.save(tiny_model, mf)
    out = tmp_path / "r.json"
    r = CliRunner().invoke(app, ["bench", str(folder), "--model", str(mf), "--json", str(out), "--csv", str(tmp_path / "r.csv"),
                                 "--plot", str(tmp_path / "r.png"), "--limit", "2", "--sweep", "--quiet"])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert res["schema"] == bench.SCHEMA and res["images"] == 2
    for key in ("totals", "curves", "bd_rate_psnr", "per_image", "baselines", "notes", "models"):
        assert key in res
    assert Image.open(tmp_path / "r.png").size[0] > 100
    rows = list(csv.DictReader(open(tmp_path / "r.csv")))
    assert {r["codec"] for r in rows} >= {"bsqc", "jpeg", "png"}
    assert "JPEG" in r.stdout


def test_cli_bench_refuses_two_models_of_one_name(folder, tiny_model, tmp_path):
    """Results are keyed by a model's name: a --model file named as another model would replace its rows."""
    for f in ("a", "b"):
        weights.save(tiny_model, tmp_path / f"{f}.safetensors")
    r = CliRunner().invoke(app, ["bench", str(folder), "--model", str(tmp_path / "a.safetensors"), "--model",
                                 str(tmp_path / "b.safetensors"), "--json", str(tmp_path / "r.json"), "--quiet"])
    assert r.exit_code == 1 and f"two models named {tiny_model.name!r}" in r.output
    assert not (tmp_path / "r.json").exists()


def test_searches_sharing_a_cache_find_what_separate_searches_find(folder, monkeypatch):
    arr = np.asarray(Image.open(folder / "img1.png").convert("RGB"))
    targets = [26.0, 29.5, 30.0, 33.0, 45.0, 80.0]
    alone = [baselines.matched(arr, baselines.JPEG, t) for t in targets]
    calls = []
    real = baselines.at_quality
    monkeypatch.setattr(baselines, "at_quality", lambda a, c, q: calls.append(q) or real(a, c, q))
    cache: dict = {}
    shared = [baselines.matched(arr, baselines.JPEG, t, cache) for t in targets]
    assert [p and (p.quality, p.bytes) for p in shared] == [p and (p.quality, p.bytes) for p in alone]
    assert alone[-1] is None and alone[0] is not None
    assert len(calls) == len(set(calls)) == len(cache)  # every quality encoded once across the searches


def test_ssimulacra2_of_identical_images_is_100_and_it_falls_with_damage():
    from bsqcodec.metrics import ssimulacra2

    rng = np.random.default_rng(4)
    a = np.asarray(smooth_image(rng, 64, 48))
    noisy = np.clip(a.astype(int) + rng.integers(-20, 21, a.shape), 0, 255).astype(np.uint8)
    worse = np.clip(a.astype(int) + rng.integers(-60, 61, a.shape), 0, 255).astype(np.uint8)
    assert ssimulacra2(a, a) == pytest.approx(100.0, abs=1e-6)
    assert 100 > ssimulacra2(a, noisy) > ssimulacra2(a, worse)


def test_bench_matches_codecs_at_ssimulacra2(folder, tiny_model, tmp_path):
    """--metric ssimulacra2: each baseline's file is its smallest one that reaches bsqc's SSIMULACRA2 on that image."""
    from bsqcodec.metrics import ssimulacra2

    res = bench.run(folder, [tiny_model], limit=2, codecs=(baselines.JPEG,), metric="ssimulacra2")
    assert res["metric"] == "ssimulacra2" and "bd_rate_ssimulacra2" in res
    for row in res["per_image"]:
        b, m = row["bsqc"]["tiny"], row["matched"]["tiny"]["jpeg"]
        arr = np.asarray(Image.open(folder / row["image"]).convert("RGB"))
        assert m["ssimulacra2"] >= b["ssimulacra2"]
        got = ssimulacra2(arr, baselines.decode(baselines.encode(arr, baselines.JPEG, m["quality"])))
        assert got == pytest.approx(m["ssimulacra2"])
        below = [q for q in range(1, m["quality"]) if len(baselines.encode(arr, baselines.JPEG, q)) < m["bytes"]]
        for q in below[-3:]:  # smaller JPEG files just below it do not reach the score
            assert ssimulacra2(arr, baselines.decode(baselines.encode(arr, baselines.JPEG, q))) < b["ssimulacra2"]
    t = res["totals"]["tiny"]
    assert t["mean_ssimulacra2"] == pytest.approx(np.mean([r["bsqc"]["tiny"]["ssimulacra2"] for r in res["per_image"]]))
    assert b"ssimulacra2" in bench.csv_bytes(res).splitlines()[0]


def test_a_second_stage_rung_is_benched_like_the_others(folder, tiny_model):
    """Its bytes are its real files' and its PSNR its decoder's; named q6 it is a rung of the ladder's curve."""
    from test_second import tiny_second

    q6 = tiny_second(tiny_model, name="q6")
    res = bench.run(folder, [tiny_model, q6], codecs=(baselines.JPEG,), effort=1)
    for img in sorted(folder.glob("*.png")):
        arr = np.asarray(Image.open(img).convert("RGB"))
        data = codec.encode_array(arr, q6, effort=1, models=[tiny_model]).data
        row = next(r for r in res["per_image"] if r["image"] == img.name)
        assert row["bsqc"]["q6"]["bytes"] == len(data)
        assert row["bsqc"]["q6"]["psnr"] == pytest.approx(psnr(arr, codec.decode_detailed(data, [tiny_model, q6])[2]))
    assert "q6" in bench.LADDER_NAMES and {p["preset"] for p in res["curves"]["bsqc"]} == {"tiny", "q6"}


def test_bench_scores_a_look_and_keeps_the_faithful_scores(folder, tiny_model, tmp_path):
    """--look sharp: bsqc's files are decoded with the look model and matched at its scores; each file's
    faithful scores are kept beside them."""
    from bsqcodec.metrics import ssimulacra2
    from test_look import tiny_sharp

    sharp = tiny_sharp(tiny_model)
    res = bench.run(folder, [tiny_model, sharp], limit=2, codecs=(baselines.JPEG,), metric="ssimulacra2", look="sharp")
    assert res["look"] == "sharp" and list(res["totals"]) == ["tiny"]
    for row in res["per_image"]:
        arr = np.asarray(Image.open(folder / row["image"]).convert("RGB"))
        data = codec.encode_array(arr, tiny_model).data
        b = row["bsqc"]["tiny"]
        got = np.asarray(codec.decode(data, [tiny_model, sharp], look="sharp"))
        plain = np.asarray(codec.decode(data, [tiny_model]))
        assert b["psnr"] == pytest.approx(psnr(arr, got)) and b["ssimulacra2"] == pytest.approx(ssimulacra2(arr, got))
        assert b["faithful"]["ssimulacra2"] == pytest.approx(ssimulacra2(arr, plain)) != b["ssimulacra2"]
        assert row["matched"]["tiny"]["jpeg"]["ssimulacra2"] >= b["ssimulacra2"]
    t = res["totals"]["tiny"]["faithful"]
    assert t["mean_ssimulacra2"] == pytest.approx(np.mean([r["bsqc"]["tiny"]["faithful"]["ssimulacra2"] for r in res["per_image"]]))
    with pytest.raises(Exception, match="unknown look"):
        bench.run(folder, [tiny_model], limit=1, look="blurry")


def test_cli_bench_takes_a_look(folder, tiny_model, tmp_path):
    from test_look import tiny_sharp

    weights.save(tiny_model, tmp_path / "tiny.safetensors")
    weights.save(tiny_sharp(tiny_model), tmp_path / "sharp.safetensors")
    r = CliRunner().invoke(app, ["bench", str(folder), "--model", str(tmp_path / "tiny.safetensors"), "--model",
                                 str(tmp_path / "sharp.safetensors"), "--look", "sharp", "--limit", "1", "--no-sweep",
                                 "--quiet", "--json", str(tmp_path / "r.json")])
    assert r.exit_code == 0, r.output
    assert "the sharp look" in r.output and "PSNR faithful" in r.output
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["look"] == "sharp" and "faithful" in res["totals"]["tiny"]
