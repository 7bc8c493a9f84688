"""Which context should the second stage's bit prior see? A probe with the stage's coder frozen.

    python benchmarks/bitprior_variants.py RUN/residual.ckpt --data ../shared/data/train --cache-dir runs/cache
        [--crops 3000] [--steps 3000] [--name NAME]

The run's second-stage bits of cached training crops (and of the held-out crops) are computed once; float
bit priors of four designs are then trained on them from scratch, each the same way (budgets drawn region
by region as `--mixed` training draws them), and their held-out code lengths compared at uniform budgets
of 8 and 16 bits and at mixed budgets:
- `checker`: the shipped design (residual.BitPrior): the co-located first-stage token, two checkerboard
  passes, the second seeing its four first-pass neighbours;
- `base3x3`: that, seeing the 3x3 first-stage tokens around;
- `quad`: four passes ((even, even), (odd, odd), (even, odd), (odd, even) rows and columns), each token seeing
  its eight neighbours of earlier passes;
- `quad3x3`: both.
Two more ask whether the bits of one token predict each other (each bit is independent of its token's
other bits given the context in the designs above):
- `quad3x3+tri`: quad3x3, plus a strictly lower-triangular linear term from the token's own earlier
  (more significant, kept) bits to each bit's logit: decoding would go bit by bit within a pass;
- `quad3x3+halves`: quad3x3 for the first half of the bits; a second network sees that context and the
  first half's kept bits and gives the second half (two steps per pass).
Three more ask whether quad3x3 misses context or capacity:
- `quad3x3+px`: plus 64 features of the first stage's pixels around (a 3x3 convolution at the second grid);
- `quad3x3+bits5x5`: plus 64 features of the 5x5 neighbourhood's bits of earlier passes (pass k sees
  passes before k only);
- `quad3x3+w512`: its network twice as wide;
- `quad3x3+px+bits5x5`: the first two together.
`--variants` picks which run (the first six by default).
The coder was trained with the shipped design's rate term, so this ranks the designs' modelling power only.
Writes benchmarks/results/bitprior-variants-NAME.json.
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
from bsqcodec.model.residual import kept_mask
from bsqcodec.train.residual import _base_code, base_pixels, base_tokens, budget_maps, load_run

HERE = Path(__file__).resolve().parent
NEIGH8 = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]


class Variant(nn.Module):
    """A bit prior over one of the contexts above (1x1 layers, as BitPrior)."""

    def __init__(self, L1: int, ratio: int, bits: int, quad: bool, wide: bool, width: int = 256,
                 intra: str = "", px: int = 0, bitconv: int = 0, patch: int = 4) -> None:
        super().__init__()
        self.ratio, self.bits, self.quad, self.wide, self.intra = ratio, bits, quad, wide, intra
        passes = 4 if quad else 2
        ctx = L1 * (9 if wide else 1) + ratio * ratio + passes + (8 if quad else 4) * bits + 1
        self.patch = patch
        self.px = nn.Conv2d(3 * patch * patch, px, 3, padding=1) if px else None  # the base pixels around
        self.bitconv = nn.Conv2d(bits, bitconv, 5, padding=2) if bitconv else None  # earlier passes' bits, 5x5
        ctx += px + bitconv
        self.half = bits // 2 if intra == "halves" else bits
        self.net = nn.Sequential(nn.Conv2d(ctx, width, 1), nn.GELU(), nn.Conv2d(width, width, 1), nn.GELU(),
                                 nn.Conv2d(width, self.half, 1))
        if intra == "halves":
            self.net2 = nn.Sequential(nn.Conv2d(ctx + self.half, width, 1), nn.GELU(), nn.Conv2d(width, width, 1),
                                      nn.GELU(), nn.Conv2d(width, bits - self.half, 1))
        elif intra == "tri":
            self.tri = nn.Parameter(torch.zeros(bits, bits))
            self.register_buffer("tri_mask", torch.ones(bits, bits).tril(-1))

    def pass_of(self, H: int, W: int) -> torch.Tensor:
        yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
        if not self.quad:
            return (yy + xx) % 2
        return torch.tensor([[0, 2], [3, 1]])[yy % 2, xx % 2]  # (even, even) 0, (odd, odd) 1, (even, odd) 2, (odd, even) 3

    def logits(self, base_code, bits01, kept, base_px=None):
        B, L, H, W = bits01.shape
        r = self.ratio
        bc = F.unfold(F.pad(base_code, (1, 1, 1, 1)), 3).view(B, -1, *base_code.shape[2:]) if self.wide else base_code
        up = bc.repeat_interleave(r, 2).repeat_interleave(r, 3)[..., :H, :W]
        yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
        pos = F.one_hot((yy % r) * r + (xx % r), r * r).permute(2, 0, 1).float().expand(B, -1, -1, -1)
        ps = self.pass_of(H, W)
        onehot = F.one_hot(ps, 4 if self.quad else 2).permute(2, 0, 1).float().expand(B, -1, -1, -1)
        s = F.pad((bits01 * 2 - 1) * kept, (1, 1, 1, 1))
        pp = F.pad(ps.float(), (1, 1, 1, 1), value=99)
        offs = NEIGH8 if self.quad else [(0, -1), (0, 1), (-1, 0), (1, 0)]
        neigh = []
        for dy, dx in offs:
            n = s[:, :, 1 + dy : 1 + dy + H, 1 + dx : 1 + dx + W]
            earlier = (pp[1 + dy : 1 + dy + H, 1 + dx : 1 + dx + W] < ps.float()).float()  # decoded before this token
            neigh.append(n * earlier)
        budget = kept.mean(1, keepdim=True).expand(B, 1, H, W)
        extra = []
        if self.px is not None:
            extra.append(F.gelu(self.px(F.pixel_unshuffle(base_px - 0.5, self.patch))))
        if self.bitconv is not None:  # pass k sees the bits of passes before k only
            sb = (bits01 * 2 - 1) * kept
            f = 0
            for k in range(1, 4 if self.quad else 2):
                f = f + self.bitconv(sb * (ps < k).float()) * (ps == k).float()
            extra.append(F.gelu(f + self.bitconv.bias[None, :, None, None] * (ps == 0).float()))
        ctx = torch.cat([up, pos, onehot, *neigh, budget, *extra], 1)
        own = (bits01 * 2 - 1) * kept  # this token's kept bits, +-1 (0 where dropped)
        if self.intra == "halves":
            return torch.cat([self.net(ctx), self.net2(torch.cat([ctx, own[:, : self.half]], 1))], 1)
        out = self.net(ctx)
        if self.intra == "tri":  # bit i sees bits j < i of its own token
            out = out + torch.einsum("ij,bjhw->bihw", self.tri * self.tri_mask, own)
        return out

    def bits_of(self, base_code, bits01, kept, base_px=None):
        lg = self.logits(base_code, bits01, kept, base_px)
        return (F.binary_cross_entropy_with_logits(lg, bits01, reduction="none") * kept).sum((1, 2, 3)) / math.log(2)


@torch.no_grad()
def codes(res, crops, base, toks, L1):
    """(first-stage codes +-1, second-stage bits, first-stage pixels uint8 (B, 3, H, W))."""
    b1, b2, px = [], [], []
    for i in range(0, len(crops), 64):
        x = torch.from_numpy(np.array(crops[i : i + 64])).permute(0, 3, 1, 2).float() / 255
        px.append(torch.from_numpy(np.array(base[i : i + 64])).permute(0, 3, 1, 2).contiguous())
        b2.append((res.encode_latent(x, px[-1].float() / 255) > 0).to(torch.uint8))
        b1.append(_base_code(torch.from_numpy(np.array(toks[i : i + 64])), L1).to(torch.int8))
    return torch.cat(b1), torch.cat(b2), torch.cat(px)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--data", default="../shared/data/train")
    ap.add_argument("--cache-dir", required=True)
    ap.add_argument("--crops", type=int, default=3000)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--name", default="probe")
    ap.add_argument("--variants", default="checker,base3x3,quad,quad3x3,quad3x3+tri,quad3x3+halves")
    args = ap.parse_args()
    torch.manual_seed(0)
    run = load_run(args.checkpoint)
    st, res, base_model = run.checkpoint, run.coder, run.base
    cfg = res.cfg
    tok = base_model.tokenizer.eval()
    L1, P = base_model.config.tokenizer.bits, base_model.config.tokenizer.patch
    r = P // cfg.patch
    files = data_mod.find_images(args.data)
    tr_files, ev_files = data_mod.split_holdout(files)
    tr = data_mod.crop_cache(tr_files, 128, 16, 0, args.cache_dir)  # the training run's caches
    ev = data_mod.crop_cache(ev_files, 128, 2, 1, args.cache_dir)
    tr_b, ev_b = base_pixels(tok, tr, args.cache_dir, st["base"], "train"), base_pixels(tok, ev, args.cache_dir, st["base"], "eval")
    tr_t, ev_t = base_tokens(tok, tr, args.cache_dir, st["base"], "train"), base_tokens(tok, ev, args.cache_dir, st["base"], "eval")
    pick = np.random.default_rng(0).permutation(len(tr))[: args.crops]
    pick.sort()
    c1, c2, cp = codes(res, tr[pick], tr_b[pick], tr_t[pick], L1)
    e1, e2, ep = codes(res, ev, ev_b, ev_t, L1)
    print(f"codes: {len(c1)} training crops, {len(e1)} held out", flush=True)
    levels = (4, 8, 12, 16, 24, 24)
    out = {"checkpoint_step": st["step"], "crops": len(c1), "held_out": len(e1), "steps": args.steps, "variants": {}}
    designs = {"checker": (False, False, ""), "base3x3": (False, True, ""), "quad": (True, False, ""),
               "quad3x3": (True, True, ""), "quad3x3+tri": (True, True, "tri"), "quad3x3+halves": (True, True, "halves"),
               "quad3x3+px": (True, True, ""), "quad3x3+bits5x5": (True, True, ""), "quad3x3+w512": (True, True, ""),
               "quad3x3+px+bits5x5": (True, True, "")}
    for name in args.variants.split(","):
        quad, wide, intra = designs[name]
        torch.manual_seed(0)
        v = Variant(L1, r, cfg.bits, quad, wide, width=512 if "w512" in name else 256, intra=intra,
                    px=64 if "+px" in name else 0, bitconv=64 if "bits5x5" in name else 0, patch=cfg.patch)
        opt = torch.optim.AdamW(v.parameters(), lr=1e-3)
        rng = np.random.default_rng(0)
        t0 = time.time()
        for step in range(args.steps):
            idx = rng.integers(0, len(c1), args.batch)
            y0, x0 = (int(a) * P for a in rng.integers(0, (128 - 64) // P + 1, 2))
            base_code = c1[idx][:, :, y0 // P : (y0 + 64) // P, x0 // P : (x0 + 64) // P].float()
            bits = c2[idx][:, :, y0 // cfg.patch : (y0 + 64) // cfg.patch, x0 // cfg.patch : (x0 + 64) // cfg.patch].float()
            bpx = cp[idx][:, :, y0 : y0 + 64, x0 : x0 + 64].float() / 255
            keep = budget_maps(rng, levels, len(idx), 64 // cfg.patch, r, 0.5)
            for g in opt.param_groups:
                g["lr"] = 1e-3 * 0.5 * (1 + math.cos(math.pi * step / args.steps))
            loss = v.bits_of(base_code, bits, kept_mask(keep, cfg.bits), bpx).sum() / (len(idx) * 64 * 64)
            opt.zero_grad()
            loss.backward()
            opt.step()
        res_v = {}
        with torch.no_grad():
            erng = np.random.default_rng(1)
            for label, k in (("8b", 8), ("16b", 16), ("mixed", None)):
                tot = 0.0
                for i in range(0, len(e1), 64):
                    b1, b2 = e1[i : i + 64].float(), e2[i : i + 64].float()
                    side = b2.shape[-1]
                    keep = torch.full((len(b1),), k) if k else budget_maps(erng, levels, len(b1), side, r, 1.0)
                    tot += float(v.bits_of(b1, b2, kept_mask(keep, cfg.bits), ep[i : i + 64].float() / 255).sum())
                res_v[label] = tot / (len(e1) * 128 * 128)
        out["variants"][name] = {"held_out_bpp": res_v, "seconds": time.time() - t0}
        print(name, {k: round(x, 4) for k, x in res_v.items()}, f"{time.time() - t0:.0f} s", flush=True)
    (HERE / "results" / f"bitprior-variants-{args.name}.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
