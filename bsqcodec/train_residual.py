"""Training loop of the second token stage (residual.py) on top of a frozen first-stage model file.

The first stage's pixels of every cached crop are computed once (uint8, as its decoder outputs them)
and cached beside the crops; each step then trains on random sub-crops of (image, base pixels).
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
from .errors import BsqError
from .residual import ResidualCoder, ResidualConfig
from .train import _ema_update, _main_thread, _Stop, lr_at, save_checkpoint
from .weights import load_checkpoint


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
    checkpoint_seconds: float = 300.0
    log: list = field(default_factory=list)


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
        x = torch.from_numpy(np.array(arr[i : i + 32])).permute(0, 3, 1, 2).float().div(255)
        y = tok.decode_code(tok.quant(tok.encode_latent(x)))
        out[i : i + 32] = (y.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        if progress is not None:
            progress(f"base pixels ({name}) {min(len(arr), i + 32)}/{len(arr)}")
    if path is not None:
        data_mod.save_atomic(path, out)
    return out


def _batch(arr, base, idx, rng, crop):
    """Random sub-crops (the same window and flip for image and base) -> two (B, 3, crop, crop) tensors."""
    idx = np.sort(idx)
    x, b = np.array(arr[idx]), np.array(base[idx])
    S = x.shape[1]
    y0, x0 = (int(v) for v in rng.integers(0, S - crop + 1, 2))
    x, b = x[:, y0 : y0 + crop, x0 : x0 + crop], b[:, y0 : y0 + crop, x0 : x0 + crop]
    flip = rng.random(len(idx)) < 0.5
    x[flip], b[flip] = x[flip, :, ::-1], b[flip, :, ::-1]

    def t(a):
        return torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2).float().div_(255)

    return t(x), t(b)


@torch.no_grad()
def evaluate(model: ResidualCoder, arr, base, bits: tuple[int, ...]) -> dict[int, float]:
    """Held-out PSNR for each bit budget (0: the base pixels alone)."""
    model.eval()
    out = {}
    try:
        for k in bits:
            tot = 0.0
            for i in range(0, len(arr), 32):
                x = torch.from_numpy(np.array(arr[i : i + 32])).permute(0, 3, 1, 2).float().div(255)
                b = torch.from_numpy(np.array(base[i : i + 32])).permute(0, 3, 1, 2).float().div(255)
                if k:
                    keep = torch.full((len(x),), k)
                    y, _ = model(x, b, keep)
                else:
                    y = b
                tot += F.mse_loss((y.clamp(0, 1) * 255).round() / 255, x, reduction="sum").item()
            out[k] = 10 * math.log10(1 / max(tot / (arr.shape[0] * arr[0].size), 1e-10))
    finally:
        model.train()
    return out


def train_residual(opts: ResidualOptions, progress=None) -> dict:
    if opts.threads:
        torch.set_num_threads(opts.threads)
    from .weights import load

    out = Path(opts.out)
    ckpt_path = out / "residual.ckpt"
    state = load_checkpoint(ckpt_path) if opts.resume and ckpt_path.exists() else None
    cfg = ResidualConfig(**state["config"]) if state is not None else opts.config
    nested = opts.nested or (cfg.bits,)
    if max(nested) > cfg.bits or min(nested) < 1:
        raise BsqError(f"--nested takes bit budgets from 1 to {cfg.bits}")
    torch.manual_seed(opts.seed)
    model = ResidualCoder(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=opts.lr, betas=(0.9, 0.99), weight_decay=0.0)
    rng = np.random.default_rng(opts.seed)
    step = 0
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        step = state["step"]
    elif opts.init:
        src = load_checkpoint(opts.init)
        own = model.state_dict()
        own.update({k: v for k, v in src.get("ema", src["model"]).items() if k in own and own[k].shape == v.shape})
        model.load_state_dict(own)
    ema = ResidualCoder(cfg)
    ema.load_state_dict(state["ema"] if state is not None else model.state_dict())
    ema.eval()

    base_model = load(opts.base).tokenizer.eval()
    files = data_mod.find_images(opts.data)
    if not files:
        raise BsqError(f"no .png or .jpg images under {opts.data}")
    train_files, eval_files = data_mod.split_holdout(files)
    if not train_files:
        train_files, eval_files = files, []
    tr = data_mod.crop_cache(train_files, opts.cache_crop, opts.per_image, opts.seed, opts.cache_dir)
    note = (lambda s: progress(step=step, note=s)) if progress is not None else None
    tr_base = base_pixels(base_model, tr, opts.cache_dir, opts.base, "train", note)
    ev = ev_base = None
    if eval_files:
        ev = data_mod.crop_cache(eval_files, opts.cache_crop, 2, opts.seed + 1, opts.cache_dir)
        ev_base = base_pixels(base_model, ev, opts.cache_dir, opts.base, "eval", note)
    eval_bits = opts.eval_bits or tuple(sorted({0, *nested}))

    stop = _Stop()
    old = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)} if _main_thread() else {}
    last_save = time.time()

    def save():
        save_checkpoint(ckpt_path, {
            "step": step, "config": cfg.to_dict(), "stage": "residual", "base": opts.base,
            "model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
            "rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state(),
        })

    try:
        while step < opts.steps:
            lr = lr_at(step, opts)
            for g in opt.param_groups:
                g["lr"] = lr
            idx = rng.integers(0, len(tr), opts.batch)
            x, b = _batch(tr, tr_base, idx, rng, opts.crop)
            keep = torch.from_numpy(np.asarray(nested)[rng.integers(0, len(nested), len(idx))])
            y, _ = model(x, b, keep)
            loss = F.mse_loss(y, x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            _ema_update(ema, model, min(opts.ema, (1 + step) / (10 + step)))
            if progress is not None:
                progress(step=step, loss=loss.item(), metric=10 * math.log10(1 / max(loss.item(), 1e-10)))
            if ev is not None and (step % opts.eval_every == 0 or step == opts.steps):
                res = evaluate(ema, ev, ev_base, eval_bits)
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
    return {"step": step, "config": cfg.to_dict(), "model": ema.state_dict(), "interrupted": step < opts.steps}
