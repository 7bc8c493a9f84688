import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from bsqcodec.format import container
from bsqcodec.model import weights
from bsqcodec.cli.cli import app

runner = CliRunner()


@pytest.fixture
def photo(tmp_path):
    rng = np.random.default_rng(0)
    arr = np.asarray(Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((37, 29)))
    p = tmp_path / "photo.bmp"
    Image.fromarray(arr).save(p)
    return p


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_error_line(result):
    lines = [l for l in result.output.strip().splitlines() if l.strip()]
    assert result.exit_code == 1, result.output
    assert len(lines) == 1 and lines[0].startswith("bsqc: error:"), result.output
    assert "Traceback" not in result.output
    return lines[0]


class TestEncodeDecode:
    def test_round_trip_with_defaults(self, photo, model_file):
        r = run("encode", photo, "--model", model_file, "--json")
        assert r.exit_code == 0, r.output
        res = json.loads(r.stdout)
        bsq = photo.with_suffix(".bsq")
        assert res["bytes"] == bsq.stat().st_size
        assert res["bpp"] == pytest.approx(res["bytes"] * 8 / (37 * 29))
        for k in ("tokens", "token_bits", "estimated_bits", "psnr", "seconds"):
            assert k in res
        r = run("decode", bsq, "--model", model_file, "--json")
        assert r.exit_code == 0, r.output
        out = photo.with_suffix(".png")
        assert Image.open(out).size == (37, 29)

    def test_output_format_follows_extension(self, photo, model_file, tmp_path):
        bsq = tmp_path / "x.bsq"
        assert run("encode", photo, "-o", bsq, "--model", model_file, "--quiet").exit_code == 0
        for ext, fmt in ((".jpg", "JPEG"), (".webp", "WEBP"), (".png", "PNG")):
            out = tmp_path / f"x{ext}"
            r = run("decode", bsq, "-o", out, "--model", model_file, "--batch-tiles", "2", "--quiet")
            assert r.exit_code == 0, r.output
            assert Image.open(out).format == fmt

    def test_info(self, photo, model_file):
        run("encode", photo, "--model", model_file, "--quiet")
        r = run("info", photo.with_suffix(".bsq"), "--json")
        assert r.exit_code == 0, r.output
        d = json.loads(r.stdout)
        assert d["width"] == 37 and d["height"] == 29 and d["checksums"] == "ok"
        assert d["bytes"] == photo.with_suffix(".bsq").stat().st_size
        assert d["version"] == "2.0" and d["preset"] == "tiny" and "tCRC" in d["chunks"]
        r = run("info", photo.with_suffix(".bsq"))
        assert r.exit_code == 0 and "model" in r.stdout

    def test_modes_and_orientation(self, tmp_path, model_file):
        rng = np.random.default_rng(1)
        cases = {
            "gray.png": Image.fromarray(rng.integers(0, 256, (10, 12), dtype=np.uint8), "L"),
            "pal.png": Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).convert("P"),
            "deep.png": Image.fromarray(rng.integers(0, 65535, (10, 12), dtype=np.uint16)),
            "alpha.png": Image.fromarray(rng.integers(0, 256, (10, 12, 4), dtype=np.uint8), "RGBA"),
        }
        for name, img in cases.items():
            img.save(tmp_path / name)
            r = run("encode", tmp_path / name, "--model", model_file, "--json")
            assert r.exit_code == 0, (name, r.output)
            assert json.loads(r.stdout)["width"] == 12
        exif = Image.Exif()
        exif[0x0112] = 6  # rotate 90 degrees on display
        Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(tmp_path / "rot.jpg", exif=exif)
        r = run("encode", tmp_path / "rot.jpg", "--model", model_file, "--json")
        assert json.loads(r.stdout)["width"] == 10

    def test_alpha_warning(self, tmp_path, model_file):
        a = np.zeros((5, 5, 4), np.uint8)
        Image.fromarray(a, "RGBA").save(tmp_path / "t.png")
        r = run("encode", tmp_path / "t.png", "--model", model_file, "--quiet")
        assert r.exit_code == 0 and "flattened" in r.output


