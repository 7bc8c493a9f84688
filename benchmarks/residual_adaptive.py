"""Rate that follows the picture, measured before it is built: the second stage with a bit budget per region.

    python benchmarks/residual_adaptive.py RUN/residual.ckpt [DIR] [--region 8] [--choices 0,4,8,12,16,24]
        [--lambdas ...] [--name NAME]

For each image the first stage is coded at effort 1 (as residual_bits.py does). Every region of
--region x --region pixels keeps a prefix of each of its second-stage tokens; the prefix length is chosen
from --choices by a rate-distortion rule, region by region: with every region at the same budget k,
note each region's squared error and its code length under the run's bit prior, then for each lambda
give every region the k that minimises error + lambda x bits. The chosen map is then decoded and
coded for real (mixed budgets, which the decoder was not trained on), and its cost counted: the stage's
bits under the bit prior plus the map's own cost (its empirical entropy per image, a bound a simple
adaptive coder gets close to). Uniform budgets are reported beside it, so the two curves compare.
Writes benchmarks/results/residual-adaptive-NAME.json.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from bsqcodec.codec import codec
from bsqcodec.train.residual import load_run
from bsqcodec.model.tokenizer import tokens_to_bits

HERE = Path(__file__).resolve().parent


def psnr_of(se: float, n: int) -> float:
    return 10 * math.log10(255**2 * n / max(se, 1e-9))


def entropy_bits(labels: np.ndarray) -> float:
    _, counts = np.unique(labels, return_counts=True)
    q = counts / counts.sum()
    return float(-(counts * np.log2(q)).sum())


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("folder", nargs="?", default="../shared/data/kodak")
    ap.add_argument("--region", type=int, default=8)
    ap.add_argument("--choices", default="0,4,8,12,16,24")
    ap.add_argument("--lambdas", default="4,8,16,32,64,128")
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--name", default="q5")
    args = ap.parse_args()
    run = load_run(args.checkpoint)
    st, res, base_model, prior = run.checkpoint, run.coder, run.base, run.prior
    cfg = res.cfg
    L1 = base_model.config.tokenizer.bits
    choices = [int(c) for c in args.choices.split(",")]
    lambdas = [float(v) for v in args.lambdas.split(",")]
    R, p = args.region, cfg.patch
    files = sorted(Path(args.folder).glob("*.png"))[: args.limit or None]
    uni = {k: [0.0, 0.0] for k in choices}  # squared error, bits
    ada = {lam: [0.0, 0.0, 0.0] for lam in lambdas}  # squared error, stage bits, map bits
    usage = {lam: np.zeros(len(choices)) for lam in lambdas}
    npx, base_bits = 0, 0.0
    for f in files:
        a = np.asarray(Image.open(f).convert("RGB"))
        H, W = a.shape[0] // R * R, a.shape[1] // R * R  # Kodak: whole image
        a = a[:H, :W]
        enc = codec.encode_array(a, base_model, effort=1)
        base = codec.tokens_to_array(base_model, enc.tokens, W, H)
        base_bits += len(enc.data) * 8
        npx += H * W
        x = torch.from_numpy(a.copy()).permute(2, 0, 1)[None].float() / 255
        b = torch.from_numpy(base.copy()).permute(2, 0, 1)[None].float() / 255
        code = res.quant(res.encode_latent(x, b))
        c1 = (tokens_to_bits(torch.as_tensor(enc.tokens)[None], L1).float() * 2 - 1).permute(0, 3, 1, 2)
        b01 = (code > 0).float()
        idx = torch.arange(cfg.bits)[None, :, None, None]

        def run(kmap: torch.Tensor):
            """kmap (H/p, W/p) budgets -> (per-region squared error, per-region bits, total se, total bits)."""
            kept = (idx < kmap[None, None]).float()
            y = (res.decode_code(code * kept, b).clamp(0, 1) * 255).round()
            se = ((y - x * 255) ** 2).sum(1)[0]  # (H, W)
            lg = prior.logits(c1, b01, kept)
            nll = (F.binary_cross_entropy_with_logits(lg, b01, reduction="none") * kept).sum(1)[0] / math.log(2)
            se_r = F.avg_pool2d(se[None, None], R, divisor_override=1)[0, 0]
            bits_r = F.avg_pool2d(nll[None, None], R // p, divisor_override=1)[0, 0]
            return se_r, bits_r, float(se.sum()), float(nll.sum())

        se_k, bits_k = [], []
        for k in choices:
            se_r, bits_r, se, bits = run(torch.full((H // p, W // p), k))
            uni[k][0] += se
            uni[k][1] += bits
            se_k.append(se_r)
            bits_k.append(bits_r)
        se_k, bits_k = torch.stack(se_k), torch.stack(bits_k)  # (K, hr, wr)
        for lam in lambdas:
            pick = (se_k + lam * bits_k).argmin(0)  # (hr, wr)
            kmap = torch.as_tensor(choices)[pick].repeat_interleave(R // p, 0).repeat_interleave(R // p, 1)
            _, _, se, bits = run(kmap)
            ada[lam][0] += se
            ada[lam][1] += bits
            ada[lam][2] += entropy_bits(pick.numpy().ravel())
            usage[lam] += np.bincount(pick.numpy().ravel(), minlength=len(choices))
        print(f.name, flush=True)
    n = npx * 3
    base_bpp = base_bits / npx
    out = {
        "checkpoint_step": st["step"], "dataset": Path(args.folder).name, "images": len(files), "region": R,
        "base_bpp": base_bpp,
        "uniform": [{"bits": k, "psnr": psnr_of(uni[k][0], n), "bpp": base_bpp + uni[k][1] / npx} for k in choices],
        "adaptive": [{"lambda": lam, "psnr": psnr_of(ada[lam][0], n), "bpp": base_bpp + (ada[lam][1] + ada[lam][2]) / npx,
                      "map_bpp": ada[lam][2] / npx,
                      "share": {str(k): float(u) for k, u in zip(choices, usage[lam] / usage[lam].sum())}}
                     for lam in lambdas],
    }
    (HERE / "results" / f"residual-adaptive-{args.name}.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
