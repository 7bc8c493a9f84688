"""The `bsqc` command line. Thin: parse, call the library, report. Nothing imports this module."""

from __future__ import annotations

import gc

# What is imported lives as long as the process: torch alone is hundreds of thousands of objects. Each
# full garbage collection would walk them all, about 40 ms, and importing and parsing trigger several;
# frozen, the collector skips them (start-up 0.08 s faster). _Lazy freezes again after each import.
gc.freeze()

import importlib
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..format import container
from .common import err_console, error_line, guarded, new_app, out_console
from .training import train_app
from ..config import DEFAULT_BATCH_TILES, DEFAULT_EFFORT, MAX_BATCH_TILES, MAX_EFFORT, MIN_EFFORT, RUNG_NAMES
from ..errors import BsqError
from ..codec.fileio import check_output, read_bytes, write_atomic
from .progress import LazyProgress


class _Lazy:
    """A module of bsqcodec imported when a command first uses it: --help, --version, info and presets
    never import torch (about 2 s on some machines)."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str):
        mod = importlib.import_module(self._name, "bsqcodec")
        gc.freeze()  # what it imported lives as long as the process (see above)
        return getattr(mod, attr)


codec, images, weights = _Lazy(".codec.codec"), _Lazy(".codec.images"), _Lazy(".model.weights")

app = new_app("bsqc: a learned image codec (patch tokenizer + binary spherical quantization + transformer prior).")
app.add_typer(train_app, name="train")


def _version(value: bool) -> None:
    if value:
        from .. import __version__

        out_console.print(f"bsqc {__version__}", markup=False)
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """bsqc: a learned image codec (patch tokenizer + binary spherical quantization + transformer prior)."""

STDIO = Path("-")  # as an input: standard input; as an output: standard output


def _models(model_files: Optional[list[Path]]) -> list:
    return [weights.load(p) for p in model_files or []]


def _first_stage(m):
    """m, if it is a first-stage model (the prior samples and completes first-stage tokens only)."""
    from ..model.look import LookModel, SecondLookModel, coding_error

    if isinstance(m, (LookModel, SecondLookModel)):
        raise BsqError(coding_error(m))
    if not isinstance(m, weights.Model):
        raise BsqError(f"{m.name} is a second-stage model: sampling uses a first-stage preset (its own is {m.config.base})")
    return m


def _encoding_model(models: list):
    """The model --model asks encode to use: the one given, or the second-stage model among a second-stage
    model and its first stage. A look model beside them is for --tune (codec.tuned_look finds it)."""
    from ..model.look import LookModel, SecondLookModel
    from ..model.second import SecondModel

    coding = [m for m in models if not isinstance(m, (LookModel, SecondLookModel))] or models[:1]  # a look alone: its error
    second = [m for m in coding if isinstance(m, SecondModel)]
    if len(coding) == 1 or len(second) == 1 and len(coding) == 2:
        return second[0] if second else coding[0]
    raise BsqError("give --model once, or twice: a second-stage model and the first stage it was made for "
                   "(and a look model for --tune)")


def _emit_json(obj: dict, to_stderr: bool = False) -> None:
    (sys.stderr if to_stderr else sys.stdout).write(json.dumps(obj) + "\n")


def _jobs(inputs: list[Path], output: Optional[Path], out_dir: Optional[Path], suffix: str) -> list[tuple[Path, Path]]:
    """(input, output) pairs: -o for one input, --out-dir DIR/NAME, or the input's name with `suffix`."""
    if output is not None and out_dir is not None:
        raise BsqError("give -o/--output or --out-dir, not both")
    if output is not None and len(inputs) > 1:
        raise BsqError("-o/--output names one output; with several inputs use --out-dir")
    if STDIO in inputs and len(inputs) > 1:
        raise BsqError("standard input (-) can only be the one input")
    if out_dir is not None:  # made as `mkdir -p` would
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise BsqError(f"{out_dir}: not a directory") from None
        except OSError as e:
            raise BsqError(f"{out_dir}: cannot create the directory: {e.strerror or e}") from None
    jobs = []
    for src in inputs:
        if output is not None:
            dst = output
        elif src == STDIO:
            if out_dir is not None:
                raise BsqError("name the output of standard input with -o")
            dst = STDIO
        else:
            dst = (out_dir / src.name if out_dir is not None else src).with_suffix(suffix)
        jobs.append((src, dst))
    seen: dict[Path, Path] = {}
    for src, dst in jobs:
        if dst != STDIO and dst in seen:
            raise BsqError(f"{seen[dst]} and {src} would both be written to {dst}")
        seen[dst] = src
    if any(dst == STDIO for _, dst in jobs) and sys.stdout.isatty():
        raise BsqError("refusing to write binary data to a terminal: redirect standard output or give -o FILE")
    return jobs


