"""Two sets of second-stage models (or one set at two efforts) on the same first-stage files: rate-distortion
curves and BD-rate.

    python benchmarks/second_compare.py --old q4s,q5s,q6,q7,q8,q9 --new runs/new-*.safetensors \
        --effort 4 --name res32-step2000 IMAGE...

Each image's first stage is coded once (codec.first_stage, as bsqc encode codes it) and every model's
second stage on it (codec.add_second_stage); bytes are the whole files', PSNR the decoded pixels'. Writes
results/second-compare-NAME.json: per model the total bytes, bpp and mean PSNR, and the BD-rate of the
new curve against the old (negative: the new models need fewer bytes at equal PSNR).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image

from bsqcodec.codec import codec
from bsqcodec import metrics
from bsqcodec.model import weights

HERE = Path(__file__).resolve().parent


def _load(spec: str):
    return weights.load(spec) if spec.endswith(".safetensors") else weights.preset(spec)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("images", nargs="+")
    ap.add_argument("--old", required=True, help="comma-separated presets or model files")
    ap.add_argument("--new", required=True, nargs="+", help="model files (or presets)")
    ap.add_argument("--effort", type=int, default=4)
    ap.add_argument("--new-effort", type=int, default=None, help="the new models' effort (default: --effort)")
    ap.add_argument("--name", required=True)
    args = ap.parse_args()
    old = [_load(s) for s in args.old.split(",")]
    new = [_load(s) for s in args.new]
    base = codec.base_model(old[0])
    rows = {"old": [dict(name=m.name, lam=m.config.lam, bytes=0, se=[], px=0) for m in old],
            "new": [dict(name=m.name, lam=m.config.lam, bytes=0, se=[], px=0) for m in new]}
    t0 = time.perf_counter()
    for path in args.images:
        arr = np.asarray(Image.open(path).convert("RGB"))
        first = codec.first_stage(base, arr, args.effort)
        for side, models in (("old", old), ("new", new)):
            effort = args.new_effort if side == "new" and args.new_effort else args.effort
            for row, m in zip(rows[side], models):
                enc = codec.add_second_stage(first, m, effort=effort)
                row["bytes"] += len(enc.data)
                row["px"] += arr.shape[0] * arr.shape[1]
                row["se"].append(metrics.psnr(arr, enc.pixels()))
        print(f"{Path(path).name}: {time.perf_counter() - t0:.0f} s", flush=True)
    curves = {}
    for side in rows:
        curves[side] = [{"name": r["name"], "lambda": r["lam"], "bytes": r["bytes"], "bpp": 8 * r["bytes"] / r["px"],
                         "mean_psnr": float(np.mean(r["se"])), "psnr": r["se"]} for r in rows[side]]
    bd = metrics.bd_rate([c["bpp"] for c in curves["old"]], [c["mean_psnr"] for c in curves["old"]],
                         [c["bpp"] for c in curves["new"]], [c["mean_psnr"] for c in curves["new"]])
    res = {"images": [Path(p).name for p in args.images], "effort": args.effort,
           "new_effort": args.new_effort or args.effort, "curves": curves,
           "bd_rate_new_vs_old": bd}
    out = HERE / "results" / f"second-compare-{args.name}.json"
    out.write_text(json.dumps(res, indent=1) + "\n")
    for side in curves:
        print(side, " ".join(f"{c['name']}:{c['bpp']:.3f}/{c['mean_psnr']:.2f}" for c in curves[side]))
    print(f"BD-rate new vs old: {bd:+.2f}%")


if __name__ == "__main__":
    main()
