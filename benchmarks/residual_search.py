"""What the second stage's encoder search (bsqcodec/codec/search2.py) buys: real 2.1 files of the same images with
0, 1, 2, ... gradient steps on the second stage's code, the first stage's tokens held fixed, at one or more
lambdas. Bytes are whole files; PSNR of the decoder's pixels.

    python benchmarks/residual_search.py SECOND_MODEL.safetensors ../shared/data/kodak --limit 4 --steps 0,2,4,8
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe  # noqa: E402

from bsqcodec.codec import codec, images, search2, twostage  # noqa: E402
from bsqcodec.format import container
from bsqcodec.model import weights
from bsqcodec.train.data import find_images  # noqa: E402
from bsqcodec.metrics import psnr  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("folder")
    ap.add_argument("--limit", type=int, default=4)
    ap.add_argument("--steps", default="0,2,4,8")
    ap.add_argument("--lam", default="", help="lambdas (default: the model's)")
    ap.add_argument("--first-effort", type=int, default=1)
    ap.add_argument("--name", default=None)
    args = ap.parse_args()
    smodel = weights.load(args.model)
    base = codec.base_model(smodel)
    steps = [int(s) for s in args.steps.split(",")]
    lams = [float(x) for x in args.lam.split(",")] if args.lam else [float(smodel.config.lam)]
    files = find_images(args.folder)[: args.limit]
    rows = []
    for f in files:
        arr = images.read(f)[0]
        h, w = arr.shape[:2]
        tokens = codec.search_tokens(base, arr, args.first_effort)
        header = codec.make_header(base, w, h, None, tokens)
        streams, _ = codec.encode_tokens(base, header, tokens)  # noqa: the first stage as its own file has it
        base_px = codec.padded_pixels(base, tokens)
        P = base.config.tokenizer.patch
        padded = codec._pad(arr, P)
        header.minor, header.preset = 1, smodel.name
        for lam in lams:
            for n in steps:
                search2.ITERATIONS[4] = n
                t = time.perf_counter()
                header.second, bits, budget = twostage.encode(smodel, padded, base_px, tokens.numpy(),
                                                              base.config.tokenizer.bits, w, h, lam, effort=4)
                secs = time.perf_counter() - t
                data = container.pack(header, streams)
                px = twostage.pixels(smodel, base_px, bits, budget)[:h, :w]
                rows.append({"image": Path(f).name, "lambda": lam, "steps": n, "bytes": len(data),
                             "bpp": 8 * len(data) / (w * h), "psnr": psnr(arr, px), "seconds": secs})
                print(json.dumps(rows[-1]), flush=True)
    summary = {}
    for lam in lams:
        for n in steps:
            sel = [r for r in rows if r["lambda"] == lam and r["steps"] == n]
            summary[f"{lam:g}/{n}"] = {"bytes": sum(r["bytes"] for r in sel), "mean_psnr": float(np.mean([r["psnr"] for r in sel])),
                                       "bpp": float(np.mean([r["bpp"] for r in sel])), "seconds": float(np.mean([r["seconds"] for r in sel]))}
            print(f"lambda {lam:g} steps {n}: {summary[f'{lam:g}/{n}']}")
    out = {"schema": "bsqcodec-residual-search-1", "model": smodel.name, "model_hash": smodel.sha256[:16].hex(),
           "first_effort": args.first_effort, "images": [Path(f).name for f in files], "rows": rows, "summary": summary,
           "machine": describe()}
    if args.name:
        dest = Path(__file__).resolve().parent / "results" / f"residual-search-{args.name}.json"
        dest.write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {dest}")


if __name__ == "__main__":
    main()
