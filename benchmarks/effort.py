"""Encoder effort benchmark: bytes saved at equal PSNR against encoding time; writes results/effort-DATASET.json.

    python benchmarks/effort.py ../shared/data/kodak [--timing-image ../shared/data/kodak/kodim01.png]

For every rung of the installed ladder and every image, the search of the highest effort runs once
and its tokens are kept at each effort's number of iterations (search.trajectory: exactly what
`bsqc encode --effort N` computes, see tests/test_search.py); each grid is range-coded into a real
file (bytes with header) and decoded to pixels. Per effort: the ladder's curve (mean bpp over all
pixels against mean PSNR) and its BD-rate against effort 1. With --timing-image: the wall time of
`codec.encode_array` at every effort on that image (default and top rungs), best of --repeat runs.
Targets (issue 11): highest effort -15% BD-rate or better, default effort -8%; a 768x512 photo
under 60 s at the highest effort and under 3x effort 1's time at the default effort, on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from bsqcodec.codec import codec, images, search
from bsqcodec.model import weights
from bsqcodec.bench.bench import find_images
from bsqcodec.metrics import bd_rate, psnr

import machine  # benchmarks/machine.py

HERE = Path(__file__).resolve().parent
EFFORTS = list(range(search.MIN_EFFORT, search.MAX_EFFORT + 1))


def rung_points(model, files) -> dict:
    """{effort: {"bytes": [...], "psnr": [...], "pixels": [...]}} over the images."""
    bits = model.config.tokenizer.bits
    steps = sorted({search.ITERATIONS[e] for e in EFFORTS})
    out = {e: {"bytes": [], "psnr": [], "pixels": []} for e in EFFORTS}
    for path in files:
        arr, _, _ = images.read(path)
        h, w = arr.shape[:2]
        latent, costs = codec.search_inputs(model, arr)
        found = search.trajectory(model.tokenizer, latent, arr, steps, costs, search.rate_weight(bits))
        for e in EFFORTS:
            tokens = found[search.ITERATIONS[e]]
            out[e]["bytes"].append(len(codec.encode_grid(model, tokens, w, h).data))
            out[e]["psnr"].append(psnr(arr, codec.tokens_to_array(model, tokens, w, h)))
            out[e]["pixels"].append(w * h)
        print(f"  {model.name} {path.name}: " + ", ".join(f"e{e} {out[e]['bytes'][-1]} B {out[e]['psnr'][-1]:.2f} dB"
                                                   for e in (1, search.DEFAULT_EFFORT, search.MAX_EFFORT)), flush=True)
    return out


def timing(path: str, presets: list[str], repeat: int) -> dict:
    arr, _, _ = images.read(path)
    res = {}
    for name in presets:
        m = weights.preset(name)
        codec.encode_array(arr, m, effort=1)  # warm-up
        res[name] = {}
        for e in EFFORTS:
            best = min(_timed(lambda: codec.encode_array(arr, m, effort=e)) for _ in range(repeat))
            res[name][str(e)] = best
            print(f"  time {name} effort {e}: {best:.2f} s", flush=True)
    return res


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder")
    ap.add_argument("--preset", action="append", help="rungs to run [default: the installed ladder]")
    ap.add_argument("--limit", type=int)
    ap.add_argument("--timing-image")
    ap.add_argument("--timing-presets", default="default,q5")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--timing-only", action="store_true", help="only time --timing-image, into the existing results file")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.timing_only:
        out = Path(args.out) if args.out else HERE / "results" / f"effort-{Path(args.folder).name}.json"
        res = json.loads(out.read_text())
        res["timing_image"] = Path(args.timing_image).name
        res["encode_seconds"] = timing(args.timing_image, args.timing_presets.split(","), args.repeat)
        res["timing_machine"] = machine.describe()
        out.write_text(json.dumps(res, indent=1) + "\n")
        print(f"wrote {out}")
        return
    files = find_images(Path(args.folder), args.limit)
    presets = args.preset or [m.name for m in codec.ladder_models()]
    res = {"schema": "bsqcodec-effort-1", "dataset": Path(args.folder).name, "images": len(files),
           "efforts": search.steps(), "default_effort": search.DEFAULT_EFFORT,
           "lr": search.schedule(), "rate_weight": search.RATE_WEIGHT, "machine": machine.describe(),
           "torch": torch.__version__, "rungs": {}, "curves": {}, "bd_rate_vs_effort1": {}}
    t0 = time.perf_counter()
    for name in presets:
        m = weights.preset(name)
        res.setdefault("models", {})[name] = m.hash_hex
        pts = rung_points(m, files)
        res["rungs"][name] = {str(e): {"bytes": int(sum(v["bytes"])), "bpp": sum(v["bytes"]) * 8 / sum(v["pixels"]),
                                       "mean_psnr": float(np.mean(v["psnr"])), "per_image_bytes": v["bytes"],
                                       "per_image_psnr": v["psnr"]} for e, v in pts.items()}
    res["search_seconds_total"] = time.perf_counter() - t0
    for e in EFFORTS:
        res["curves"][str(e)] = [{"preset": n, "bpp": res["rungs"][n][str(e)]["bpp"], "psnr": res["rungs"][n][str(e)]["mean_psnr"]}
                                 for n in presets]
    base = res["curves"]["1"]
    for e in EFFORTS[1:]:
        cur = res["curves"][str(e)]
        try:
            res["bd_rate_vs_effort1"][str(e)] = bd_rate([d["bpp"] for d in base], [d["psnr"] for d in base],
                                                        [d["bpp"] for d in cur], [d["psnr"] for d in cur])
        except ValueError as err:
            res["bd_rate_vs_effort1"][str(e)] = None
            print(f"  effort {e}: {err}")
        print(f"effort {e}: BD-rate {res['bd_rate_vs_effort1'][str(e)]}", flush=True)
    if args.timing_image:
        res["timing_image"] = Path(args.timing_image).name
        res["encode_seconds"] = timing(args.timing_image, args.timing_presets.split(","), args.repeat)
    out = Path(args.out) if args.out else HERE / "results" / f"effort-{res['dataset']}.json"
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
