"""`bsqc bench`: bsqcodec against PNG, JPEG, WebP, AVIF and JPEG XL at matched quality."""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path

import numpy as np
from PIL import Image

from . import baselines
from ..codec import codec, images, search
from ..config import RUNG_NAMES
from ..errors import BsqError
from ..model.look import LookModel, SecondLookModel
from ..metrics import METRICS, bd_rate, ms_ssim, overlap, psnr

SCHEMA = "bsqcodec-bench-1"
LADDER_NAMES = set(RUNG_NAMES)

SWEEP = {
    "jpeg": [3, 5, 8, 10, 15, 20, 30, 40, 50, 60, 75, 90],
    "webp": [0, 5, 10, 20, 30, 40, 50, 60, 75, 90],
    "avif": [2, 5, 10, 20, 30, 40, 50, 60, 75, 90],
    "jxl": [2, 5, 10, 20, 30, 40, 50, 60, 75, 90],
}


def find_images(root: Path, limit: int | None = None) -> list[Path]:
    exts = {e for e, f in Image.registered_extensions().items() if f in Image.OPEN}
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise BsqError(f"{root}: no such folder")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in exts)
    if not files:
        raise BsqError(f"no images under {root}")
    return files[:limit] if limit else files


def run(root: Path, models: list, limit: int | None = None, codecs=baselines.LOSSY,
        progress=None, sweep: bool | None = None, effort: int = search.DEFAULT_EFFORT, metric: str = "psnr",
        look: str = "faithful", tune: str = "faithful") -> dict:
    """The whole benchmark as a JSON-ready dict (schema in benchmarks/README.md); bsqc encodes at `effort`.

    metric: the score codecs are matched at, image by image ("psnr" or another of metrics.METRICS); the
    curves and BD-rates are in it too. look: which decoder makes bsqc's pixels (codec.LOOKS; look models
    among `models` or installed); with another than "faithful", each file's faithful scores are kept too.
    tune: the look bsqc's encoder search aims at (codec.tuned_look; as `bsqc encode --tune`).
    """
    if metric not in METRICS:
        raise BsqError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
    if look not in codec.LOOKS:
        raise BsqError(f"unknown look {look!r}; choose from {', '.join(codec.LOOKS)}")
    extra = models
    models = [m for m in models if not isinstance(m, (LookModel, SecondLookModel))]  # the rungs; looks only decode
    if not models:
        raise BsqError("no preset to bench: look models only decode (give their presets, and --look)")
    names = [m.name for m in models]
    twice = next((n for n in names if names.count(n) > 1), None)
    if twice is not None:  # results are keyed by name: one would silently replace the other's
        raise BsqError(f"two models named {twice!r} (a preset and a --model file, say): bench them in separate runs")
    for m in models:  # a look that is missing or cannot be tuned for fails before any work
        codec.tuned_look(m, tune, effort, extra)
    files = find_images(Path(root), limit)
    usable, notes = [], []
    for c in codecs:
        ok, note = baselines.available(c)
        (usable.append(c) if ok else notes.append(note))
    sweep = len(models) > 1 if sweep is None else sweep
    per_image = []
    curve_pts = {c.name: {} for c in usable}
    for i, path in enumerate(files):
        arr, _, _ = images.read(path)
        h, w = arr.shape[:2]
        row = {"image": str(path.relative_to(root)) if path != root else path.name, "width": w, "height": h,
               "png_bytes": baselines.png_bytes(arr), "bsqc": {}, "matched": {}}
        seen = {c.name: {} for c in usable}  # quality -> baselines.Point of this image, shared by every search
        for m in models:
            t0 = time.perf_counter()
            data = codec.encode_array(arr, m, effort=effort, models=extra, tune=tune).data  # a second stage's first among them
            t1 = time.perf_counter()
            header, tokens, out = codec.decode_detailed(data, models=extra, look=look)
            t2 = time.perf_counter()
            p = psnr(arr, out)
            row["bsqc"][m.name] = {"bytes": len(data), "bpp": len(data) * 8 / (w * h), "psnr": p,
                                   "ms_ssim": ms_ssim(arr, out), "encode_seconds": t1 - t0, "decode_seconds": t2 - t1}
            score = p if metric == "psnr" else row["bsqc"][m.name].setdefault(metric, METRICS[metric](arr, out))
            if look != "faithful":  # the same tokens by the model's own decoder, to compare the looks
                plain = codec.pixels(header, tokens, extra)  # the same tokens' faithful pixels
                row["bsqc"][m.name]["faithful"] = {"psnr": psnr(arr, plain),
                                                   **({metric: METRICS[metric](arr, plain)} if metric != "psnr" else {})}
            row["matched"][m.name] = {}
            for c in usable:
                pt = baselines.matched(arr, c, score, seen[c.name], metric)
                row["matched"][m.name][c.name] = None if pt is None else {
                    "quality": pt.quality, "bytes": pt.bytes, "bpp": pt.bytes * 8 / (w * h), "psnr": pt.psnr,
                    "ms_ssim": ms_ssim(arr, baselines.decode(pt.data)),
                    **({metric: pt.score(arr, metric)} if metric != "psnr" else {})}
        if sweep:
            for c in usable:
                for q in SWEEP[c.name]:
                    pt = seen[c.name].get(q) or baselines.at_quality(arr, c, q)
                    curve_pts[c.name].setdefault(q, []).append((pt.bytes * 8 / (w * h), pt.score(arr, metric)))
        per_image.append(row)
        if progress:
            progress("bench", i + 1, len(files))
    res = _summarize(root, models, usable, per_image, curve_pts, sweep, notes, effort, metric)
    res["look"], res["tune"] = look, tune
    if tune != "faithful":
        res["tuned_search"] = search.tuned_schedule()
    if look != "faithful":
        for m in models:
            rows = [r["bsqc"][m.name]["faithful"] for r in per_image]
            res["totals"][m.name]["faithful"] = {f"mean_{k}": float(np.mean([x[k] for x in rows])) for k in rows[0]}
    return res


