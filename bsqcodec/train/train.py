"""Training loops for the tokenizer and the prior: checkpoints, exact resume, optional DDP.

Runs alone (`bsqc train ...`) or under `torchrun` (one process per device, DistributedDataParallel).
"""

from __future__ import annotations

import gc
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import data as data_mod
from ..config import ARCHITECTURES, ModelConfig
from ..errors import BsqError
from ..model.tokenizer import Tokenizer
from ..model.weights import load_checkpoint, load_tokenizer_any, trained_state


@dataclass
class TrainOptions:
    stage: str  # "tokenizer" or "prior"
    data: str
    out: str  # run directory: checkpoints live here
    arch: str = "default"
    eval_dir: str | None = None
    steps: int = 10000
    batch: int = 16
    crop: int = 128
    lr: float = 1e-3
    warmup: int = 200
    seed: int = 0
    resume: bool = False
    checkpoint_seconds: float = 300.0
    eval_every: int = 500
    per_image: int = 16
    cache_dir: str | None = None
    tokenizer_ckpt: str | None = None  # prior stage: the frozen tokenizer
    threads: int = 0
    init: str | None = None  # start from these weights (a checkpoint or model file); see _init_from
    nested: tuple[int, ...] = ()  # tokenizer stage: each sample keeps one of these bit budgets (repeats weigh more)
    code_lr_mult: float = 1.0  # tokenizer stage: learning-rate factor of the BSQ projections (to_code, from_code)
    bf16: bool = False  # forward pass under bfloat16 autocast (weights and optimizer stay float32)
    ema: float = 0.0  # decay of an exponential moving average of the weights (0: none); evaluated and exported
    decoder_only: bool = False  # tokenizer stage: the encoder is frozen, so the tokens (and a prior on them) stay valid
    adversarial: float = 0.0  # decoder-only: weight of a patch discriminator's hinge term (a sharper look); 0: none
    feature_matching: float = 0.0  # decoder-only, with adversarial: weight of matching its features on the real image
    perceptual: float = 0.0  # decoder-only: weight of (100 - SSIMULACRA2) / 100 (perceptual.loss) beside squared error
    log: list = field(default_factory=list)


def _dist() -> tuple[int, int]:
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def architecture(arch: str) -> ModelConfig | None:
    """A named architecture (seed, default) or a JSON file holding a ModelConfig."""
    if arch in ARCHITECTURES:
        return ARCHITECTURES[arch]
    if arch.endswith(".json") and Path(arch).is_file():
        import json

        try:
            return ModelConfig.from_dict(json.loads(Path(arch).read_text()))
        except (TypeError, ValueError, KeyError) as e:
            raise BsqError(f"bad architecture file {arch}: {e}") from None
    return None


def lr_at(step: int, opts: TrainOptions) -> float:
    if step < opts.warmup:
        return opts.lr * (step + 1) / opts.warmup
    t = (step - opts.warmup) / max(1, opts.steps - opts.warmup)
    return opts.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    mse = F.mse_loss(x.clamp(0, 1), y).item()
    return 10 * math.log10(1 / max(mse, 1e-10))