def _check_outputs(jobs: list[tuple[Path, Path]], force: bool) -> None:
    if len(jobs) == 1 and jobs[0][1] != STDIO:  # one file: fail before any work (several: per file)
        check_output(jobs[0][1], force)


def _write(dst: Path, data: bytes, force: bool) -> None:
    if dst == STDIO:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    else:
        write_atomic(dst, data, force)


def _stdin_bytes() -> bytes:
    data = sys.stdin.buffer.read()
    if not data:
        raise BsqError("standard input is empty")
    return data


def _run_batch(jobs, work, as_json: bool, quiet: bool, verb: str, summary) -> None:
    """Run work(src, dst, progress) -> result dict for each job; one line per failure, exit 1 if any failed.

    One job reports as before (a tile progress bar, its own line or JSON object); several show one
    progress bar over the files, one JSON object per file with --json, and a summary line.
    """
    to_stderr = any(dst == STDIO for _, dst in jobs)  # standard output carries the data then
    results, failed = [], 0
    t0 = time.perf_counter()
    with LazyProgress(err_console, enabled=not quiet) as prog:
        for k, (src, dst) in enumerate(jobs):
            try:
                res = work(src, dst, prog if len(jobs) == 1 else None)
            except (BsqError, MemoryError) as e:
                if len(jobs) == 1:
                    raise
                msg = error_line(e)
                err_console.print(f"bsqc: error: {msg if str(src) in msg else f'{src}: {msg}'}", markup=False)
                failed += 1
                continue
            finally:
                if len(jobs) > 1:
                    prog(f"{verb} {len(jobs)} files", k + 1, len(jobs))
            results.append(res)
            if as_json:
                _emit_json(res, to_stderr)
            elif not quiet and len(jobs) == 1:
                (err_console if to_stderr else out_console).print(summary(res), markup=False)
    if len(jobs) > 1 and not as_json and not quiet:
        tot = sum(r["bytes"] for r in results)
        out_console.print(f"{verb}d {len(results)} of {len(jobs)} files ({tot} bytes"
                          f"{f', {failed} failed' if failed else ''}) in {time.perf_counter() - t0:.2f} s", markup=False)
    if failed:
        raise typer.Exit(1)


