"""The `bsqc` command line. Thin: parse, call the library, report. Nothing imports this module."""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from . import codec, container, images, weights
from .config import LADDER
from .errors import BsqError
from .fileio import check_output, read_bytes, write_atomic
from .progress import LazyProgress

app = typer.Typer(
    help="bsqc: a learned image codec (patch tokenizer + binary spherical quantization + transformer prior).",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)
train_app = typer.Typer(help="Train a tokenizer and a prior, then freeze them into a model file.", no_args_is_help=True)
app.add_typer(train_app, name="train")

out_console = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 200)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


def _fail(msg: str) -> None:
    err_console.print(f"bsqc: error: {msg}", markup=False)
    raise typer.Exit(1)


def guarded(fn):
    """Turn every BsqError (and anything unexpected) into one line on stderr and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except BsqError as e:
            _fail(str(e))
        except KeyboardInterrupt:
            err_console.print("bsqc: interrupted", markup=False)
            raise typer.Exit(130) from None
        except MemoryError:
            _fail("out of memory")
        except Exception as e:  # a bug, not the user's fault: still one line, unless debugging
            if os.environ.get("BSQC_DEBUG"):
                raise
            _fail(f"internal error: {type(e).__name__}: {e}")

    return wrapper


def _models(model_file: Optional[Path]) -> list[weights.Model]:
    return [weights.load(model_file)] if model_file else []


def _emit_json(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")


@app.command()
@guarded
def encode(
    input: Annotated[Path, typer.Argument(help="Image to compress (anything Pillow reads).")],
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="Output .bsq file [default: INPUT with suffix .bsq].")] = None,
    quality: Annotated[Optional[int], typer.Option("--quality", "-q", min=1, max=len(LADDER),
                                                   help="Quality 1 (smallest files) to 5 (best); 3 is the default preset.")] = None,
    preset: Annotated[Optional[str], typer.Option("--preset", "-p", help="Installed preset to use instead of -q (see `bsqc presets`) [default: default].")] = None,
    model: Annotated[Optional[Path], typer.Option("--model", help="Use this model file instead of a preset.")] = None,
    force: Annotated[bool, typer.Option("--force", "-f", help="Overwrite OUTPUT if it exists.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object with the results.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar, no summary.")] = False,
) -> None:
    """Compress an image into a .bsq file.

    Pick the size/quality trade-off with -q 1..5 (on Kodak photos about 0.06 to 0.27 bits per pixel).
    """
    t0 = time.perf_counter()
    if sum(x is not None for x in (quality, preset, model)) > 1:
        raise BsqError("choose one of -q/--quality, --preset and --model")
    if quality is not None:
        preset = LADDER[quality - 1].name
    out = output or input.with_suffix(".bsq")
    check_output(out, force)
    arr, icc, notes = images.read(input)
    for n in notes:
        err_console.print(f"bsqc: warning: {input}: {n}", markup=False)
    m = weights.load(model) if model else weights.preset(preset or "default")
    with LazyProgress(err_console, enabled=not quiet) as prog:
        enc = codec.encode_array(arr, m, icc, prog)
        recon = codec.tokens_to_array(m, enc.tokens, arr.shape[1], arr.shape[0])
    write_atomic(out, enc.data, force)
    h, w = arr.shape[:2]
    res = {
        "input": str(input), "output": str(out), "width": w, "height": h, "preset": m.name, "model": m.hash_hex,
        "bytes": len(enc.data), "bpp": len(enc.data) * 8 / (w * h), "tokens": int(enc.tokens.numel()),
        "token_bits": m.config.tokenizer.bits, "tiles": enc.header.tiles,
        "payload_bytes": len(enc.data) - container.header_size(enc.data) - 4,
        "estimated_bits": enc.estimated_bits, "psnr": codec.psnr(arr, recon), "seconds": time.perf_counter() - t0,
    }
    if as_json:
        _emit_json(res)
    elif not quiet:
        out_console.print(
            f"{input} -> {out}: {res['bytes']} bytes, {res['bpp']:.4f} bpp, PSNR {res['psnr']:.2f} dB, "
            f"{res['seconds']:.2f} s", markup=False)


@app.command()
@guarded
def decode(
    input: Annotated[Path, typer.Argument(help="A .bsq file.")],
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="Output image; its extension picks the format [default: INPUT with suffix .png].")] = None,
    model: Annotated[Optional[Path], typer.Option("--model", help="Model file, for files made with a model that is not installed.")] = None,
    force: Annotated[bool, typer.Option("--force", "-f", help="Overwrite OUTPUT if it exists.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object with the results.")] = False,
    batch_tiles: Annotated[int, typer.Option("--batch-tiles", min=1, max=codec.MAX_BATCH_TILES, help="Tiles decoded together (speed and memory only; the pixels never change).")] = codec.DEFAULT_BATCH_TILES,
    threads: Annotated[int, typer.Option("--threads", min=0, help="CPU threads (0 = torch's default; the pixels never change).")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar, no summary.")] = False,
) -> None:
    """Decompress a .bsq file into an image."""
    t0 = time.perf_counter()
    if threads:
        import torch

        torch.set_num_threads(threads)
    out = output or input.with_suffix(".png")
    check_output(out, force)
    data = read_bytes(input)
    with LazyProgress(err_console, enabled=not quiet) as prog:
        header, _, arr = codec.decode_detailed(data, _models(model), batch_tiles, prog)
    img = images.to_pil(arr, header.chunk(b"iCCP"))
    write_atomic(out, images.encode_image(img, out), force)
    res = {"input": str(input), "output": str(out), "width": header.width, "height": header.height,
           "preset": header.preset, "bytes": len(data), "seconds": time.perf_counter() - t0}
    if as_json:
        _emit_json(res)
    elif not quiet:
        out_console.print(f"{input} -> {out}: {header.width}x{header.height}, {res['seconds']:.2f} s", markup=False)


def info_dict(data: bytes) -> dict:
    header, streams = container.unpack(data)
    payload = sum(len(s) for s in streams)
    gr, gc = header.grid
    tokens = gr * gc
    return {
        "version": f"{container.MAJOR}.{header.minor}", "width": header.width, "height": header.height,
        "preset": header.preset, "model": header.model_hash.hex(), "patch": header.patch,
        "token_bits": header.bits, "groups": header.groups, "grid": [gr, gc], "tokens": tokens,
        "tiles": header.tiles, "tile_shape": [header.tile_rows, header.tile_cols],
        "payload_bytes": payload, "bytes": len(data), "bpp": len(data) * 8 / (header.width * header.height),
        "coded_bits_per_token": payload * 8 / tokens, "chunks": [t.decode("ascii") for t, _ in header.chunks],
        "checksums": "ok",
    }


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
    t = Table(show_header=False, box=None)
    for k, v in d.items():
        t.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    out_console.print(t)


@app.command()
@guarded
def presets(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """List the models installed with bsqcodec."""
    rows = []
    rung = {c.name: q for q, c in enumerate(LADDER, 1)}
    inst = weights.installed()
    for name in sorted(inst, key=lambda n: (rung.get(n, len(LADDER) + 1), n)):  # the ladder first, in order
        path, h = inst[name]
        m = weights.preset(name)
        t = m.config.tokenizer
        rows.append({"preset": name, "quality": rung.get(name), "model": h.hex(), "patch": t.patch, "token_bits": t.bits,
                     "raw_bpp": t.bits / t.patch**2, "file": Path(path).name})
    if as_json:
        _emit_json({"presets": rows})
        return
    t = Table("-q", "preset", "patch", "bits/token", "raw bpp", "model")
    for r in rows:
        t.add_row(str(r["quality"] or "-"), r["preset"], str(r["patch"]), str(r["token_bits"]), f"{r['raw_bpp']:.4f}",
                  r["model"][:16])
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
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
) -> None:
    """Compare bsqc with PNG, JPEG, WebP, AVIF and JPEG XL at matched PSNR, image by image."""
    from . import bench as bench_mod

    if not preset and not model:  # the whole installed quality ladder: one rate-distortion curve
        inst = weights.installed()
        preset = [c.name for c in LADDER if c.name in inst] or sorted(inst)
    models = [weights.preset(p) for p in preset or []]
    models += [weights.load(m) for m in model or []]
    with LazyProgress(err_console, enabled=not quiet) as prog:
        if sweep is None:
            sweep = len(models) > 1 or plot_out is not None
        res = bench_mod.run(folder, models, limit, progress=prog, sweep=sweep)
    for n in res["notes"]:
        err_console.print(f"note: {n}", markup=False)
    t = Table(title=f"{res['dataset']}: {res['images']} images, bytes at matched PSNR (ratio = codec / bsqc)")
    t.add_column("preset")
    t.add_column("bsqc bytes", justify="right")
    t.add_column("bpp", justify="right")
    t.add_column("PSNR", justify="right")
    t.add_column("MS-SSIM", justify="right")
    t.add_column("PNG", justify="right")
    for c in res["baselines"]:
        t.add_column(c.upper(), justify="right")
    for name, tot in res["totals"].items():
        cells = [name, str(tot["bsqc_bytes"]), f"{tot['bpp']:.4f}", f"{tot['mean_psnr']:.2f}", f"{tot['mean_ms_ssim']:.4f}",
                 f"{tot['png_ratio']:.2f}x"]
        for c in res["baselines"]:
            m = tot["matched"][c]
            cell = f"{m['ratio']:.2f}x" if m["ratio"] else "-"
            if m["images_unreachable"]:
                cell += f" ({m['images_unreachable']} unreached)"
            cells.append(cell)
        t.add_row(*cells)
    out_console.print(t)
    if res["bd_rate_psnr"]:
        out_console.print("BD-rate (PSNR) of bsqc against: " + ", ".join(
            f"{c} {v:+.1f}%" if v is not None else f"{c} n/a" for c, v in res["bd_rate_psnr"].items()), markup=False)
    if json_out:
        write_atomic(json_out, (json.dumps(res, indent=1) + "\n").encode(), True)
    if csv_out:
        bench_mod.write_csv(res, csv_out)
    if plot_out:
        bench_mod.plot(res, plot_out)


def _write_images(out: Path, imgs: list, force: bool, columns: int | None = None) -> list[Path]:
    from .generate import grid

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
    from .generate import generate as gen

    m = weights.load(model) if model else weights.preset(preset)
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
    from .generate import complete as comp

    m = weights.load(model) if model else weights.preset(preset)
    check_output(output, force)
    arr, _, _ = images.read(input)
    if arr.shape[0] * arr.shape[1] > 2048 * 2048:
        raise BsqError("complete works on images up to 2048x2048 pixels")
    with LazyProgress(err_console, enabled=not quiet) as prog:
        _, _, imgs = comp(m, arr, keep, n, seed, temperature, top_k, top_p, prog)
    _write_images(output, [arr] + imgs, force, columns=n + 1)
    if not quiet:
        out_console.print(f"wrote {output}", markup=False)


def main() -> None:
    app()


from . import cli_train  # noqa: E402,F401  (registers the train commands on train_app)
