"""bsqc in a user's tools: pipes, several files per call, targets, bench outputs, the Pillow plugin."""

import json
import re
import shutil
import subprocess
import sys

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import bsqcodec
from bsqcodec.codec import codec
from bsqcodec.model import weights
from bsqcodec.cli.cli import app
from bsqcodec.errors import TargetError
from bsqcodec.model.second import SecondModel

from conftest import smooth_image

runner = CliRunner()


def run(*args, input=None):
    return runner.invoke(app, [str(a) for a in args], input=input)


@pytest.fixture
def photos(tmp_path):
    rng = np.random.default_rng(5)
    paths = []
    for i, (w, h) in enumerate(((37, 29), (20, 24), (41, 9))):
        p = tmp_path / f"p{i}.png"
        smooth_image(rng, w, h).save(p)
        paths.append(p)
    return paths


def _cmd():
    exe = shutil.which("bsqc")
    return [exe] if exe else [sys.executable, "-c", "from bsqcodec.cli.cli import main; main()"]


class TestPipes:
    def test_stdin_to_stdout_gives_the_file_bytes_and_pixels(self, photos, model_file, tmp_path):
        """`cat a.png | bsqc encode - -o - > a.bsq` and `bsqc decode - -o - < a.bsq`, in a real process."""
        cmd = _cmd()
        ref = tmp_path / "ref.bsq"
        assert subprocess.run(cmd + ["encode", str(photos[0]), "-o", str(ref), "--model", str(model_file), "--quiet"],
                              timeout=300).returncode == 0
        r = subprocess.run(cmd + ["encode", "-", "-o", "-", "--model", str(model_file)], input=photos[0].read_bytes(),
                           capture_output=True, timeout=300)
        assert r.returncode == 0, r.stderr
        assert r.stdout == ref.read_bytes()  # nothing else on standard output
        r = subprocess.run(cmd + ["decode", "-", "-o", "-", "--model", str(model_file)], input=ref.read_bytes(),
                           capture_output=True, timeout=300)
        assert r.returncode == 0, r.stderr
        piped = tmp_path / "piped.png"
        piped.write_bytes(r.stdout)
        assert Image.open(piped).format == "PNG"
        dec = tmp_path / "file.png"
        assert run("decode", ref, "-o", dec, "--model", model_file, "--quiet").exit_code == 0
        assert np.array_equal(np.asarray(Image.open(piped)), np.asarray(Image.open(dec)))

    def test_stdout_format_and_json_go_elsewhere(self, photos, model_file):
        data = codec.encode(Image.open(photos[0]), weights.load(model_file))
        r = run("decode", "-", "-o", "-", "--format", "jpg", "--model", model_file, "--json", input=data)
        assert r.exit_code == 0, r.output
        assert r.stdout_bytes[:2] == b"\xff\xd8"  # a JPEG, and only the JPEG
        assert json.loads(r.stderr)["width"] == 37

    def test_stdin_input_defaults_to_stdout(self, photos, model_file):
        r = run("encode", "-", "--model", model_file, "--quiet", input=photos[1].read_bytes())
        assert r.exit_code == 0, r.output
        assert r.stdout_bytes[:4] == b"BSQC"

    def test_bad_stdin_is_one_line(self, model_file):
        for data in (b"", b"not an image"):
            r = run("encode", "-", "-o", "-", "--model", model_file, input=data)
            assert r.exit_code == 1 and r.stdout_bytes == b"" and r.stderr.startswith("bsqc: error:")