@app.command()
@guarded
def encode(
    inputs: Annotated[list[Path], typer.Argument(metavar="IMAGE...", show_default=False,
                                                 help="Images to compress (anything Pillow reads); - reads standard input.")],
    output: Annotated[Optional[Path], typer.Option("-o", "--output", show_default=False,
                                                   help="Output .bsq file (one input only); - writes standard output. "
                                                        "Default: the input's name with the suffix .bsq (standard output for -).")] = None,
    out_dir: Annotated[Optional[Path], typer.Option("--out-dir", show_default=False, help="Write each output into this folder, named after its input.")] = None,
    quality: Annotated[Optional[int], typer.Option("--quality", "-q", min=1, max=len(RUNG_NAMES), show_default=False,
                                                   help="Quality 1 (smallest files) to 9 (best), where those rungs are "
                                                        "installed (see `bsqc presets`); 3 is the default preset.")] = None,
    preset: Annotated[Optional[str], typer.Option("--preset", "-p", show_default=False, help="Installed preset to use instead of -q (see `bsqc presets`). Default: default.")] = None,
    model: Annotated[Optional[list[Path]], typer.Option("--model", show_default=False, help="Use this model file instead of a preset "
                                                        "(a second-stage model: with its first stage's file, if that is not installed, "
                                                        "as a second --model).")] = None,
    target_size: Annotated[Optional[int], typer.Option("--target-size", min=1, show_default=False, help="Use the best quality whose file has at most this many bytes.")] = None,
    target_psnr: Annotated[Optional[float], typer.Option("--target-psnr", show_default=False, help="Use the smallest quality whose decoded image reaches this PSNR (dB).")] = None,
    effort: Annotated[int, typer.Option("--effort", "-e", min=MIN_EFFORT, max=MAX_EFFORT,
                                        help="Encoder search: 1 is fastest (the tokenizer's own tokens), 9 slowest with the "
                                             "smallest files at equal quality. Any effort decodes with the same decoder.")] = DEFAULT_EFFORT,
    tune: Annotated[str, typer.Option("--tune", help="What the encoder's search aims at. faithful: the model's own decoder "
                                                     "and PSNR. sharp: the sharp look (its decoder and SSIMULACRA2, a perceptual "
                                                     "score): files that look best decoded with --look sharp, with more texture, "
                                                     "about 7% more bytes and four times the encode time (twice the steps, each "
                                                     "twice the work). Rungs of one stage (-q 1 to 3).")] = "faithful",
    max_pixels: Annotated[int, typer.Option("--max-pixels", min=1, help="Refuse images of more pixels than this, before reading them.")] = container.DEFAULT_MAX_PIXELS,
    force: Annotated[bool, typer.Option("--force", "-f", help="Overwrite outputs that exist.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object per file with the results.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar, no summary.")] = False,
) -> None:
    """Compress images into .bsq files.

    Pick the size/quality trade-off with -q 1..9 (on Kodak photos about 0.06 to 0.77 bits per pixel, 24 to 33 dB;
    4 to 9 add a second token stage, slower to encode and decode), or let --target-size / --target-psnr pick it. Several inputs share one model load; a failing input
    is reported and the others are still compressed (exit code 1 at the end).
    """
    if sum(x is not None for x in (quality, preset, model or None, target_size, target_psnr)) > 1:
        raise BsqError("choose one of -q/--quality, --preset, --model, --target-size and --target-psnr")
    if quality is not None:
        preset = RUNG_NAMES[quality - 1]
    jobs = _jobs(inputs, output, out_dir, ".bsq")
    _check_outputs(jobs, force)
    m, given = None, _models(model)
    if target_size is None and target_psnr is None:
        m = _encoding_model(given) if given else weights.preset(preset or "default")
        codec.tuned_look(m, tune, effort, given)  # a look that is missing or cannot be tuned for fails before any work
    elif tune != "faithful":
        raise BsqError(f"--tune {tune} is for a chosen one-stage rung: give -q 1 to 3 or --preset, not a target")
    need_psnr = as_json or (not quiet and len(jobs) == 1)  # shown in --json and in the one-file summary

    def work(src: Path, dst: Path, prog) -> dict:
        t0 = time.perf_counter()
        if dst != STDIO:
            check_output(dst, force)
        arr, icc, notes = (images.read_data(_stdin_bytes(), max_pixels=max_pixels) if src == STDIO
                           else images.read(src, max_pixels))
        for n in notes:
            err_console.print(f"bsqc: warning: {src}: {n}", markup=False)
        if m is None:
            enc, used = codec.encode_to_target(arr, icc, target_size=target_size, target_psnr=target_psnr, progress=prog,
                                               effort=effort)
        else:
            enc, used = codec.encode_array(arr, m, icc, prog, effort, models=given, tune=tune), m
        _write(dst, enc.data, force)
        h, w = arr.shape[:2]
        res = {
            "input": str(src), "output": str(dst), "width": w, "height": h, "preset": used.name, "model": used.hash_hex,
            "effort": effort, "tune": tune, "bytes": len(enc.data), "bpp": len(enc.data) * 8 / (w * h), "tokens": int(enc.tokens.numel()),
            "token_bits": enc.header.bits, "tiles": enc.header.tiles,
            "payload_bytes": len(enc.data) - container.header_size(enc.data) - 4, "estimated_bits": enc.estimated_bits,
        }
        if enc.header.second is not None:  # the first stage's payload above, the second's here
            res["payload_bytes"] -= 4 + sum(len(x) for x in enc.header.second.streams)
            res["second_stage_bytes"] = sum(len(x) for x in enc.header.second.streams)
        if need_psnr:  # a second pass over the pixels: only when it is shown
            res["psnr"] = codec.psnr(arr, enc.pixels())
        res["seconds"] = time.perf_counter() - t0
        return res

    def summary(res: dict) -> str:
        return (f"{res['input']} -> {res['output']}: {res['bytes']} bytes, {res['bpp']:.4f} bpp, "
                f"preset {res['preset']}, effort {res['effort']}{'' if tune == 'faithful' else f', tuned {tune}'}, "
                f"PSNR {res['psnr']:.2f} dB, {res['seconds']:.2f} s")

    _run_batch(jobs, work, as_json, quiet, "encode", summary)


