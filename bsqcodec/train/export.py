"""Freezing a training run (tokenizer.ckpt + prior.ckpt) into a model file."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from . import data as data_mod
from ..model import weights
from ..config import ModelConfig
from ..errors import BsqError, ModelError, ModelNotFoundError
from ..codec.fileio import check_output
from ..model.prior import Prior
from ..model.tokenizer import Tokenizer


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


def second_calibration(coder, choices: tuple[int, ...], budget: bool, base: weights.Model, data_dir: str | Path,
                       count: int, seed: int = 1234, kind: str = "checker") -> torch.Tensor:
    """(N, C) integer bit-prior contexts (with the budget entry where `budget`) of `count` training crops
    (128 pixels) under a residual coder, with budgets drawn from the choices region by region: the ranges the
    integer bit prior is calibrated on."""
    from ..codec import twostage
    from ..model.intbits import context
    from ..model.tokenizer import tokens_to_bits

    files = data_mod.find_images(data_dir)
    if not files:
        raise BsqError(f"no images under {data_dir}")
    rng = np.random.default_rng(seed)
    files = [files[i] for i in rng.permutation(len(files))[: max(1, count // 2)]]
    crops = data_mod.crop_cache(files, 128, 2, seed, None)[:count]
    P, L1 = base.config.tokenizer.patch, base.config.tokenizer.bits
    r = P // coder.cfg.patch
    out = []
    for crop in crops:
        crop = np.ascontiguousarray(crop[: crop.shape[0] // P * P, : crop.shape[1] // P * P])
        tokens = base.tokenizer.image_to_tokens(crop)
        base_px = base.tokenizer.tokens_to_image(tokens).numpy()
        bits = twostage.second_bits(coder, crop, base_px)
        pick = rng.integers(0, len(choices), tuple(tokens.shape))
        kept = torch.from_numpy(np.asarray(choices)[pick].repeat(r, 0).repeat(r, 1))
        ctx = context(tokens_to_bits(tokens, L1), bits, kept, r, with_budget=budget, kind=kind)
        out.append(ctx.reshape(-1, ctx.shape[-1]))
    return torch.cat(out)


def export_second_run(run: str | Path, data_dir: str | Path, output: str | Path, name: str, choices: tuple[int, ...],
                      lam: int, base: str | Path | None = None, calib: int = 64, force: bool = False):
    """Freeze a second-stage run (residual.ckpt with its bit prior) into a second-stage model file."""
    from ..model import second
    from ..config import SecondConfig
    from .residual import load_run

    run, output = Path(run), Path(output)
    check_output(output, force)
    r = load_run(run / "residual.ckpt", base)
    if r.prior is None:
        raise BsqError(f"{run} has no bit prior: train the stage with --rate-weight")
    try:  # bad choices fail before any work
        SecondConfig(name=name, base=r.base.name, base_hash=r.base.sha256[:16].hex(), residual=r.coder.cfg,
                     prior_width=1, budget=r.prior.budget, choices=tuple(choices), lam=int(lam), context=r.prior.kind)
    except ValueError as e:
        raise BsqError(str(e)) from None
    calib_ctx = second_calibration(r.coder, tuple(choices), r.prior.budget, r.base, data_dir, calib, kind=r.prior.kind)
    smodel = second.export(r.checkpoint, r.base, name, tuple(choices), lam, calib_ctx)
    weights.save(smodel, output)
    return smodel


def export_look_run(run: str | Path, base: str | Path, output: str | Path, name: str, look: str = "sharp",
                    force: bool = False):
    """Freeze a decoder-only run (tokenizer.ckpt, trained with --decoder-only from `base`) into a look model file."""
    from ..model import look as look_mod
    from ..config import TokenizerConfig

    run, output = Path(run), Path(output)
    check_output(output, force)
    base_model = weights.load(base)
    ckpt = weights.load_checkpoint(run / "tokenizer.ckpt")
    cfg = ModelConfig.from_dict(ckpt["config"]).tokenizer
    tok_cfg = TokenizerConfig(**{**cfg.to_dict(), "bits": base_model.config.tokenizer.bits})
    if not tok_cfg.encodes_like(base_model.config.tokenizer):
        raise BsqError(f"the run's tokenizer does not give {base_model.name}'s tokens")
    state = weights.trained_state(ckpt)
    tok = Tokenizer(cfg)
    tok.load_state_dict(state)
    m = look_mod.build(base_model, look, name, tok.truncated(tok_cfg.bits).state_dict(), tok_cfg)
    weights.save(m, output)
    return m


def rebase_look(look_file: str | Path, base: str | Path, output: str | Path, name: str | None = None,
                force: bool = False, old_base: str | Path | None = None):
    """A first stage's look model file re-pointed at `base`: a model whose tokenizer is exactly that of the
    look's own base (its prior retrained, say), so that its files hold the same tokens. The look's decoder
    tensors are kept as they are; only the name and hash of the model it decodes for change. The look's old
    base (installed, or the file `old_base`) proves the two tokenizers equal."""
    from ..model import look as look_mod

    output = Path(output)
    check_output(output, force)
    old = weights.load(look_file)
    new = weights.load(base)
    if not isinstance(old, look_mod.LookModel):
        raise BsqError(f"{look_file} is not the look model file of a first stage")
    if not isinstance(new, weights.Model):
        raise BsqError(f"{base} is not a first-stage model file")
    try:
        was = weights.find(old.base_hash, old.config.base, [new] + ([weights.load(old_base)] if old_base else []))
    except ModelNotFoundError:
        raise BsqError(f"{old.config.base} ({old.config.base_hash[:16]}...), the model the look was made for, is not "
                       "installed: give its file with --from-base, to compare the tokenizers") from None
    tok = lambda m: {k: v for k, v in m.tensors.items() if k.startswith("tokenizer.")}  # noqa: E731
    if was.config.tokenizer != new.config.tokenizer or not weights.same_tensors(tok(was), tok(new)):
        raise BsqError(f"{new.name}'s tokenizer is not that of {was.name} ({old.config.base_hash}), whose files the look decodes")
    config = dataclasses.replace(old.config, name=name or old.config.name, base=new.name, base_hash=new.sha256[:16].hex())
    m = look_mod.from_tensors(config, old.tensors)
    weights.save(m, output)
    return m


def export_second_look_run(run: str | Path, bases: list[str | Path], output: str | Path, name: str, look: str = "sharp",
                           force: bool = False):
    """Freeze a second-stage decoder-only run (residual.ckpt, trained with --decoder-only --init from one of
    `bases`) into a look model file of the second-stage models `bases`, which share its coder."""
    from ..model import look as look_mod
    from ..config import ResidualConfig
    from ..model.residual import ResidualCoder
    from ..model.second import SecondModel

    run, output = Path(run), Path(output)
    check_output(output, force)
    models = [weights.load(b) for b in bases]
    for b, m in zip(bases, models):
        if not isinstance(m, SecondModel):
            raise BsqError(f"{b} is not a second-stage model file")
    ckpt = weights.load_checkpoint(run / "residual.ckpt")
    if not ckpt.get("decoder_only"):
        raise BsqError(f"{run} is not a --decoder-only run: its encoder, and so its files, changed")
    if ResidualConfig(**ckpt["config"]) != models[0].config.residual:
        raise BsqError(f"the run's coder is not shaped as that of {models[0].name}")
    state = weights.trained_state(ckpt)
    enc = tuple(f"residual.{e}" for e in ResidualCoder.ENCODER)  # the encoder the run started from, as it loads
    shipped = weights.float_state({k: v for k, v in models[0].tensors.items() if k.startswith(enc)}, "residual.")
    if any(not torch.equal(state[k], v) for k, v in shipped.items()):
        raise BsqError(f"the run's encoder is not that of {models[0].name} (train it with --init on its model file)")
    try:
        m = look_mod.build_second(models, look, name, state)
    except ModelError as e:
        raise BsqError(str(e)) from None
    weights.save(m, output)
    return m