def _summarize(root, models, usable, per_image, curve_pts, sweep, notes, effort, metric="psnr") -> dict:
    totals = {}
    for m in models:
        b = [r["bsqc"][m.name] for r in per_image]
        px = sum(r["width"] * r["height"] for r in per_image)
        t = {"bsqc_bytes": sum(x["bytes"] for x in b), "bpp": sum(x["bytes"] for x in b) * 8 / px,
             "mean_psnr": float(np.mean([x["psnr"] for x in b])), "mean_ms_ssim": float(np.mean([x["ms_ssim"] for x in b])),
             "encode_seconds": sum(x["encode_seconds"] for x in b), "decode_seconds": sum(x["decode_seconds"] for x in b),
             "png_bytes": sum(r["png_bytes"] for r in per_image), "matched": {}}
        if metric != "psnr":
            t[f"mean_{metric}"] = float(np.mean([x[metric] for x in b]))
        t["png_ratio"] = t["png_bytes"] / t["bsqc_bytes"]
        for c in usable:
            ok = [(r["matched"][m.name][c.name], r["bsqc"][m.name]) for r in per_image if r["matched"][m.name][c.name]]
            cb, bb = sum(x["bytes"] for x, _ in ok), sum(y["bytes"] for _, y in ok)
            t["matched"][c.name] = {"bytes": cb, "bsqc_bytes": bb, "ratio": cb / bb if bb else None,
                                    "images_matched": len(ok), "images_unreachable": len(per_image) - len(ok)}
        totals[m.name] = t
    # bsqc's curve is its quality ladder when two or more rungs ran; other presets stay single points
    rungs = [m for m in models if m.name in LADDER_NAMES]
    curve_models = rungs if len(rungs) >= 2 else models
    curves = {"bsqc": sorted(({"preset": m.name, "bpp": totals[m.name]["bpp"], metric: totals[m.name][f"mean_{metric}"]}
                              for m in curve_models), key=lambda d: d["bpp"])}
    bd, bd_range = {}, {}
    if sweep:
        for c in usable:
            curves[c.name] = [{"quality": q, "bpp": float(np.mean([v[0] for v in pts])), metric: float(np.mean([v[1] for v in pts]))}
                              for q, pts in sorted(curve_pts[c.name].items())]
            pa, pb = [d[metric] for d in curves[c.name]], [d[metric] for d in curves["bsqc"]]
            if pa and pb:
                bd_range[c.name] = list(overlap(pa, pb))
            try:
                bd[c.name] = bd_rate([d["bpp"] for d in curves[c.name]], pa, [d["bpp"] for d in curves["bsqc"]], pb)
            except ValueError as e:
                bd[c.name] = None
                notes.append(f"BD-rate against {c.name}: {e}")
    range_key = "bd_rate_psnr_range_db" if metric == "psnr" else f"bd_rate_{metric}_range"
    return {"schema": SCHEMA, "dataset": Path(root).name, "images": len(per_image), "presets": [m.name for m in models],
            "models": {m.name: m.hash_hex for m in models}, "effort": effort, "metric": metric,
            "baselines": [c.name for c in usable], "notes": notes, "totals": totals, "curves": curves,
            f"bd_rate_{metric}": bd, range_key: bd_range, "per_image": per_image}


