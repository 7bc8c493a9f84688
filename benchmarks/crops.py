"""Crops to judge by eye: the original, bsqc's two looks of one file, and WebP and AVIF at the same bytes.

    python benchmarks/crops.py LOOK [IMAGE:X,Y ...] [--preset default] [--effort 4] [--tune sharp] [--size 192] [--out DIR]

LOOK is a look model file (`bsqc export-look`) or a decoder-only training checkpoint. Each image is encoded
once with the preset (with --tune sharp, its search aimed at LOOK, which must then be a look model file); WebP (method 6) and AVIF (speed 6) get the largest file not over bsqc's bytes. Per
image, one PNG holds the crop at X,Y (its top-left corner, in pixels) of all five, side by side and
labelled with bytes, PSNR and SSIMULACRA2 of the whole image, and a JSON line gives the numbers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from bsqcodec.bench import baselines
from bsqcodec.codec import codec
from bsqcodec.model import weights
from bsqcodec.metrics import psnr, ssimulacra2

HERE = Path(__file__).resolve().parent
DEFAULT = ["../shared/data/kodak/kodim19.png:300,150", "../shared/data/kodak/kodim05.png:380,180",
           "../shared/data/kodak/kodim14.png:200,250", "../shared/data/kodak/kodim23.png:330,60"]


def at_most(arr: np.ndarray, c: baselines.Codec, limit: int) -> baselines.Point | None:
    """The codec's largest file of at most `limit` bytes (bytes grow with quality, nearly)."""
    lo, hi, best = c.qmin, c.qmax, None
    while lo <= hi:
        mid = (lo + hi) // 2
        p = baselines.at_quality(arr, c, mid)
        if p.bytes <= limit:
            best, lo = p, mid + 1
        else:
            hi = mid - 1
    return best


def sharp_decoder(path: str, model):
    """(the look's decoder, its look model or None for a checkpoint)."""
    if path.endswith(".safetensors"):
        look = weights.load(path)
        if not look.fits(model):
            raise SystemExit(f"{path} is not a look of this preset's model")
        return look.tokenizer, look
    tok = weights.load_tokenizer_any(path)
    if not tok.cfg.encodes_like(model.config.tokenizer):
        raise SystemExit("the checkpoint's tokenizer does not read this preset's tokens")
    return tok, None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("look")
    ap.add_argument("images", nargs="*", default=DEFAULT)
    ap.add_argument("--preset", default="default")
    ap.add_argument("--effort", type=int, default=4)
    ap.add_argument("--tune", default="faithful", help="what the encoder's search aims at (as bsqc encode --tune)")
    ap.add_argument("--size", type=int, default=192)
    ap.add_argument("--out", default=str(HERE / "crops"))
    args = ap.parse_args()
    model = weights.preset(args.preset)
    sharp, look = sharp_decoder(args.look, model)
    if args.tune != "faithful" and look is None:
        raise SystemExit("--tune needs LOOK as a look model file (bsqc train export-look)")
    tuned = "" if args.tune == "faithful" else "/tuned"  # a short label: the panels are narrow
    Path(args.out).mkdir(parents=True, exist_ok=True)
    for spec in args.images:
        path, _, at = spec.partition(":")
        x0, y0 = (int(v) for v in at.split(",")) if at else (0, 0)
        a = np.asarray(Image.open(path).convert("RGB"))
        h, w = a.shape[:2]
        enc = codec.encode_array(a, model, effort=args.effort, models=[look] if look else None, tune=args.tune)
        n = len(enc.data)
        panels = [("original", a, None), ("bsqc faithful" + tuned, codec.tokens_to_array(model, enc.tokens, w, h), n),
                  ("bsqc sharp" + tuned, sharp.tokens_to_image(enc.tokens)[:h, :w].numpy(), n)]
        for c in (baselines.WEBP, baselines.AVIF):
            p = at_most(a, c, n)
            if p is not None:
                panels.append((c.name, baselines.decode(p.data), p.bytes))
        row = {"image": Path(path).name, "crop": [x0, y0, args.size], "tune": args.tune, "bsqc_bytes": n, "panels": []}
        s = args.size
        tiles = []
        for name, img, nbytes in panels:
            crop = img[y0 : y0 + s, x0 : x0 + s]
            label = name
            if nbytes is not None:
                q = {"bytes": nbytes, "psnr": psnr(a, img), "ssimulacra2": ssimulacra2(a, img)}
                row["panels"].append({"name": name, **q})
                label = f"{name}, {nbytes} bytes\n{q['psnr']:.1f} dB, SSIMULACRA2 {q['ssimulacra2']:.1f}"
            tile = Image.new("RGB", (s, s + 28), "white")
            tile.paste(Image.fromarray(np.ascontiguousarray(crop)), (0, 28))
            ImageDraw.Draw(tile).multiline_text((2, 2), label, fill="black", spacing=2)
            tiles.append(tile)
        sheet = Image.new("RGB", (len(tiles) * (s + 4), s + 28), "white")
        for i, t in enumerate(tiles):
            sheet.paste(t, (i * (s + 4), 0))
        tag = "" if args.tune == "faithful" else f"-tuned-{args.tune}"
        sheet.save(Path(args.out) / f"{Path(path).stem}-{args.preset}{tag}.png", optimize=True)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
