"""Training loop of the second token stage (residual.py) on top of a frozen first-stage model file.

The first stage's pixels of every cached crop are computed once (uint8, as its decoder outputs them)
and cached beside the crops, and so are its tokens where a rate term needs them; each step then trains
on random sub-crops of (image, base pixels), cut on the first stage's patch grid.
"""

from __future__ import annotations

import hashlib
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import data as data_mod
from ..errors import BsqError
from ..model.residual import BitPrior, ResidualCoder, ResidualConfig, kept_mask
from ..model.tokenizer import tokens_to_bits
from .train import _ema_update, _main_thread, _Stop, lr_at, save_checkpoint
from ..model.weights import load_checkpoint


@dataclass
class ResidualOptions:
    data: str
    out: str
    base: str  # the first stage: a model file (.safetensors)
    config: ResidualConfig = field(default_factory=ResidualConfig)
    steps: int = 20000
    batch: int = 16
    crop: int = 64  # sub-crop trained on (cut from the cached crops and their base pixels)
    cache_crop: int = 128  # side of the cached crops (a multiple of the first stage's patch)
    per_image: int = 16  # cached crops per training image
    lr: float = 5e-4
    warmup: int = 200
    seed: int = 0
    resume: bool = False
    init: str | None = None  # a residual checkpoint to start from (tensors that match)
    nested: tuple[int, ...] = ()
    ema: float = 0.999
    cache_dir: str | None = None
    threads: int = 0
    eval_every: int = 500
    eval_bits: tuple[int, ...] = ()
    rate_weight: float = 0.0  # > 0: a BitPrior is trained with the stage and its code length weighs in (per bpp, MSE units)
    prior_width: int = 256
    mixed: float = 0.0  # share of samples whose budget is drawn region by region (one first-stage patch each)
    context: str = "checker"  # the bit prior's context kind (residual.BitPrior.KINDS)
    decoder_only: bool = False  # train the decoder alone (encoder frozen, so codes and files stay the same): a look
    perceptual: float = 0.0  # with decoder_only: weight of (100 - SSIMULACRA2) / 100 of the output beside squared error
    checkpoint_seconds: float = 300.0
    log: list = field(default_factory=list)


@dataclass
class Run:
    """A second-stage run's checkpoint, ready to use: its coder (trained weights, eval mode), the first-stage
    model it was trained on, and its float bit prior (None without a rate term)."""

    checkpoint: dict
    coder: ResidualCoder
    base: object  # weights.Model
    prior: BitPrior | None

    @property
    def ratio(self) -> int:
        return self.base.config.tokenizer.patch // self.coder.cfg.patch


def load_run(path, base=None) -> Run:
    """The run whose checkpoint is at `path` (base: another first-stage model file than the one it names)."""
    from ..model.weights import load, trained_state

    st = load_checkpoint(path)
    cfg = ResidualConfig(**st["config"])
    coder = ResidualCoder(cfg).eval()
    coder.load_state_dict(trained_state(st))
    base_model = load(base or st["base"])
    tok = base_model.config.tokenizer
    prior = None
    if "bit_prior" in st:
        prior = BitPrior.from_state(st["bit_prior"], tok.bits, tok.patch // cfg.patch, cfg.bits,
                                    st.get("context", "checker")).eval()
    return Run(st, coder, base_model, prior)