class TestBatches:
    def test_encode_and_decode_folders(self, photos, model_file, tmp_path):
        out, dec = tmp_path / "out", tmp_path / "dec"
        out.mkdir()
        dec.mkdir()
        r = run("encode", *photos, "--out-dir", out, "--model", model_file, "--json")
        assert r.exit_code == 0, r.output
        rows = [json.loads(line) for line in r.stdout.splitlines()]
        assert [row["input"] for row in rows] == [str(p) for p in photos]
        for p in photos:
            single = tmp_path / "single.bsq"
            assert run("encode", p, "-o", single, "--model", model_file, "--quiet", "--force").exit_code == 0
            assert (out / (p.stem + ".bsq")).read_bytes() == single.read_bytes()
        r = run("decode", *sorted(out.glob("*.bsq")), "--out-dir", dec, "--model", model_file)
        assert r.exit_code == 0, r.output
        assert "decoded 3 of 3 files" in r.stdout
        for p in photos:
            assert Image.open(dec / (p.stem + ".png")).size == Image.open(p).size

    def test_a_failing_input_does_not_stop_the_others(self, photos, model_file, tmp_path):
        bad = tmp_path / "bad.png"
        bad.write_text("no image")
        out = tmp_path / "out"
        out.mkdir()
        r = run("encode", photos[0], bad, tmp_path / "missing.png", photos[1], "--out-dir", out, "--model", model_file)
        assert r.exit_code == 1
        errors = [line for line in r.stderr.splitlines() if line.startswith("bsqc: error:")]
        assert len(errors) == 2 and "bad.png" in errors[0] and "missing.png" in errors[1]
        assert sorted(p.name for p in out.iterdir()) == ["p0.bsq", "p1.bsq"]
        assert "Traceback" not in r.output

    def test_conflicting_outputs_are_refused_before_any_work(self, photos, model_file, tmp_path):
        photos[0].with_suffix(".jpg").write_bytes(photos[0].read_bytes())
        r = run("encode", photos[0], photos[0].with_suffix(".jpg"), "--model", model_file)
        assert r.exit_code == 1 and "both" in r.stderr
        assert not photos[0].with_suffix(".bsq").exists()
        assert run("encode", *photos[:2], "-o", tmp_path / "x.bsq").exit_code == 1


class TestTargets:
    def test_target_size_picks_the_best_rung_that_fits(self, photos):
        arr = np.asarray(Image.open(photos[0]).convert("RGB"))
        models = codec.ladder_models()
        sizes = [len(codec.encode_array(arr, m).data) for m in models]
        for limit in sorted(set(sizes)):
            enc, m = codec.encode_to_target(arr, target_size=limit)
            best = max(i for i, s in enumerate(sizes) if s <= limit)
            assert m.name == models[best].name and len(enc.data) == sizes[best]
        with pytest.raises(TargetError):
            codec.encode_to_target(arr, target_size=min(sizes) - 1)
        data = bsqcodec.encode(Image.open(photos[0]), target_size=max(sizes))
        assert len(data) == max(sizes)

    def test_target_psnr_picks_the_smallest_rung_that_reaches_it(self, photos):
        arr = np.asarray(Image.open(photos[0]).convert("RGB"))
        models = codec.ladder_models()

        def decoded(m, effort):  # what a file of rung m decodes to (a second-stage rung: its whole file's pixels)
            if isinstance(m, SecondModel):
                return codec.encode_array(arr, m, effort=effort).pixels()
            return codec.tokens_to_array(m, codec.search_tokens(m, arr, effort), arr.shape[1], arr.shape[0])

        for effort in (1, 3):
            q = [codec.psnr(arr, decoded(m, effort)) for m in models]
            goal = q[2] - 1e-9
            enc, m = codec.encode_to_target(arr, target_psnr=goal, effort=effort)
            assert m.name == models[min(i for i, v in enumerate(q) if v >= goal)].name
            assert codec.psnr(arr, codec.decode_detailed(enc.data)[2]) >= goal
            with pytest.raises(TargetError):
                codec.encode_to_target(arr, target_psnr=max(q) + 1, effort=effort)

    def test_cli_target_size_fails_cleanly(self, photos, tmp_path):
        r = run("encode", photos[0], "--target-size", "10", "-o", tmp_path / "x.bsq")
        assert r.exit_code == 1 and "no quality fits in 10 bytes" in r.stderr
        assert not (tmp_path / "x.bsq").exists()
        r = run("encode", photos[0], "--target-size", "100000", "-o", tmp_path / "x.bsq", "--json")
        assert r.exit_code == 0 and json.loads(r.stdout)["preset"] == codec.ladder_models()[-1].name  # the top rung fits