class TestErrors:
    def test_invalid_missing_input(self, tmp_path):
        assert "no such file" in one_error_line(run("encode", tmp_path / "nope.png"))

    def test_invalid_not_an_image(self, tmp_path):
        p = tmp_path / "x.png"
        p.write_text("hello")
        assert "not an image" in one_error_line(run("encode", p))

    def test_invalid_existing_output(self, photo, model_file):
        photo.with_suffix(".bsq").write_bytes(b"keep")
        assert "--force" in one_error_line(run("encode", photo, "--model", model_file))
        assert photo.with_suffix(".bsq").read_bytes() == b"keep"
        assert run("encode", photo, "--model", model_file, "--force", "--quiet").exit_code == 0

    def test_invalid_corrupt_and_truncated(self, photo, model_file, tmp_path):
        run("encode", photo, "--model", model_file, "--quiet")
        data = photo.with_suffix(".bsq").read_bytes()
        bad = tmp_path / "bad.bsq"
        for blob in (data[: len(data) // 2], data[:-1], data[:5] + bytes([data[5] ^ 1]) + data[6:], b"", b"BSQC"):
            bad.write_bytes(blob)
            one_error_line(run("decode", bad, "--model", model_file, "-o", tmp_path / "o.png", "--force"))
            one_error_line(run("info", bad))
        assert not (tmp_path / "o.png").exists()
        assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

    def test_invalid_unknown_version(self, photo, model_file, tmp_path):
        run("encode", photo, "--model", model_file, "--quiet")
        data = bytearray(photo.with_suffix(".bsq").read_bytes())
        data[4] = 9
        (tmp_path / "v.bsq").write_bytes(bytes(data))
        assert "version" in one_error_line(run("info", tmp_path / "v.bsq"))

    def test_invalid_unknown_model(self, photo, model_file, tmp_path):
        run("encode", photo, "--model", model_file, "--quiet")
        line = one_error_line(run("decode", photo.with_suffix(".bsq"), "-o", tmp_path / "o.png"))
        assert "'tiny'" in line and "not installed" in line

    def test_invalid_retired_model_names_its_release(self, photo, model_file, tmp_path, monkeypatch):
        run("encode", photo, "--model", model_file, "--quiet")
        bsq = photo.with_suffix(".bsq")
        header, _ = container.unpack(bsq.read_bytes())
        monkeypatch.setattr(weights, "retired", lambda: {header.model_hash.hex(): {"name": "tiny", "release": "0.0.7"}})
        line = one_error_line(run("decode", bsq, "-o", tmp_path / "o.png"))
        assert "'tiny'" in line and "bsqcodec 0.0.7" in line and "pip install bsqcodec==0.0.7" in line
        assert not (tmp_path / "o.png").exists()

    def test_invalid_huge_dimensions(self, tmp_path, model_file):
        p = tmp_path / "huge.png"
        # a PNG header claiming 20000 x 20000 pixels
        Image.new("L", (20000, 1)).save(p)
        assert "1..16384" in one_error_line(run("encode", p, "--model", model_file))

    def test_invalid_unknown_preset(self, photo):
        assert "unknown preset" in one_error_line(run("encode", photo, "--preset", "nope"))

    def test_invalid_bad_model_file(self, photo, tmp_path):
        p = tmp_path / "m.safetensors"
        p.write_bytes(b"junk")
        assert "model" in one_error_line(run("encode", photo, "--model", p))


def test_installed_entry_point(photo, model_file, tmp_path):
    exe = shutil.which("bsqc")
    cmd = [exe] if exe else [sys.executable, "-c", "from bsqcodec.cli.cli import main; main()"]
    r = subprocess.run(cmd + ["encode", str(photo), "--model", str(model_file), "-o", str(tmp_path / "a.bsq"), "--json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["bytes"] == (tmp_path / "a.bsq").stat().st_size
    r = subprocess.run(cmd + ["decode", str(tmp_path / "nothing.bsq")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def test_outputs_get_the_usual_file_mode(tmp_path):
    import os

    from bsqcodec.codec.fileio import write_atomic

    out = tmp_path / "x.bsq"
    write_atomic(out, b"data", False)
    mask = os.umask(0)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's 0600
