"""Freezing a training run (tokenizer.ckpt + prior.ckpt) into a model file."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from . import data as data_mod
from . import weights
from .config import ModelConfig
from .errors import BsqError
from .fileio import check_output
from .prior import Prior
from .tokenizer import Tokenizer


def calibration_tokens(tok: Tokenizer, cfg: ModelConfig, data_dir: str | Path, count: int, seed: int = 1234) -> torch.Tensor:
    files = data_mod.find_images(data_dir)
    if not files:
        raise BsqError(f"no images under {data_dir}")
    rng = np.random.default_rng(seed)
    files = [files[i] for i in rng.permutation(len(files))[: max(1, count // 4)]]
    p = cfg.tokenizer.patch
    size = (cfg.prior.tile_rows * p, cfg.prior.tile_cols * p)
    crops = data_mod.crop_cache(files, max(size), 4, seed, None)[:count]
    x = torch.from_numpy(np.ascontiguousarray(crops[:, : size[0], : size[1]])).permute(0, 3, 1, 2).float().div(255)
    with torch.no_grad():
        code = tok.quant(tok.encode_latent(x))
        return tok.quant.codes_to_tokens(code)


def export_run(run: str | Path, data_dir: str | Path, output: str | Path, name: str | None = None,
               calib: int = 256, force: bool = False) -> weights.Model:
    run, output = Path(run), Path(output)
    check_output(output, force)
    ps = weights.load_checkpoint(run / "prior.ckpt")
    cfg = ModelConfig.from_dict(ps["config"])
    # the run's own tokenizer, else the one the prior was trained on (a nested one is cut to size)
    tpath = run / "tokenizer.ckpt" if (run / "tokenizer.ckpt").exists() else ps.get("tokenizer_ckpt")
    if not tpath or not Path(tpath).exists():
        raise BsqError(f"no tokenizer for {run}: neither {run / 'tokenizer.ckpt'} nor the prior's recorded tokenizer exists")
    tok = weights.load_tokenizer_any(tpath)
    if not tok.cfg.encodes_like(cfg.tokenizer):
        raise BsqError("tokenizer and prior checkpoints come from different architectures")
    tok = tok.truncated(cfg.tokenizer.bits)
    cfg = dataclasses.replace(cfg, tokenizer=tok.cfg)  # its own decoder (e.g. fine-tuned with --decoder-only)
    if name:
        cfg = dataclasses.replace(cfg, name=name)
    tok.eval()
    prior = Prior(cfg.prior)
    prior.load_state_dict(weights.trained_state(ps))
    prior.eval()
    calib_tokens = calibration_tokens(tok, cfg, data_dir, calib)
    model = weights.freeze(cfg, tok, prior, calib_tokens)
    weights.save(model, output)
    return model