class TestPillowPlugin:
    def test_open_gives_the_decoded_pixels_lazily(self, photos, tmp_path):
        data = codec.encode(Image.open(photos[0]))
        p = tmp_path / "a.bsq"
        p.write_bytes(data)
        im = Image.open(p)
        assert im.format == "BSQ" and im.size == (37, 29) and im.mode == "RGB"
        assert im.info["bsq_preset"] == "default" and weights.preset("default").sha256.hex().startswith(im.info["bsq_model"])
        assert len(im.info["bsq_model"]) == 32  # format 2.0 stores the first 16 bytes of the hash
        assert im.tile  # nothing decoded yet
        ref = np.asarray(codec.decode(data))
        assert np.array_equal(np.asarray(im), ref)

    def test_save_encodes_with_quality_and_keeps_icc(self, photos, tmp_path):
        icc = b"fake icc profile bytes"
        im = Image.open(photos[1])
        im.save(tmp_path / "b.bsq", quality=1, icc_profile=icc)
        back = Image.open(tmp_path / "b.bsq")
        assert back.info["bsq_preset"] == "q1" and back.info["icc_profile"] == icc
        back.load()
        assert back.size == im.size
        im.save(tmp_path / "c.bsq")
        assert Image.open(tmp_path / "c.bsq").info["bsq_preset"] == "default"
        with pytest.raises(ValueError):
            im.save(tmp_path / "d.bsq", quality=10)


def test_bench_outputs_need_force(photos, tmp_path):
    csv = tmp_path / "r.csv"
    csv.write_text("keep")
    r = run("bench", photos[0], "--preset", "q1", "--csv", csv, "--quiet")
    assert r.exit_code == 1 and "--force" in r.stderr and csv.read_text() == "keep"
    r = run("bench", photos[0], "--preset", "q1", "--csv", csv, "--quiet", "--force")
    assert r.exit_code == 0, r.output
    assert csv.read_text().startswith("image,preset,codec")


def test_help_is_plain_text():
    r = run("encode", "--help")
    assert r.exit_code == 0
    assert "<bool>" not in r.stdout and "file ." not in r.stdout and "--target-size" in r.stdout


class TestLightCommands:
    @pytest.mark.parametrize("args", [["--help"], ["--version"], ["encode", "--help"], ["presets", "--json"], ["info", "FILE"],
                                      ["cut", "TWO"]])
    def test_commands_that_need_no_model_do_not_import_torch(self, args, model_file, tmp_path):
        if "TWO" in args:  # a 2.1 vector, cut with its first stage's model file read for its name
            vec = Path(__file__).resolve().parent.parent / "formats" / "vectors"
            args = ["cut", str(vec / "v21-9x5-icc.bsq"), "--model", str(vec / "tiny-model.safetensors"),
                    "-o", str(tmp_path / "cut.bsq")]
        if "FILE" in args:
            src = tmp_path / "a.png"
            smooth_image(np.random.default_rng(1), 16, 16).save(src)
            assert run("encode", src, "--model", model_file, "--quiet").exit_code == 0
            args = [str(src.with_suffix(".bsq")) if a == "FILE" else a for a in args]
        code = ("import sys; from bsqcodec.cli.cli import app\n"
                f"try: app({args!r})\nexcept SystemExit as e: assert not e.code, e.code\n"
                "print('torch' in sys.modules)")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert r.stdout.splitlines()[-1] == "False"

    def test_version(self):
        r = run("--version")
        assert r.exit_code == 0 and r.stdout.strip() == f"bsqc {bsqcodec.__version__}"

    def test_presets_lists_the_installed_models_with_their_hashes(self):
        rows = json.loads(run("presets", "--json").stdout)["presets"]
        assert {r["preset"]: bytes.fromhex(r["model"]) for r in rows} == {n: h for n, (_, h) in weights.installed().items()}
        assert all(weights.preset(r["preset"]).sha256.hex() == r["model"] for r in rows)

    def test_help_names_values_without_type_placeholders(self):
        for cmd in ("encode", "decode", "bench"):
            text = run(cmd, "--help").stdout
            assert not re.search(r"<[a-z]|\{[A-Z]|\]\.\.\.", text), text  # <path>, {IMAGE...}...
        assert "--out-dir OUT_DIR" in run("encode", "--help").stdout

    def test_out_dir_is_created(self, photos, model_file, tmp_path):
        out = tmp_path / "new" / "folder"
        r = run("encode", *photos[:2], "--out-dir", out, "--model", model_file, "--quiet")
        assert r.exit_code == 0, r.output
        assert sorted(p.name for p in out.iterdir()) == ["p0.bsq", "p1.bsq"]
        (tmp_path / "plain").write_text("x")
        r = run("encode", *photos[:2], "--out-dir", tmp_path / "plain", "--model", model_file, "--quiet")
        assert r.exit_code == 1 and "not a directory" in r.stderr
