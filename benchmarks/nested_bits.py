"""Tokenizer quality by kept bits, for a nested-BSQ tokenizer (how much each prefix length buys).

    python benchmarks/nested_bits.py TOKENIZER [DIR] [--bits 6,10,16,24,28,36,48] [--name NAME]

TOKENIZER is a tokenizer checkpoint (.ckpt) or a model file; every budget k keeps the first k bits of
each token (`Tokenizer.truncated`). Reports mean RGB PSNR of the tokenizer alone (no entropy coding)
and the raw bits per pixel k / patch^2. Writes benchmarks/results/nested-bits-NAME.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bsqcodec.model.weights import load_tokenizer_any

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("tokenizer")
    ap.add_argument("folder", nargs="?", default="../shared/data/kodak")
    ap.add_argument("--bits", default="6,10,16,24,28,36,48")
    ap.add_argument("--name", default="ladder")
    args = ap.parse_args()
    full = load_tokenizer_any(args.tokenizer).eval()
    files = sorted(Path(args.folder).glob("*.png"))
    arrs = [np.asarray(Image.open(p).convert("RGB")) for p in files]
    rows = []
    for k in [int(b) for b in args.bits.split(",") if int(b) <= full.cfg.bits]:
        tok = full.truncated(k)
        ps = []
        for a in arrs:
            h, w = (a.shape[0] // tok.cfg.patch) * tok.cfg.patch, (a.shape[1] // tok.cfg.patch) * tok.cfg.patch
            a = a[:h, :w]
            y = tok.tokens_to_image(tok.image_to_tokens(a)).numpy().astype(np.float64)
            ps.append(float(10 * np.log10(255**2 / ((y - a) ** 2).mean())))
        rows.append({"bits": k, "raw_bpp": k / tok.cfg.patch**2, "mean_psnr": float(np.mean(ps))})
        print(json.dumps(rows[-1]), flush=True)
    res = {"tokenizer": Path(args.tokenizer).name, "tokenizer_bits": full.cfg.bits, "dataset": Path(args.folder).name,
           "images": len(arrs), "torch_threads": torch.get_num_threads(), "levels": rows}
    out = HERE / "results" / f"nested-bits-{args.name}.json"
    out.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
