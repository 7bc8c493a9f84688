"""Rate and quality of the shipped presets on a folder of images (Kodak by default).

    python benchmarks/kodak.py [DIR] [--preset NAME ...]

For each preset: per image the real .bsq bytes, bpp, RGB PSNR, tokens, raw token bits, the bits the
prior spends per token, and encode seconds; then totals. Writes benchmarks/results/kodak-PRESET.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image

from bsqcodec.codec import codec
from bsqcodec.format import container
from bsqcodec.model import weights

HERE = Path(__file__).resolve().parent


def run(folder: Path, preset: str) -> dict:
    model = weights.preset(preset)
    rows = []
    for p in sorted(folder.glob("*.png")):
        arr = np.asarray(Image.open(p).convert("RGB"))
        t0 = time.perf_counter()
        enc = codec.encode_array(arr, model)
        secs = time.perf_counter() - t0
        recon = codec.tokens_to_array(model, enc.tokens, arr.shape[1], arr.shape[0])
        h, streams = container.unpack(enc.data)
        n = int(enc.tokens.numel())
        rows.append({
            "image": p.name, "width": arr.shape[1], "height": arr.shape[0], "bytes": len(enc.data),
            "bpp": len(enc.data) * 8 / (arr.shape[0] * arr.shape[1]), "psnr": codec.psnr(arr, recon),
            "tokens": n, "raw_bits_per_token": model.config.tokenizer.bits,
            "coded_bits_per_token": sum(map(len, streams)) * 8 / n, "estimated_bits_per_token": enc.estimated_bits / n,
            "payload_bits": sum(map(len, streams)) * 8, "estimated_bits": enc.estimated_bits, "tiles": h.tiles,
            "payload_within_bound": sum(map(len, streams)) * 8 <= 1.01 * enc.estimated_bits + 64 * h.tiles,
            "encode_seconds": secs,
        })
        print(f"{preset:8s} {p.name}: {rows[-1]['bpp']:.4f} bpp  {rows[-1]['psnr']:.2f} dB  "
              f"{rows[-1]['coded_bits_per_token']:.2f} bits/token", flush=True)
    tok = sum(r["tokens"] for r in rows)
    px = sum(r["width"] * r["height"] for r in rows)
    summary = {
        "images": len(rows), "total_bytes": sum(r["bytes"] for r in rows),
        "bpp": sum(r["bytes"] for r in rows) * 8 / px, "mean_psnr": float(np.mean([r["psnr"] for r in rows])),
        "raw_bits_per_token": model.config.tokenizer.bits,
        "raw_bpp": model.config.tokenizer.bits / model.config.tokenizer.patch ** 2,
        "coded_bits_per_token": sum(r["coded_bits_per_token"] * r["tokens"] for r in rows) / tok,
        "payload_within_bound_all": all(r["payload_within_bound"] for r in rows),
        "saving_vs_raw_tokens": 1 - sum(r["coded_bits_per_token"] * r["tokens"] for r in rows) / tok / model.config.tokenizer.bits,
    }
    return {"name": f"bsqcodec-{preset}", "preset": preset, "model": model.hash_hex, "dataset": folder.name,
            "summary": summary, "images": rows}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder", nargs="?", default="../shared/data/kodak")
    ap.add_argument("--preset", action="append")
    args = ap.parse_args()
    for preset in args.preset or sorted(weights.installed()):
        res = run(Path(args.folder), preset)
        out = HERE / "results" / f"{res['dataset']}-{preset}.json"
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps(res, indent=2) + "\n")
        print(json.dumps(res["summary"], indent=2))


if __name__ == "__main__":
    main()