def csv_bytes(res: dict) -> bytes:
    """Per-image rows as CSV (with a column for the metric codecs were matched at, when it is not PSNR)."""
    metric = res.get("metric", "psnr")
    extra = [metric] if metric != "psnr" else []
    f = io.StringIO(newline="")
    wr = csv.writer(f)
    wr.writerow(["image", "preset", "codec", "quality", "bytes", "bpp", "psnr", "ms_ssim", *extra])
    for r in res["per_image"]:
        for preset, b in r["bsqc"].items():
            wr.writerow([r["image"], preset, "bsqc", "", b["bytes"], b["bpp"], b["psnr"], b["ms_ssim"], *(b[k] for k in extra)])
            for c, m in r["matched"][preset].items():
                if m:
                    wr.writerow([r["image"], preset, c, m["quality"], m["bytes"], m["bpp"], m["psnr"], m["ms_ssim"],
                                 *(m[k] for k in extra)])
        wr.writerow([r["image"], "", "png", "", r["png_bytes"], r["png_bytes"] * 8 / (r["width"] * r["height"]), "inf", 1.0,
                     *(100.0 for _ in extra)])
    return f.getvalue().encode()


def plot_png(res: dict) -> bytes:
    """Rate-distortion curves as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise BsqError("--plot needs matplotlib (pip install bsqcodec[plot])") from None
    fig, ax = plt.subplots(figsize=(7, 5), dpi=110)
    metric = res.get("metric", "psnr")
    bds = res.get(f"bd_rate_{metric}", {})
    for name, pts in res["curves"].items():
        if name == "bsqc" or not pts:
            continue
        bd = bds.get(name)
        label = name.upper() + (f" (BD-rate of bsqc: {bd:+.1f}%)" if bd is not None else
                                " (BD-rate of bsqc: undefined, no overlap)" if name in bds else "")
        ax.plot([p["bpp"] for p in pts], [p[metric] for p in pts], "o-", ms=3, label=label)
    b = res["curves"]["bsqc"]
    ax.plot([p["bpp"] for p in b], [p[metric] for p in b], "s-", color="black", lw=2, ms=6, label="bsqc")
    for p in b:
        ax.annotate(p["preset"], (p["bpp"], p[metric]), textcoords="offset points", xytext=(5, -10), fontsize=8)
    for preset, t in res["totals"].items():  # matched-quality points of every baseline
        for c, m in t["matched"].items():
            if m["ratio"]:
                ax.plot([t["bpp"] * m["ratio"]], [t[f"mean_{metric}"]], "x", color="gray", ms=5)
    ax.set_xlabel("bits per pixel")
    ax.set_ylabel("RGB PSNR (dB)" if metric == "psnr" else metric.upper())
    ax.set_title(f"Rate-distortion on {res['dataset']} ({res['images']} images)")
    xmax = max(0.6, 2 * max(p["bpp"] for p in b))
    ax.set_xlim(0, xmax)
    inside = [p[metric] for pts in res["curves"].values() for p in pts if p["bpp"] <= xmax]
    ax.set_ylim(min(inside) - 0.5, max(inside) + 0.5)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
