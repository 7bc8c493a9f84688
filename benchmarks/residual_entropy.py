"""How predictable the second stage's tokens are: a float probe of the rate a conditional prior could reach.

    python benchmarks/residual_entropy.py RUN/residual.ckpt --data ../shared/data/train --cache-dir runs/cache
        [--bits 16] [--crops 4000] [--steps 2000] [--batch 4] [--name NAME]

Tokens of the first stage (the checkpoint's base model, tokenizer signs) and the first --bits bits of the
second stage's tokens are computed for cached training crops (the held-out 2% for evaluation). Two small
float models (MLPs over gathered context, trained here with cross-entropy) predict each second-stage token
as groups of 8 bits, the second group given the first:
- `parallel`: context is the co-located first-stage token and the position within it (every second-stage
  token of an image could be decoded at once);
- `causal`: that, plus the second-stage tokens to the left, above, above-left and above-right (raster order).
Reports held-out bits per token and per pixel against the raw bits. A probe to choose a design by: not an
integer-exact prior, and no file is coded with it. Writes benchmarks/results/residual-entropy-NAME.json.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bsqcodec.train import data as data_mod
from bsqcodec.model import weights
from bsqcodec.model.residual import ResidualCoder, ResidualConfig
from bsqcodec.train.residual import base_pixels

HERE = Path(__file__).resolve().parent


@torch.no_grad()
def tokens_of(base_tok, res, crops, base, bits):
    """(first-stage bits (N, L1, h, w) as +-1, second-stage bits (N, bits, 2h', 2w') as 0/1)."""
    b1, b2 = [], []
    for i in range(0, len(crops), 64):
        x = torch.from_numpy(np.array(crops[i : i + 64])).permute(0, 3, 1, 2).float() / 255
        b = torch.from_numpy(np.array(base[i : i + 64])).permute(0, 3, 1, 2).float() / 255
        b1.append(torch.sign(base_tok.encode_latent(x)).clamp(min=-1))  # sign, 0 as -1 (x > 0 gives +1)
        b1[-1][b1[-1] == 0] = -1
        b2.append((res.encode_latent(x, b)[:, :bits] > 0).to(torch.uint8))
    return torch.cat(b1), torch.cat(b2)


class Probe(nn.Module):
    def __init__(self, L1: int, bits: int, causal: bool, ratio: int, width: int = 256) -> None:
        super().__init__()
        self.causal, self.ratio, self.bits = causal, ratio, bits
        ctx = L1 + ratio * ratio + (4 * bits if causal else 0)
        self.body = nn.Sequential(nn.Linear(ctx, width), nn.GELU(), nn.Linear(width, width), nn.GELU())
        self.g = bits // 2
        self.head0 = nn.Linear(width, 2**self.g)
        self.cond = nn.Linear(self.g, width)
        self.head1 = nn.Sequential(nn.GELU(), nn.Linear(width, 2 ** (bits - self.g)))

    def features(self, b1, b2):
        N, _, H, W = b2.shape
        r = self.ratio
        up = b1.repeat_interleave(r, 2).repeat_interleave(r, 3)  # co-located first-stage token
        pos = torch.zeros(N, r * r, H, W)
        yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
        pos[:, (yy % r) * r + (xx % r), yy, xx] = 1
        f = [up, pos]
        if self.causal:
            s = b2.float() * 2 - 1
            pad = F.pad(s, (1, 1, 1, 0))  # zeros outside
            f += [pad[:, :, 1:, :-2], pad[:, :, :-1, 1:-1], pad[:, :, :-1, :-2], pad[:, :, :-1, 2:]]  # left, up, up-left, up-right
        return torch.cat(f, 1).permute(0, 2, 3, 1).reshape(-1, sum(t.shape[1] for t in f))

    def bits_per_token(self, b1, b2):
        h = self.body(self.features(b1, b2))
        y = b2.permute(0, 2, 3, 1).reshape(-1, self.bits).long()
        w = 2 ** torch.arange(self.g - 1, -1, -1)
        s0 = (y[:, : self.g] * w).sum(1)
        w1 = 2 ** torch.arange(self.bits - self.g - 1, -1, -1)
        s1 = (y[:, self.g :] * w1).sum(1)
        l0 = F.cross_entropy(self.head0(h), s0)
        l1 = F.cross_entropy(self.head1(h + self.cond(y[:, : self.g].float() * 2 - 1)), s1)
        return (l0 + l1) / math.log(2)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--data", default="../shared/data/train")
    ap.add_argument("--cache-dir", required=True)
    ap.add_argument("--bits", type=int, default=16)
    ap.add_argument("--crops", type=int, default=4000)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=4, help="crops per step")
    ap.add_argument("--name", default="q5")
    args = ap.parse_args()
    torch.manual_seed(0)
    st = weights.load_checkpoint(args.checkpoint)
    cfg = ResidualConfig(**st["config"])
    res = ResidualCoder(cfg).eval()
    res.load_state_dict(weights.trained_state(st))
    base_tok = weights.load(st["base"]).tokenizer.eval()
    files = data_mod.find_images(args.data)
    tr_files, ev_files = data_mod.split_holdout(files)
    tr = data_mod.crop_cache(tr_files, 128, 16, 0, args.cache_dir)
    ev = data_mod.crop_cache(ev_files, 128, 2, 1, args.cache_dir)
    tr_base = base_pixels(base_tok, tr, args.cache_dir, st["base"], "train")
    ev_base = base_pixels(base_tok, ev, args.cache_dir, st["base"], "eval")
    idx = np.sort(np.random.default_rng(0).choice(len(tr), min(args.crops, len(tr)), replace=False))
    t0 = time.time()
    b1, b2 = tokens_of(base_tok, res, tr[idx], tr_base[idx], args.bits)
    e1, e2 = tokens_of(base_tok, res, ev, ev_base, args.bits)
    ratio = base_tok.cfg.patch // cfg.patch
    out = {}
    for causal in (False, True):
        m = Probe(b1.shape[1], args.bits, causal, ratio)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
        for step in range(args.steps):
            j = torch.randint(0, len(b1), (args.batch,))
            loss = m.bits_per_token(b1[j], b2[j])
            opt.zero_grad()
            loss.backward()
            opt.step()
            for g in opt.param_groups:
                g["lr"] = 1e-3 * (0.1 + 0.9 * (1 - step / args.steps))
        with torch.no_grad():
            ev_bits = float(m.bits_per_token(e1, e2))
        name = "causal" if causal else "parallel"
        out[name] = {"bits_per_token": ev_bits, "bpp": ev_bits / cfg.patch**2}
        print(name, out[name], f"{time.time() - t0:.0f} s", flush=True)
    p = e2.float().mean((0, 2, 3)).numpy()
    marg = float(sum(0 if q in (0, 1) else -(q * math.log2(q) + (1 - q) * math.log2(1 - q)) for q in p))
    res_json = {"checkpoint_step": st["step"], "bits": args.bits, "raw_bits_per_token": args.bits,
                "raw_bpp": args.bits / cfg.patch**2, "marginal_bits_per_token": marg, "train_crops": len(idx),
                "eval_crops": len(ev), "steps": args.steps, "batch_crops": args.batch, **out}
    (HERE / "results" / f"residual-entropy-{args.name}.json").write_text(json.dumps(res_json, indent=2) + "\n")
    print(json.dumps(res_json, indent=2))


if __name__ == "__main__":
    main()