def save_checkpoint(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def build_model(stage: str, cfg: ModelConfig) -> torch.nn.Module:
    if stage == "tokenizer":
        return Tokenizer(cfg.tokenizer)
    from ..model.prior import Prior

    return Prior(cfg.prior)


class _Stop:
    def __init__(self) -> None:
        self.flag = False

    def __call__(self, *_):
        self.flag = True


def train(opts: TrainOptions, progress=None) -> dict:
    """Run (or resume) one training stage; returns the final checkpoint dict."""
    rank, world = _dist()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    out = Path(opts.out)
    ckpt_path = out / f"{opts.stage}.ckpt"
    cfg = architecture(opts.arch)
    state = None
    if opts.resume and ckpt_path.exists():
        state = load_checkpoint(ckpt_path)
        cfg = ModelConfig.from_dict(state["config"])
    if cfg is None:
        raise BsqError(f"unknown architecture {opts.arch!r}; choose from {', '.join(ARCHITECTURES)} or a .json config")
    torch.manual_seed(opts.seed)
    device = torch.device(f"cuda:{rank % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu")
    model = build_model(opts.stage, cfg).to(device)
    if opts.decoder_only:
        if opts.stage != "tokenizer":
            raise BsqError("--decoder-only is for the tokenizer stage")
        model.freeze_encoder()
    opt = torch.optim.AdamW(_param_groups(model, opts), lr=opts.lr, betas=(0.9, 0.99), weight_decay=0.0)
    if opts.perceptual and not opts.decoder_only:
        raise BsqError("--perceptual trains a decoder only (--decoder-only)")
    disc = disc_opt = None
    if opts.adversarial or opts.feature_matching:
        if not opts.decoder_only or world > 1:
            raise BsqError("--adversarial trains a decoder only (--decoder-only), in one process")
        from .discriminator import PatchDiscriminator

        disc = PatchDiscriminator(cfg.tokenizer.bits).to(device)
        disc_opt = torch.optim.AdamW(disc.parameters(), lr=opts.lr, betas=(0.5, 0.9), weight_decay=0.0)
    rng = np.random.default_rng([opts.seed, rank])
    step = 0
    ema = None
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        rng.bit_generator.state = state["rng"][rank] if rank < len(state["rng"]) else rng.bit_generator.state
        torch.set_rng_state(state["torch_rng"])
        step = state["step"]
        if disc is not None and "disc" in state:
            disc.load_state_dict(state["disc"])
            disc_opt.load_state_dict(state["disc_opt"])
    elif opts.init:
        _init_from(model, opts.stage, opts.init)
    if opts.ema:
        if not 0 < opts.ema < 1:
            raise BsqError("--ema takes a decay between 0 and 1, such as 0.999")
        ema = build_model(opts.stage, cfg).to(device)
        ema.load_state_dict(state["ema"] if state is not None and "ema" in state else model.state_dict())
        ema.eval()
    if opts.nested and (opts.stage != "tokenizer" or max(opts.nested) > cfg.tokenizer.bits or min(opts.nested) < 1):
        raise BsqError(f"--nested takes bit budgets from 1 to {cfg.tokenizer.bits} (tokenizer stage only)")
    train_arr, eval_arr = _dataset(opts, cfg, device)
    ddp = model
    if world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(model)
    stop = _Stop()
    old = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)} if _main_thread() else {}
    last_save = time.time()
    t_start = time.time()
    metric = float("nan")
    try:
        while step < opts.steps:
            for g in opt.param_groups:
                g["lr"] = lr_at(step, opts) * g.get("lr_mult", 1.0)
            idx = rng.integers(0, len(train_arr), opts.batch)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=opts.bf16):
                out: dict = {}
                loss, metric = _loss(opts.stage, ddp, train_arr, idx, rng, device, opts.nested, out)
                if disc is not None:
                    from .discriminator import generator_loss

                    loss = loss + generator_loss(disc, out["x"], out["y"], out["code"], opts.adversarial, opts.feature_matching)
            if opts.perceptual:
                from .. import perceptual

                loss = loss + opts.perceptual * perceptual.loss(out["x"].float(), out["y"].float())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if disc is not None:  # then the discriminator, on the same batch
                from .discriminator import discriminator_loss

                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=opts.bf16):
                    d_loss = discriminator_loss(disc, out["x"], out["y"], out["code"])
                disc_opt.zero_grad(set_to_none=True)
                d_loss.backward()
                disc_opt.step()
            step += 1
            if ema is not None:
                _ema_update(ema, model, min(opts.ema, (1 + step) / (10 + step)))
            if progress is not None and rank == 0:
                progress(step=step, loss=loss.item(), metric=metric, elapsed=time.time() - t_start)
            if rank == 0 and (step % opts.eval_every == 0 or step == opts.steps) and eval_arr is not None:
                ev = evaluate(opts.stage, ema if ema is not None else model, eval_arr, device)
                entry = {"step": step, "eval": ev}
                if opts.perceptual or disc is not None:
                    entry["eval_ssimulacra2"] = evaluate_ssimulacra2(ema if ema is not None else model, eval_arr, device)
                    if progress is not None:
                        progress(step=step, note=f"held-out SSIMULACRA2 {entry['eval_ssimulacra2']:.2f}")
                opts.log.append(entry)
                if progress is not None:
                    progress(step=step, eval=ev)
            save_now, stopping = time.time() - last_save > opts.checkpoint_seconds, stop.flag
            if world > 1:  # every rank must agree, since saving gathers from all of them
                flags = torch.tensor([int(save_now), int(stopping)], device=device)
                dist.broadcast(flags, 0)
                save_now, stopping = bool(flags[0]), bool(flags[1])
            if save_now and not stopping and step < opts.steps:
                _save(ckpt_path, model, opt, rng, step, cfg, opts, rank, world, ema, disc, disc_opt)
                last_save = time.time()
            if stopping:
                break
        _save(ckpt_path, model, opt, rng, step, cfg, opts, rank, world, ema, disc, disc_opt)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if world > 1:
        # A clean teardown: the DDP wrapper's reducer holds gloo work and the process group; left to the
        # interpreter's exit, its destruction aborted the process now and then ("terminate called
        # without an active exception"). Free it while everything is alive, then close the group.
        del ddp
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
    stopped = step < opts.steps
    final = ema if ema is not None else model
    return {"step": step, "config": cfg.to_dict(), "model": final.state_dict(), "interrupted": stopped}