@app.command()
@guarded
def decode(
    inputs: Annotated[list[Path], typer.Argument(metavar="FILE.bsq...", show_default=False, help=".bsq files; - reads standard input.")],
    output: Annotated[Optional[Path], typer.Option("-o", "--output", show_default=False,
                                                   help="Output image (one input only); its extension picks the format; - writes "
                                                        "standard output. Default: the input's name with the suffix of --format.")] = None,
    out_dir: Annotated[Optional[Path], typer.Option("--out-dir", show_default=False, help="Write each output into this folder, named after its input.")] = None,
    fmt: Annotated[str, typer.Option("--format", help="Image format for standard output and default names (png, jpg, webp, ...).")] = "png",
    model: Annotated[Optional[list[Path]], typer.Option("--model", show_default=False, help="Model file, for files made with a model that is "
                                                        "not installed; repeatable (a second stage's and its first stage's).")] = None,
    force: Annotated[bool, typer.Option("--force", "-f", help="Overwrite outputs that exist.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object per file with the results.")] = False,
    batch_tiles: Annotated[int, typer.Option("--batch-tiles", min=1, max=MAX_BATCH_TILES, help="Tiles decoded together (speed and memory only; the pixels never change).")] = DEFAULT_BATCH_TILES,
    threads: Annotated[int, typer.Option("--threads", min=0, help="CPU cores to use: worker processes for the prior, threads for the pixels (0 = all available; the pixels never change).")] = 0,
    max_pixels: Annotated[int, typer.Option("--max-pixels", min=1, help="Refuse files of more pixels than this, before decoding them.")] = container.DEFAULT_MAX_PIXELS,
    look: Annotated[str, typer.Option("--look", help="faithful: the model's own decoder (closest to the original in "
                                                     "PSNR); sharp: a decoder trained to draw texture, where its look "
                                                     "model is installed or given with --model. The file is the same.")] = "faithful",
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar, no summary.")] = False,
) -> None:
    """Decompress .bsq files into images."""
    import torch

    from ..codec.workers import available_cpus

    threads = threads or available_cpus()
    torch.set_num_threads(threads)
    suffix = "." + fmt.lower().lstrip(".")
    if images.format_for(suffix) is None:
        raise BsqError(f"--format {fmt}: not an image format Pillow writes (use png, jpg, webp, ...)")
    jobs = _jobs(inputs, output, out_dir, suffix)
    _check_outputs(jobs, force)
    models = _models(model)

    def work(src: Path, dst: Path, prog) -> dict:
        t0 = time.perf_counter()
        if dst != STDIO:
            check_output(dst, force)
        data = _stdin_bytes() if src == STDIO else read_bytes(src)
        header, _, arr = codec.decode_detailed(data, models, batch_tiles, prog, workers=threads, max_pixels=max_pixels,
                                               look=look)
        img = images.to_pil(arr, header.chunk(b"iCCP"))
        _write(dst, images.encode_image(img, dst if dst != STDIO else Path("stdout" + suffix)), force)
        return {"input": str(src), "output": str(dst), "width": header.width, "height": header.height,
                "preset": header.preset, "bytes": len(data), "seconds": time.perf_counter() - t0}

    def summary(res: dict) -> str:
        return f"{res['input']} -> {res['output']}: {res['width']}x{res['height']}, {res['seconds']:.2f} s"

    _run_batch(jobs, work, as_json, quiet, "decode", summary)


