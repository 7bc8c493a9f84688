"""Speed and memory benchmark of the shipped model; writes benchmarks/results/speed.json.

    python benchmarks/speed.py [IMAGE] [--preset NAME] [--no-big]
    # IMAGE: a 768x512 photo, e.g. ../shared/data/kodak/kodim01.png; --no-big skips the 8192x8192 encode

Measures, on this machine: encode and decode seconds of the photo (decode best of 3, in process, with 1
and with all cores as `bsqc decode --threads N` uses them, checking that the pixels are identical), and the peak resident memory of a separate
process that encodes a synthetic 8192x8192 image. Targets: decode < 3 s on 2 cores; 8192x8192 encode
peak < 4 GB.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import bsqcodec
import machine  # benchmarks/machine.py
from bsqcodec.codec import codec, search
from bsqcodec.model import weights

HERE = Path(__file__).resolve().parent


def photo(path: str | None) -> np.ndarray:
    if path:
        return np.asarray(Image.open(path).convert("RGB"))
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((768, 512), Image.BICUBIC))


def big_encode_child(preset: str) -> None:
    """Runs in a child process: encode an 8192x8192 image, print peak memory and time."""
    import resource

    side = 8192
    yy, xx = np.mgrid[0:side, 0:side].astype(np.uint16)
    arr = np.stack([(xx // 32) % 256, (yy // 32) % 256, ((xx + yy) // 64) % 256], -1).astype(np.uint8)
    del yy, xx
    t0 = time.perf_counter()
    enc = codec.encode_array(arr, preset)
    secs = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"seconds": secs, "peak_bytes": peak, "bytes": len(enc.data)}))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--big-child":
        big_encode_child(sys.argv[2])
        return
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("image", nargs="?")
    ap.add_argument("--preset", default="default")
    ap.add_argument("--no-big", action="store_true", help="skip the 8192x8192 encode (minutes)")
    args = ap.parse_args()
    image_path, preset = args.image, args.preset
    model = weights.preset(preset)
    arr = photo(image_path)
    t0 = time.perf_counter()
    enc = codec.encode_array(arr, model)
    enc_s = time.perf_counter() - t0
    results = {}
    outs = {}
    for threads in (1, torch.get_num_threads()):
        torch.set_num_threads(threads)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            img = bsqcodec.decode(enc.data, workers=threads)  # as `bsqc decode --threads N`
            times.append(time.perf_counter() - t0)
        results[f"decode_seconds_{threads}_threads"] = min(times)
        outs[threads] = np.asarray(img)
    same = all(np.array_equal(outs[1], o) for o in outs.values())
    big = {"seconds": None, "peak_bytes": None}
    if not args.no_big:
        child = subprocess.run([sys.executable, __file__, "--big-child", preset], capture_output=True, text=True, check=True)
        big = json.loads(child.stdout.strip().splitlines()[-1])
    res = {
        "preset": preset, "model": model.hash_hex, "image": Path(image_path).name if image_path else "synthetic 768x512",
        "width": arr.shape[1], "height": arr.shape[0], "bytes": len(enc.data),
        "bpp": len(enc.data) * 8 / (arr.shape[0] * arr.shape[1]),
        "encode_seconds": enc_s, "effort": search.DEFAULT_EFFORT, **results, "pixels_identical_across_threads": same,
        "encode_8192x8192_seconds": big["seconds"], "encode_8192x8192_peak_bytes": big["peak_bytes"],
        "machine": {**machine.describe(model), "torch_threads": torch.get_num_threads()},
        "targets": {"decode_seconds_max": 3.0, "encode_8192_peak_bytes_max": 4 * 10**9},
    }
    out = HERE / "results" / f"speed-{preset}{machine.suffix()}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