@torch.no_grad()
def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1 - decay)  # exact where e == p (a frozen weight stays what it was)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _save(path, model, opt, rng, step, cfg, opts, rank, world, ema=None, disc=None, disc_opt=None) -> None:
    """Called by every rank; rank 0 writes the checkpoint with every rank's sampler state."""
    rngs = [rng.bit_generator.state]
    if world > 1:
        rngs = [None] * world
        dist.all_gather_object(rngs, rng.bit_generator.state)
    if rank != 0:
        return
    save_checkpoint(
        path,
        {
            "step": step,
            "config": cfg.to_dict(),
            "stage": opts.stage,
            "model": model.state_dict(),
            "opt": opt.state_dict(),
            "rng": rngs,
            "torch_rng": torch.get_rng_state(),
            "tokenizer_ckpt": opts.tokenizer_ckpt,
            **({"ema": ema.state_dict()} if ema is not None else {}),
            **({"disc": disc.state_dict(), "disc_opt": disc_opt.state_dict()} if disc is not None else {}),
        },
    )


def _dataset(opts: TrainOptions, cfg: ModelConfig, device):
    files = data_mod.find_images(opts.data)
    if not files:
        raise BsqError(f"no .png or .jpg images under {opts.data}")
    if opts.eval_dir:
        train_files, eval_files = files, data_mod.find_images(opts.eval_dir)
    else:
        train_files, eval_files = data_mod.split_holdout(files)
        if not train_files:
            train_files, eval_files = files, []
    crop = max(1, opts.crop // cfg.tokenizer.patch) * cfg.tokenizer.patch
    if opts.stage == "prior":
        p = cfg.tokenizer.patch
        crop = max(cfg.prior.tile_rows, cfg.prior.tile_cols) * p
    tr = data_mod.crop_cache(train_files, crop, opts.per_image, opts.seed, opts.cache_dir)
    ev = data_mod.crop_cache(eval_files, crop, 2, opts.seed + 1, opts.cache_dir) if eval_files else None
    if opts.stage == "prior":
        tok = _frozen_tokenizer(opts, cfg, device)
        # tokens of a nested tokenizer are computed (and cached) at its full width once, then cut
        # to this prior's bits: the first bits of a BSQ code are the signs of the first projections
        shift = tok.cfg.bits - cfg.tokenizer.bits
        tr = _tokenize_crops(tok, tr, cfg, device, opts.cache_dir, opts.tokenizer_ckpt, "train") >> shift
        ev = _tokenize_crops(tok, ev, cfg, device, opts.cache_dir, opts.tokenizer_ckpt, "eval") >> shift if ev is not None else None
    return tr, ev


def _param_groups(model: torch.nn.Module, opts: TrainOptions) -> list[dict]:
    """One group, or two when the BSQ projections learn at their own rate (new bits grow from zero)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # frozen ones are not optimised
    if opts.stage != "tokenizer" or opts.code_lr_mult == 1.0:
        return [{"params": [p for _, p in named], "lr_mult": 1.0}]
    code = [p for n, p in named if n.startswith(("to_code.", "from_code."))]
    rest = [p for n, p in named if not n.startswith(("to_code.", "from_code."))]
    return [{"params": rest, "lr_mult": 1.0}, {"params": code, "lr_mult": opts.code_lr_mult}]


def _init_from(model: torch.nn.Module, stage: str, path: str) -> None:
    """Copy weights from another run: every tensor whose name and shape match.

    A checkpoint's averaged (EMA) weights are taken where it kept them, as export does. A tokenizer
    with a different code length is resized first (nested BSQ: its first bits are kept); tensors
    that do not match (a prior's other group sizes, a decoder's new stage) keep their initialisation.
    """
    if path.endswith(".safetensors"):
        from ..model.weights import load

        if stage not in ("tokenizer", "prior"):
            raise BsqError(f"--init for the {stage} takes a {stage} checkpoint, not a model file")
        m = load(path)
        # a prior starts from the model's integer prior read back as float weights (intprior.float_state)
        src = (m.tokenizer if stage == "tokenizer" else m.float_prior()).state_dict()
    else:
        st = load_checkpoint(path)
        if st.get("stage") != stage:
            raise BsqError(f"--init {path} is a {st.get('stage')} checkpoint, not a {stage} one")
        src = trained_state(st)
    if stage == "tokenizer":
        from ..model.tokenizer import resize_bits

        src = resize_bits(src, model.cfg.bits)
    own = model.state_dict()
    for k, v in src.items():
        if k not in own:
            continue
        if own[k].shape == v.shape:
            own[k] = v.clone()
        elif own[k].dim() == v.dim() and own[k].shape[1:] == v.shape[1:]:  # e.g. more or fewer groups
            n = min(own[k].shape[0], v.shape[0])
            own[k][:n] = v[:n]
    model.load_state_dict(own)


def _frozen_tokenizer(opts: TrainOptions, cfg: ModelConfig, device) -> Tokenizer:
    if not opts.tokenizer_ckpt:
        raise BsqError("the prior stage needs --tokenizer CHECKPOINT (a tokenizer run's checkpoint or model file)")
    tok = load_tokenizer_any(opts.tokenizer_ckpt)
    # a wider (nested) tokenizer is kept whole: its tokens are cut to the prior's first bits later
    if not tok.cfg.encodes_like(cfg.tokenizer):
        raise BsqError("the tokenizer checkpoint does not match the architecture's tokenizer")
    return tok.to(device).eval()


@torch.no_grad()
def _tokenize_crops(tok, arr, cfg, device, cache_dir, key_src, name):
    import hashlib

    st = os.stat(key_src)  # the same checkpoint path may hold a later step
    key = hashlib.sha256(repr((key_src, st.st_size, st.st_mtime_ns, arr.shape, int(arr[:64].sum()), name)).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"tokens-{key}.npy" if cache_dir else None
    if path is not None and path.exists():
        return np.load(path)
    out = []
    for i in range(0, len(arr), 64):
        x = torch.from_numpy(np.array(arr[i : i + 64])).permute(0, 3, 1, 2).float().div(255).to(device)  # a writable copy of the (read-only) memory map
        code = tok.quant(tok.encode_latent(x))
        out.append(tok.quant.codes_to_tokens(code).cpu().numpy().astype(np.int64))
    toks = np.concatenate(out, 0)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, toks)
    return toks


def _prior_batch(arr, idx, rng, cfg_prior, device):
    """Random tile-shaped windows from token grids -> (B, rows, cols).

    A quarter of the batches use a smaller random tile shape, as at the right and bottom edges of
    an image, so that the prior also learns partial tiles.
    """
    toks = torch.from_numpy(np.ascontiguousarray(arr[np.sort(idx)]))
    r, c = cfg_prior.tile_rows, cfg_prior.tile_cols
    if rng.random() < 0.25:
        r, c = int(rng.integers(1, r + 1)), int(rng.integers(1, c + 1))
    H, W = toks.shape[1:]
    y = int(rng.integers(0, H - r + 1))
    x = int(rng.integers(0, W - c + 1))
    return toks[:, y : y + r, x : x + c].to(device)


def _loss(stage, model, arr, idx, rng, device, nested=(), out: dict | None = None):
    """The stage's loss on a batch and its metric; out (tokenizer stage) receives the batch, its pixels and code."""
    if stage == "tokenizer":
        x = data_mod.batch_from(arr, idx, rng).to(device)
        keep = None
        if nested:
            keep = torch.from_numpy(np.asarray(nested)[rng.integers(0, len(nested), len(idx))]).to(device)
        y, code = model(x, keep)
        if out is not None:
            out.update(x=x, y=y, code=code.detach())
        loss = F.mse_loss(y, x)
        return loss, 10 * math.log10(1 / max(loss.item(), 1e-10))
    m = model.module if hasattr(model, "module") else model
    toks = _prior_batch(arr, idx, rng, m.cfg, device)
    loss = m.loss(toks, model)
    return loss, loss.item() / math.log(2) * m.cfg.groups


@torch.no_grad()
def evaluate_ssimulacra2(model, arr, device) -> float:
    """A tokenizer's mean SSIMULACRA2 on held-out crops (each crop scored with its scales' own weights)."""
    from .. import perceptual

    model.eval()
    try:
        tot = 0.0
        for i in range(0, len(arr), 32):
            x = torch.from_numpy(np.ascontiguousarray(arr[i : i + 32])).permute(0, 3, 1, 2).float().div(255).to(device)
            y, _ = model(x)
            tot += perceptual.score(x, y.clamp(0, 1), full_layout=True).sum().item()
        return tot / len(arr)
    finally:
        model.train()


@torch.no_grad()
def evaluate(stage, model, arr, device) -> float:
    """Held-out PSNR (tokenizer) or bits per token (prior)."""
    model.eval()
    try:
        if stage == "tokenizer":
            tot = 0.0
            for i in range(0, len(arr), 32):
                x = torch.from_numpy(np.ascontiguousarray(arr[i : i + 32])).permute(0, 3, 1, 2).float().div(255).to(device)
                y, _ = model(x)
                tot += F.mse_loss(y.clamp(0, 1), x, reduction="sum").item()
            mse = tot / (arr.shape[0] * arr[0].size)
            return 10 * math.log10(1 / max(mse, 1e-10))
        cfgp = model.cfg
        tot, n = 0.0, 0
        for i in range(0, len(arr), 32):
            toks = torch.from_numpy(np.ascontiguousarray(arr[i : i + 32, : cfgp.tile_rows, : cfgp.tile_cols])).to(device)
            tot += model.loss(toks).item() * toks.numel()
            n += toks.numel()
        return tot / n / math.log(2) * cfgp.groups
    finally:
        model.train()