def info_dict(data: bytes) -> dict:
    header, streams = container.unpack(data)
    payload = sum(len(s) for s in streams)
    gr, gc = header.grid
    tokens = gr * gc
    return {
        "version": f"{header.major}.{header.minor}", "width": header.width, "height": header.height,
        "preset": header.preset, "model": header.model_hash.hex(), "patch": header.patch,
        "token_bits": header.bits, "groups": header.groups, "grid": [gr, gc], "tokens": tokens,
        "tiles": header.tiles, "tile_shape": [header.tile_rows, header.tile_cols],
        "payload_bytes": payload, "bytes": len(data), "bpp": len(data) * 8 / (header.width * header.height),
        "coded_bits_per_token": payload * 8 / tokens, "chunks": [t.decode("ascii") for t, _ in header.chunks],
        "checksums": "ok",
        **({"second_stage": _second_info(header)} if header.second is not None else {}),
    }


def _second_info(header) -> dict:
    s = header.second
    rows2, cols2 = (n * (header.patch // s.patch) for n in header.grid)
    return {"model": s.model_hash.hex(), "patch": s.patch, "token_bits": s.bits, "grid": [rows2, cols2],
            "choices": len(s.table), "passes": s.passes(header), "streams": len(s.streams), "payload_bytes": sum(len(x) for x in s.streams)}


@app.command()
@guarded
def info(
    file: Annotated[Path, typer.Argument(help="A .bsq file.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Show what a .bsq file holds and verify its checksums."""
    d = info_dict(read_bytes(file))
    if as_json:
        _emit_json(d)
        return
    from rich.table import Table  # here: rich.table costs 20 ms of every start-up

    t = Table(show_header=False, box=None)
    for k, v in d.items():
        t.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    out_console.print(t)


@app.command()
@guarded
def cut(
    file: Annotated[Path, typer.Argument(metavar="FILE.bsq", help="A .bsq file with a second stage (format 2.1).")],
    output: Annotated[Optional[Path], typer.Option("-o", "--output", show_default=False,
                                                   help="The first stage's file. Default: FILE with the suffix .first.bsq.")] = None,
    model: Annotated[Optional[Path], typer.Option("--model", show_default=False,
                                                  help="The file's first-stage or second-stage model file, where neither is installed "
                                                       "(for the first stage's name).")] = None,
    force: Annotated[bool, typer.Option("--force", "-f", help="Overwrite the output if it exists.")] = False,
) -> None:
    """Cut a two-stage file to its first token grid: the smaller file its first stage alone writes, byte for byte."""
    from ..format.modelfile import installed, summary  # the standard library only: no torch

    data = read_bytes(file)
    header, _ = container.unpack(data)
    if header.second is None:
        raise BsqError(f"{file} has no second stage to cut")
    known = [(h, c) for _, h, c in installed()[0].values()] + ([summary(model)[::-1]] if model else [])
    names = [c.name for h, c in known if h[:16] == header.model_hash and not hasattr(c, "base")]
    names += [c.base for h, c in known if h[:16] == header.second.model_hash and hasattr(c, "base")]
    if not names:
        raise BsqError(f"neither the file's first stage nor its second-stage model {header.preset!r} is installed: "
                       "pass one of their model files with --model")
    dst = output or file.with_suffix(".first.bsq")
    write_atomic(dst, container.first_stage(data, names[0]), force)
    out_console.print(f"{file} -> {dst}: {len(data)} -> {dst.stat().st_size} bytes, preset {names[0]}", markup=False)


@app.command()
@guarded
def presets(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """List the models installed with bsqcodec."""
    rows = []
    rung = {name: q for q, name in enumerate(RUNG_NAMES, 1)}
    from ..format import modelfile  # the standard library only: no torch

    inst = modelfile.installed(modelfile.MODELS_DIR)[0]
    for name in sorted(inst, key=lambda n: (rung.get(n, len(RUNG_NAMES) + 1), n)):  # the ladder first, in order
        path, h, config = inst[name]
        t = getattr(config, "tokenizer", None) or config.residual  # a second-stage model: its own grid
        row = {"preset": name, "quality": rung.get(name), "model": h.hex(), "patch": t.patch, "token_bits": t.bits,
               "raw_bpp": t.bits / t.patch**2, "file": Path(path).name}
        if hasattr(config, "lam"):  # a second-stage model: its first stage and its rate-distortion trade-off
            row["first_stage"], row["lambda"] = config.base, config.lam
        elif hasattr(config, "look"):  # a look model: the model whose tokens it decodes, and the look
            row["look_of"], row["look"] = ", ".join(n for n, _ in config.bases), config.look
        rows.append(row)
    if as_json:
        _emit_json({"presets": rows})
        return
    from rich.table import Table

    on = any("first_stage" in r or "look_of" in r for r in rows)  # a column for the models others are made for
    t = Table("-q", "preset", "patch", "bits/token", "raw bpp", "model", *(["on"] if on else []))
    for r in rows:
        t.add_row(str(r["quality"] or "-"), r["preset"], str(r["patch"]), str(r["token_bits"]), f"{r['raw_bpp']:.4f}",
                  r["model"][:16], *([f"{r['first_stage']}, lambda {r['lambda']}" if "first_stage" in r
                                      else f"{r['look_of']}, {r['look']} look" if "look_of" in r else ""] if on else []))
    out_console.print(t)


@app.command()
@guarded
def bench(
    folder: Annotated[Path, typer.Argument(help="Folder of images (searched recursively), or one image.")],
    preset: Annotated[Optional[list[str]], typer.Option("--preset", "-p", help="Preset to run; repeat for several [default: every installed preset of the quality ladder].")] = None,
    model: Annotated[Optional[list[Path]], typer.Option("--model", help="Also run this model file; repeatable.")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the results as JSON (schema: benchmarks/README.md).")] = None,
    csv_out: Annotated[Optional[Path], typer.Option("--csv", help="Write per-image rows as CSV.")] = None,
    plot_out: Annotated[Optional[Path], typer.Option("--plot", help="Write rate-distortion curves as a PNG.")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="Only the first N images.")] = None,
    sweep: Annotated[Optional[bool], typer.Option("--sweep/--no-sweep", help="Sweep baseline qualities for RD curves and BD-rate [default: with several presets or --plot].")] = None,
    effort: Annotated[int, typer.Option("--effort", "-e", min=MIN_EFFORT, max=MAX_EFFORT, help="bsqc's encoder effort (as in encode).")] = DEFAULT_EFFORT,
    metric: Annotated[str, typer.Option("--metric", help="Match the codecs at this score, image by image: psnr, or "
                                                         "ssimulacra2 (needs bsqcodec[perceptual]).")] = "psnr",
    look: Annotated[str, typer.Option("--look", help="Score bsqc's files decoded with this look (as decode --look; a look "
                                                     "model file can be given with --model); the faithful scores are kept too.")] = "faithful",
    tune: Annotated[str, typer.Option("--tune", help="What bsqc's encoder search aims at (as encode --tune): faithful, or "
                                                     "sharp (with --look sharp and --metric ssimulacra2, say).")] = "faithful",
    force: Annotated[bool, typer.Option("--force", "-f", help="Overwrite --json/--csv/--plot files that exist.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
) -> None:
    """Compare bsqc with PNG, JPEG, WebP, AVIF and JPEG XL at matched PSNR (or SSIMULACRA2), image by image."""
    from ..bench import bench as bench_mod

    for out in (json_out, csv_out, plot_out):  # before the long run, not after it
        if out is not None:
            check_output(out, force)

    if not preset and not model:  # the whole installed quality ladder: one rate-distortion curve
        inst = weights.installed()
        preset = [name for name in RUNG_NAMES if name in inst] or sorted(inst)
    models = [weights.preset(p) for p in preset or []]
    models += [weights.load(m) for m in model or []]
    with LazyProgress(err_console, enabled=not quiet) as prog:
        if sweep is None:
            sweep = len(models) > 1 or plot_out is not None
        res = bench_mod.run(folder, models, limit, progress=prog, sweep=sweep, effort=effort, metric=metric, look=look,
                            tune=tune)
    for n in res["notes"]:
        err_console.print(f"note: {n}", markup=False)
    from rich.table import Table

    label = "PSNR" if metric == "psnr" else metric.upper()
    seen = ("" if look == "faithful" else f", the {look} look") + ("" if tune == "faithful" else f", tuned {tune}")
    t = Table(title=f"{res['dataset']}: {res['images']} images, bytes at matched {label} (ratio = codec / bsqc), effort {effort}{seen}")
    t.add_column("preset")
    t.add_column("bsqc bytes", justify="right")
    t.add_column("bpp", justify="right")
    t.add_column("PSNR", justify="right")
    t.add_column("MS-SSIM", justify="right")
    if metric != "psnr":
        t.add_column(label, justify="right")
    if look != "faithful":  # the same files' own decoder
        t.add_column(f"{label} faithful", justify="right")
    t.add_column("PNG", justify="right")
    for c in res["baselines"]:
        t.add_column(c.upper(), justify="right")
    for name, tot in res["totals"].items():
        cells = [name, str(tot["bsqc_bytes"]), f"{tot['bpp']:.4f}", f"{tot['mean_psnr']:.2f}", f"{tot['mean_ms_ssim']:.4f}",
                 *([f"{tot[f'mean_{metric}']:.2f}"] if metric != "psnr" else []),
                 *([f"{tot['faithful'][f'mean_{metric}']:.2f}"] if look != "faithful" else []), f"{tot['png_ratio']:.2f}x"]
        for c in res["baselines"]:
            m = tot["matched"][c]
            cell = f"{m['ratio']:.2f}x" if m["ratio"] else "-"
            if m["images_unreachable"]:
                cell += f" ({m['images_unreachable']} unreached)"
            cells.append(cell)
        t.add_row(*cells)
    out_console.print(t)
    if res[f"bd_rate_{metric}"]:
        out_console.print(f"BD-rate ({label}) of bsqc against: " + ", ".join(
            f"{c} {v:+.1f}%" if v is not None else f"{c} n/a" for c, v in res[f"bd_rate_{metric}"].items()), markup=False)
    if json_out:
        write_atomic(json_out, (json.dumps(res, indent=1) + "\n").encode(), force)
    if csv_out:
        write_atomic(csv_out, bench_mod.csv_bytes(res), force)
    if plot_out:
        write_atomic(plot_out, bench_mod.plot_png(res), force)


def _write_images(out: Path, imgs: list, force: bool, columns: int | None = None) -> list[Path]:
    from ..codec.generate import grid

    if "%" in out.name:
        paths = [out.with_name(out.name % i) for i in range(len(imgs))]
        for p in paths:
            check_output(p, force)
        for p, im in zip(paths, imgs):
            write_atomic(p, images.encode_image(images.to_pil(im), p), force)
        return paths
    check_output(out, force)
    write_atomic(out, images.encode_image(images.to_pil(grid(imgs, columns)), out), force)
    return [out]


def _size(size: Optional[str], m: weights.Model) -> tuple[int, int]:
    if not size:
        p = m.config.prior
        return p.tile_cols * m.config.tokenizer.patch, p.tile_rows * m.config.tokenizer.patch
    try:
        w, h = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise BsqError(f"--size must look like 128x128, not {size!r}") from None
    if not (1 <= w <= 4096 and 1 <= h <= 4096):
        raise BsqError("--size must be between 1x1 and 4096x4096")
    return w, h


@app.command()
@guarded
def generate(
    output: Annotated[Path, typer.Option("-o", "--output", help="One grid image, or a pattern like sample_%02d.png for one file each.")],
    n: Annotated[int, typer.Option("-n", min=1, max=256, help="Number of images.")] = 8,
    size: Annotated[Optional[str], typer.Option(help="WxH pixels [default: one tile of the model]; larger sizes are mosaics of independent tiles.")] = None,
    temperature: Annotated[float, typer.Option(min=0.0, help="Sampling temperature (0 = greedy).")] = 1.0,
    top_k: Annotated[int, typer.Option("--top-k", min=0, help="Sample among the K most likely symbols (0 = all).")] = 0,
    top_p: Annotated[float, typer.Option("--top-p", min=0.0, max=1.0, help="Nucleus sampling mass.")] = 1.0,
    seed: Annotated[int, typer.Option(help="Random seed; the same seed gives the same images on the same machine.")] = 0,
    preset: Annotated[str, typer.Option("--preset", "-p", help="Installed preset.")] = "default",
    model: Annotated[Optional[Path], typer.Option("--model", help="Model file instead of a preset.")] = None,
    force: Annotated[bool, typer.Option("--force", "-f")] = False,
    quiet: Annotated[bool, typer.Option("--quiet")] = False,
) -> None:
    """Sample new images from the prior (token by token, with the KV cache) and decode them."""
    from ..codec.generate import generate as gen

    m = _first_stage(weights.load(model) if model else weights.preset(preset))
    w, h = _size(size, m)
    check_output(output, force) if "%" not in output.name else None
    with LazyProgress(err_console, enabled=not quiet) as prog:
        imgs = gen(m, n, w, h, seed, temperature, top_k, top_p, prog)
    paths = _write_images(output, imgs, force)
    if not quiet:
        out_console.print(f"wrote {', '.join(map(str, paths))}", markup=False)


@app.command()
@guarded
def complete(
    input: Annotated[Path, typer.Argument(help="Image whose top part is kept.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Image: the original, then the completions, side by side.")],
    keep: Annotated[float, typer.Option(min=0.0, max=1.0, help="Fraction of token rows kept from the image.")] = 0.5,
    n: Annotated[int, typer.Option("-n", min=1, max=64, help="Number of completions.")] = 1,
    temperature: Annotated[float, typer.Option(min=0.0)] = 1.0,
    top_k: Annotated[int, typer.Option("--top-k", min=0)] = 0,
    top_p: Annotated[float, typer.Option("--top-p", min=0.0, max=1.0)] = 1.0,
    seed: int = 0,
    preset: Annotated[str, typer.Option("--preset", "-p")] = "default",
    model: Annotated[Optional[Path], typer.Option("--model")] = None,
    force: Annotated[bool, typer.Option("--force", "-f")] = False,
    quiet: Annotated[bool, typer.Option("--quiet")] = False,
) -> None:
    """Tokenize an image, keep its top rows of tokens, sample the rest from the prior, decode."""
    from ..codec.generate import complete as comp

    m = _first_stage(weights.load(model) if model else weights.preset(preset))
    check_output(output, force)
    arr, _, _ = images.read(input, max_pixels=2048 * 2048)  # refused before its pixels are read
    container.check_pixels(arr.shape[1] * (n + 1), arr.shape[0], None, f"the image and {n} completions")
    with LazyProgress(err_console, enabled=not quiet) as prog:
        _, _, imgs = comp(m, arr, keep, n, seed, temperature, top_k, top_p, prog)
    _write_images(output, [arr] + imgs, force, columns=n + 1)
    if not quiet:
        out_console.print(f"wrote {output}", markup=False)


def main() -> None:
    """The `bsqc` program: run the command, then leave without the interpreter's teardown.

    Unloading torch and the rest at exit takes about 0.4 s, longer than some commands. Once the
    command has returned its outputs are written and closed (every file goes through write_atomic),
    so the process flushes its standard streams and ends with os._exit. Where something still runs
    (a child process or another thread, as training can leave), it exits the ordinary way.
    """
    gc.freeze()  # the imports of typer's parsing too
    try:
        app()
        code = 0
    except SystemExit as e:
        code = e.code
    if not isinstance(code, int):  # sys.exit("message") or sys.exit(None)
        if code is not None:
            print(code, file=sys.stderr)
        code = 0 if code is None else 1
    mp = sys.modules.get("multiprocessing")
    if threading.active_count() > 1 or (mp is not None and mp.active_children()):
        sys.exit(code)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (BrokenPipeError, OSError):  # a reader that left early (| head): as Python reports it, exit 1
        code = code or 1
    os._exit(code)

