"""The second token stage (bsqcodec/residual.py) by kept bits: what it adds to its first stage's pixels.

    python benchmarks/residual_bits.py RUN/residual.ckpt [DIR] [--bits 4,8,12,16,24] [--effort 1] [--name NAME]

The first stage is the checkpoint's base model file: each image is encoded by it (at --effort; 1 is the
tokenizer's own tokens) and decoded to its uint8 pixels; the second stage then codes what they miss with
the first k bits of each of its tokens. Reports mean RGB PSNR of the base pixels and after each budget,
the raw bits per pixel of the stage (k / patch^2), the base file's real bits per pixel, the mean
binary entropy of each kept bit (a rough bound for a prior that sees no context), and, for a run trained
with a rate term, the code length its float bit prior gives the stage (an estimate: no file is coded). Writes benchmarks/results/residual-bits-NAME.json.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bsqcodec.codec import codec
from bsqcodec.train.residual import load_run
from bsqcodec.model.tokenizer import tokens_to_bits

HERE = Path(__file__).resolve().parent


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255**2 / ((a.astype(np.float64) - b) ** 2).mean()))


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("folder", nargs="?", default="../shared/data/kodak")
    ap.add_argument("--bits", default="4,8,12,16,24")
    ap.add_argument("--effort", type=int, default=1)
    ap.add_argument("--name", default="q5")
    args = ap.parse_args()
    run = load_run(args.checkpoint)  # with a rate term, its bit prior estimates the stage's rate
    st, res, base_model, prior = run.checkpoint, run.coder, run.base, run.prior
    cfg = res.cfg
    L1 = base_model.config.tokenizer.bits
    files = sorted(Path(args.folder).glob("*.png"))
    budgets = [int(b) for b in args.bits.split(",") if int(b) <= cfg.bits]
    base_ps, base_bpp, ps = [], [], {k: [] for k in budgets}
    ones = {k: np.zeros(k) for k in budgets}
    est = {k: [] for k in budgets}
    count = 0
    for f in files:
        a = np.asarray(Image.open(f).convert("RGB"))
        enc = codec.encode_array(a, base_model, effort=args.effort)
        base = codec.tokens_to_array(base_model, enc.tokens, a.shape[1], a.shape[0])
        base_ps.append(psnr(base, a))
        base_bpp.append(len(enc.data) * 8 / (a.shape[0] * a.shape[1]))
        p = cfg.patch
        h, w = a.shape[0] // p * p, a.shape[1] // p * p
        x = torch.from_numpy(a[:h, :w].copy()).permute(2, 0, 1)[None].float() / 255
        b = torch.from_numpy(base[:h, :w].copy()).permute(2, 0, 1)[None].float() / 255
        code = res.quant(res.encode_latent(x, b))
        bits = (code[0] > 0).reshape(cfg.bits, -1).double()
        count += bits.shape[1]
        for k in budgets:
            kept = code * (torch.arange(cfg.bits) < k).to(code.dtype)[None, :, None, None]
            y = (res.decode_code(kept, b).clamp(0, 1) * 255).round()[0].permute(1, 2, 0).numpy()
            out = base.copy()
            out[:h, :w] = y
            ps[k].append(psnr(out, a))
            ones[k] += bits[:k].sum(1).numpy()
            if prior is not None:
                t1 = enc.tokens[: h // base_model.config.tokenizer.patch, : w // base_model.config.tokenizer.patch]
                c1 = (tokens_to_bits(t1[None], L1).float() * 2 - 1).permute(0, 3, 1, 2)
                kept_mask = (torch.arange(cfg.bits) < k).float()[None, :, None, None]
                b01 = (code > 0).float()
                est[k].append(float(prior.bits_of(c1, b01, kept_mask)[0]) / (a.shape[0] * a.shape[1]))
        print(f.name, f"base {base_ps[-1]:.2f}", " ".join(f"{k}b {ps[k][-1]:.2f}" for k in budgets), flush=True)

    def h2(q):
        return 0.0 if q <= 0 or q >= 1 else -(q * math.log2(q) + (1 - q) * math.log2(1 - q))

    rows = [{"bits": k, "raw_bpp": k / cfg.patch**2, "mean_psnr": float(np.mean(ps[k])),
             "gain_db": float(np.mean(ps[k]) - np.mean(base_ps)),
             "marginal_entropy_bpp": sum(h2(q) for q in ones[k] / count) / cfg.patch**2,
             **({"bit_prior_bpp": float(np.mean(est[k])),
                 "total_bpp_estimate": float(np.mean(base_bpp) + np.mean(est[k]))} if prior is not None else {})}
            for k in budgets]
    out = {"checkpoint_step": st["step"], "config": cfg.to_dict(), "base": Path(str(st["base"])).name,
           "base_effort": args.effort, "dataset": Path(args.folder).name, "images": len(files),
           "base_mean_psnr": float(np.mean(base_ps)), "base_bpp": float(np.mean(base_bpp)), "levels": rows}
    (HERE / "results" / f"residual-bits-{args.name}.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