@torch.no_grad()
def base_pixels(tok, arr: np.ndarray, cache_dir: str | None, key_src: str, name: str, progress=None) -> np.ndarray:
    """The first stage's uint8 pixels of every crop in arr (N, S, S, 3), cached on disk."""
    st = os.stat(key_src)
    key = hashlib.sha256(repr((key_src, st.st_size, st.st_mtime_ns, arr.shape, int(arr[:64].sum()), name)).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"base-{key}.npy" if cache_dir else None
    if path is not None and path.exists():
        return np.load(path, mmap_mode="r")
    out = np.empty(arr.shape, np.uint8)
    for i in range(0, len(arr), 32):
        x = torch.from_numpy(np.array(arr[i : i + 32])).permute(0, 3, 1, 2).float().div(255).to(_device(tok))
        y = tok.decode_code(tok.quant(tok.encode_latent(x)))
        out[i : i + 32] = (y.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        if progress is not None:
            progress(f"base pixels ({name}) {min(len(arr), i + 32)}/{len(arr)}")
    if path is not None:
        data_mod.save_atomic(path, out)
    return out


@torch.no_grad()
def base_tokens(tok, arr: np.ndarray, cache_dir: str | None, key_src: str, name: str, progress=None) -> np.ndarray:
    """The first stage's tokens (its tokenizer's signs) of every crop in arr: (N, S/P, S/P) int64, cached on disk."""
    st = os.stat(key_src)
    key = hashlib.sha256(repr((key_src, st.st_size, st.st_mtime_ns, arr.shape, int(arr[:64].sum()), name, "tokens")).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"base-tokens-{key}.npy" if cache_dir else None
    if path is not None and path.exists():
        return np.load(path, mmap_mode="r")
    parts = []
    for i in range(0, len(arr), 32):
        x = torch.from_numpy(np.array(arr[i : i + 32])).permute(0, 3, 1, 2).float().div(255).to(_device(tok))
        parts.append(tok.quant.codes_to_tokens(tok.quant(tok.encode_latent(x))).cpu().numpy())
        if progress is not None:
            progress(f"base tokens ({name}) {min(len(arr), i + 32)}/{len(arr)}")
    out = np.concatenate(parts)
    if path is not None:
        data_mod.save_atomic(path, out)
    return out


def _device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def _batch(arr, base, idx, rng, crop, toks=None, patch=1):
    """Random sub-crops (the same window and flip for image, base pixels and base tokens; the window on the
    first stage's patch grid) -> (x, base) (B, 3, crop, crop), and base tokens (B, crop/P, crop/P) or None."""
    idx = np.sort(idx)
    x, b = np.array(arr[idx]), np.array(base[idx])
    S = x.shape[1]
    y0, x0 = (int(v) * patch for v in rng.integers(0, (S - crop) // patch + 1, 2))
    x, b = x[:, y0 : y0 + crop, x0 : x0 + crop], b[:, y0 : y0 + crop, x0 : x0 + crop]
    t1 = None
    if toks is None:  # flips only without tokens: a flipped image's tokens are not its tokens flipped
        flip = rng.random(len(idx)) < 0.5
        x[flip], b[flip] = x[flip, :, ::-1], b[flip, :, ::-1]
    else:
        t1 = torch.from_numpy(np.array(toks[idx])[:, y0 // patch : (y0 + crop) // patch, x0 // patch : (x0 + crop) // patch])

    def t(a):
        return torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2).float().div_(255)

    return t(x), t(b), t1


def budget_maps(rng: np.random.Generator, levels, batch: int, side: int, region: int, mixed: float) -> torch.Tensor:
    """(batch, side, side) bit budgets per token, drawn from levels: a share `mixed` of the samples gets
    one budget per region of region x region tokens, from levels and 0 (as an encoder that chooses region
    by region gives them: flat regions keep nothing), the others one budget of levels for the whole sample."""
    levels = np.asarray(levels)
    n = -(-side // region)
    with_zero = np.asarray([0, *levels])
    per_region = with_zero[rng.integers(0, len(with_zero), (batch, n, n))]
    whole = levels[rng.integers(0, len(levels), batch)][:, None, None]
    maps = np.where(rng.random(batch)[:, None, None] < mixed, per_region, whole)
    return torch.from_numpy(maps.repeat(region, 1).repeat(region, 2)[:, :side, :side].copy())


def _base_code(t1: torch.Tensor, base_bits: int) -> torch.Tensor:
    """First-stage tokens (B, h, w) -> their codes as +-1 (B, L1, h, w)."""
    return (tokens_to_bits(t1, base_bits).float() * 2 - 1).permute(0, 3, 1, 2)


def _bits01(code: torch.Tensor, bits: int) -> torch.Tensor:
    """A (kept-bit) code (+-1/sqrt(L) or 0) -> 0/1 bits, straight-through as the code is (0 where not kept: 1/2)."""
    return (code * math.sqrt(bits) + 1) / 2


@torch.no_grad()
def evaluate(model: ResidualCoder, arr, base, bits: tuple[int, ...], prior: BitPrior | None = None, toks=None,
             base_bits: int = 0, ssimulacra2: bool = False) -> dict:
    """Held-out PSNR for each bit budget (0: the base pixels alone); with a bit prior, (PSNR, its bpp); with
    ssimulacra2, also "ssimulacra2": the mean SSIMULACRA2 of the same outputs over the budgets but 0."""
    if ssimulacra2:
        from .. import perceptual
    model.eval()
    out = {}
    s2, n2 = 0.0, 0
    try:
        for k in bits:
            tot, rate = 0.0, 0.0
            for i in range(0, len(arr), 32):
                dev = _device(model)
                x = torch.from_numpy(np.array(arr[i : i + 32])).permute(0, 3, 1, 2).float().div(255).to(dev)
                b = torch.from_numpy(np.array(base[i : i + 32])).permute(0, 3, 1, 2).float().div(255).to(dev)
                if k:
                    keep = torch.full((len(x),), k, device=dev)
                    y, code = model(x, b, keep)
                    if prior is not None:
                        c1 = _base_code(torch.from_numpy(np.array(toks[i : i + 32])).to(dev), base_bits)
                        rate += float(prior.bits_of(c1, _bits01(code, model.cfg.bits), kept_mask(keep, model.cfg.bits)).sum())
                else:
                    y = b
                if ssimulacra2 and k:
                    s2 += perceptual.score(x, y.clamp(0, 1), full_layout=True).sum().item()
                    n2 += len(x)
                tot += F.mse_loss((y.clamp(0, 1) * 255).round() / 255, x, reduction="sum").item()
            p = 10 * math.log10(1 / max(tot / (arr.shape[0] * arr[0].size), 1e-10))
            out[k] = (p, rate / (arr.shape[0] * arr.shape[1] * arr.shape[2])) if prior is not None else p
        if ssimulacra2:
            out["ssimulacra2"] = s2 / max(n2, 1)
    finally:
        model.train()
    return out


def init_state(path: str | os.PathLike) -> dict:
    """What --init starts from: a residual checkpoint, or a shipped second-stage model file, whose coder
    (stored int8 per channel) and integer bit prior read back as float weights ({"model", "bit_prior"})."""
    if not str(path).endswith(".safetensors"):
        return load_checkpoint(path)
    from ..model import intbits
    from ..model.second import SecondModel
    from ..model.weights import load

    m = load(path)
    if not isinstance(m, SecondModel):
        raise BsqError(f"--init {path}: not a second-stage model file")
    return {"model": m.coder.state_dict(),
            "bit_prior": intbits.float_state(m.tensors, m.config.budget, m.config.residual.bits)}


def train_residual(opts: ResidualOptions, progress=None) -> dict:
    if opts.threads:
        torch.set_num_threads(opts.threads)
    from ..model.weights import load

    out = Path(opts.out)
    ckpt_path = out / "residual.ckpt"
    state = load_checkpoint(ckpt_path) if opts.resume and ckpt_path.exists() else None
    cfg = ResidualConfig(**state["config"]) if state is not None else opts.config
    nested = opts.nested or (cfg.bits,)
    if max(nested) > cfg.bits or min(nested) < 1:
        raise BsqError(f"--nested takes bit budgets from 1 to {cfg.bits}")
    torch.manual_seed(opts.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # as train.py: a GPU where there is one
    model = ResidualCoder(cfg).to(device)
    base_model = load(opts.base).tokenizer.eval().to(device)
    lam = state.get("rate_weight", 0.0) if state is not None else opts.rate_weight
    decoder_only = state.get("decoder_only", False) if state is not None else opts.decoder_only
    perceptual = state.get("perceptual", 0.0) if state is not None else opts.perceptual
    if perceptual and not decoder_only:
        raise BsqError("--perceptual trains a decoder only (--decoder-only)")
    if decoder_only and (lam or (state is None and not opts.init)):
        raise BsqError("--decoder-only fine-tunes a trained stage: give --init, and no --rate-weight (its codes do not change)")
    if perceptual:
        from ..perceptual import loss as perceptual_loss
    ratio = base_model.cfg.patch // cfg.patch
    mixed = state.get("mixed", 0.0) if state is not None else opts.mixed
    kind = state.get("context", "checker") if state is not None else opts.context
    prior = None
    if lam:  # a prior that sees budgets where they vary (and in runs that start from one that did)
        budget = bool(mixed) or (state is not None and state["bit_prior"]["net.0.weight"].shape[1]
                                 == BitPrior.context_size(base_model.cfg.bits, ratio, cfg.bits, True, kind))
        prior = BitPrior(base_model.cfg.bits, ratio, cfg.bits, opts.prior_width, budget, kind).to(device)
    if decoder_only:  # the encoder frozen: every code, and so every file, stays what the init's encoder makes
        for name, p in model.named_parameters():
            p.requires_grad_(not name.startswith(ResidualCoder.ENCODER))
    params = [p for p in model.parameters() if p.requires_grad] + (list(prior.parameters()) if prior is not None else [])
    opt = torch.optim.AdamW(params, lr=opts.lr, betas=(0.9, 0.99), weight_decay=0.0)
    rng = np.random.default_rng(opts.seed)
    step = 0
    if state is not None:
        model.load_state_dict(state["model"])
        if prior is not None:
            prior.load_state_dict(state["bit_prior"])
        opt.load_state_dict(state["opt"])
        rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        step = state["step"]
    elif opts.init:
        src = init_state(opts.init)
        weights_in = src.get("ema", src["model"])
        if weights_in["to_code.weight"].shape[0] < cfg.bits:  # a wider code than the init's: its bits come first
            model.load_narrower(weights_in)
        else:
            own = model.state_dict()
            own.update({k: v for k, v in weights_in.items() if k in own and own[k].shape == v.shape})
            model.load_state_dict(own)
        if prior is not None and "bit_prior" in src:
            prior.load_older(src["bit_prior"])
    ema = ResidualCoder(cfg).to(device)
    ema.load_state_dict(state["ema"] if state is not None else model.state_dict())
    ema.eval()

    files = data_mod.find_images(opts.data)
    if not files:
        raise BsqError(f"no .png or .jpg images under {opts.data}")
    train_files, eval_files = data_mod.split_holdout(files)
    if not train_files:
        train_files, eval_files = files, []
    tr = data_mod.crop_cache(train_files, opts.cache_crop, opts.per_image, opts.seed, opts.cache_dir)
    note = (lambda s: progress(step=step, note=s)) if progress is not None else None
    tr_base = base_pixels(base_model, tr, opts.cache_dir, opts.base, "train", note)
    ev = ev_base = tr_toks = ev_toks = None
    if prior is not None:
        tr_toks = base_tokens(base_model, tr, opts.cache_dir, opts.base, "train", note)
    if eval_files:
        ev = data_mod.crop_cache(eval_files, opts.cache_crop, 2, opts.seed + 1, opts.cache_dir)
        ev_base = base_pixels(base_model, ev, opts.cache_dir, opts.base, "eval", note)
        if prior is not None:
            ev_toks = base_tokens(base_model, ev, opts.cache_dir, opts.base, "eval", note)
    P, L1 = base_model.cfg.patch, base_model.cfg.bits
    eval_bits = opts.eval_bits or tuple(sorted({0, *nested}))

    stop = _Stop()
    old = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)} if _main_thread() else {}
    last_save = time.time()

    def save():
        save_checkpoint(ckpt_path, {
            "step": step, "config": cfg.to_dict(), "stage": "residual", "base": opts.base,
            "model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
            "rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state(), "rate_weight": lam, "mixed": mixed, "context": kind,
            "decoder_only": decoder_only, "perceptual": perceptual,
            **({"bit_prior": prior.state_dict()} if prior is not None else {}),
        })

    try:
        while step < opts.steps:
            lr = lr_at(step, opts)
            for g in opt.param_groups:
                g["lr"] = lr
            idx = rng.integers(0, len(tr), opts.batch)
            x, b, t1 = (None if t is None else t.to(device) for t in _batch(tr, tr_base, idx, rng, opts.crop, tr_toks, P))
            if mixed:
                keep = budget_maps(rng, nested, len(idx), opts.crop // cfg.patch, ratio, mixed)
            else:  # one budget per sample (the draw of runs before budget maps, kept so that they resume alike)
                keep = torch.from_numpy(np.asarray(nested)[rng.integers(0, len(nested), len(idx))])
            keep = keep.to(device)
            y, code = model(x, b, keep)
            loss = mse = F.mse_loss(y, x)
            if perceptual:
                loss = loss + perceptual * perceptual_loss(x, y.clamp(0, 1))
            if prior is not None:  # + lambda x bits per pixel of the kept bits under the bit prior
                bits = prior.bits_of(_base_code(t1, L1), _bits01(code, cfg.bits), kept_mask(keep, cfg.bits))
                loss = loss + lam * bits.sum() / (x.shape[0] * x.shape[2] * x.shape[3])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
            _ema_update(ema, model, min(opts.ema, (1 + step) / (10 + step)))
            if progress is not None:
                progress(step=step, loss=loss.item(), metric=10 * math.log10(1 / max(mse.item(), 1e-10)))  # PSNR of y
            if ev is not None and (step % opts.eval_every == 0 or step == opts.steps):
                res = evaluate(ema, ev, ev_base, eval_bits, prior, ev_toks, L1, ssimulacra2=bool(perceptual))
                opts.log.append({"step": step, "eval": res})
                if progress is not None:
                    progress(step=step, eval=res)
            if time.time() - last_save > opts.checkpoint_seconds and not stop.flag:
                save()
                last_save = time.time()
            if stop.flag:
                break
        save()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return {"step": step, "config": cfg.to_dict(), "model": ema.state_dict(), "interrupted": step < opts.steps,
            **({"bit_prior": prior.state_dict()} if prior is not None else {})}
