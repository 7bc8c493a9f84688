"""`bsqc train ...`: the training commands (cli.py adds train_app to the main app)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .common import err_console, guarded, new_app, out_console
from ..errors import BsqError

train_app = new_app("Train a tokenizer and a prior, then freeze them into a model file.")

Data = Annotated[Path, typer.Option("--data", help="Folder of training images (.png/.jpg, searched recursively).")]
Out = Annotated[Path, typer.Option("--out", help="Run folder: checkpoints are written here.")]


def _run(stage: str, **kw) -> dict:
    from ..train.train import TrainOptions, train

    opts = TrainOptions(stage=stage, **kw)
    metric_name = "PSNR" if stage == "tokenizer" else "bits/token"
    cols = [TextColumn(f"[bold]{stage}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(), TimeRemainingColumn()]
    last_eval = ["-"]
    t0 = time.time()
    last_log = [t0]
    first_step: list[int] = []  # steps done in this process (a resumed run starts above 0)
    plain = not err_console.is_terminal  # no live bar in a log file: print a line every 30 s instead
    with Progress(*cols, console=err_console, transient=False, disable=plain) as bar:
        task = bar.add_task(stage, total=opts.steps, info="")

        def progress(step, loss=None, metric=None, elapsed=None, eval=None, note=None):
            if note is not None:
                err_console.print(f"step {step}: {note}", markup=False)
                return
            if eval is not None:
                last_eval[0] = f"{eval:.3f}"
                err_console.print(f"step {step}: held-out {metric_name} {eval:.3f}", markup=False)
                return
            if not first_step:
                first_step.append(step - 1)
            rate = (step - first_step[0]) / max(1e-9, time.time() - t0)
            info = f"loss {loss:.4f}  {metric_name} {metric:.3f}  eval {last_eval[0]}  {rate:.2f} step/s"
            bar.update(task, completed=step, info=info)
            if plain and (time.time() - last_log[0] > 30 or step == opts.steps):
                last_log[0] = time.time()
                err_console.print(f"step {step}/{opts.steps}  {info}", markup=False)

        res = train(opts, progress)
    _report_end(stage, res, opts.out)
    return res


def _report_end(stage: str, res: dict, out) -> None:
    if res["interrupted"]:
        err_console.print(f"interrupted at step {res['step']}; checkpoint saved, continue with --resume", markup=False)
    else:
        out_console.print(f"{stage}: {res['step']} steps, checkpoint in {out}", markup=False)


@train_app.command("tokenizer")
@guarded
def train_tokenizer(
    data: Data, out: Out,
    arch: Annotated[str, typer.Option(help="Architecture: a preset name (seed, q1 ... q5) or a .json ModelConfig.")] = "default",
    eval_dir: Annotated[Optional[Path], typer.Option(help="Held-out images [default: 2% of --data].")] = None,
    steps: int = 20000, batch: int = 16, crop: int = 128, lr: float = 1e-3, seed: int = 0,
    resume: Annotated[bool, typer.Option(help="Continue from the run folder's checkpoint.")] = False,
    cache_dir: Annotated[Optional[Path], typer.Option(help="Where decoded crops are cached.")] = None,
    eval_every: int = 500, checkpoint_seconds: float = 300.0, threads: int = 0,
    init: Annotated[Optional[Path], typer.Option(help="Start from this tokenizer (checkpoint or model file); "
                                                      "a different code length keeps its first bits.")] = None,
    nested: Annotated[Optional[str], typer.Option(help="Nested BSQ: comma-separated bit budgets, e.g. 6,16,48,48; "
                                                       "each sample decodes from the first bits of one budget, "
                                                       "drawn uniformly from the list (repeat one to weigh it more).")] = None,
    code_lr_mult: Annotated[float, typer.Option(help="Learning-rate factor for the BSQ projections.")] = 1.0,
    bf16: Annotated[bool, typer.Option(help="bfloat16 autocast for the forward pass (about 1.8x faster on CPUs "
                                            "with bf16 dot products; weights stay float32).")] = False,
    ema: Annotated[float, typer.Option(help="Keep an exponential moving average of the weights with this decay "
                                            "(e.g. 0.999); it is evaluated and exported. 0: none.")] = 0.0,
    decoder_only: Annotated[bool, typer.Option("--decoder-only", help="Train the decoder only (the encoder, and so "
                                               "the tokens and any prior trained on them, stay as they are).")] = False,
    adversarial: Annotated[float, typer.Option(help="With --decoder-only: weight of a patch discriminator's hinge "
                                                    "term beside the squared error (a sharper look). 0: none.")] = 0.0,
    feature_matching: Annotated[float, typer.Option(help="With --adversarial: weight of matching the discriminator's "
                                                         "features on the real image.")] = 0.0,
    perceptual: Annotated[float, typer.Option(help="With --decoder-only: weight of (100 - SSIMULACRA2) / 100, "
                                                   "computed here and differentiable, beside the squared error.")] = 0.0,
) -> None:
    """Train the patch autoencoder (MSE; a decoder alone may add perceptual and adversarial terms)."""
    try:
        levels = tuple(sorted(int(b) for b in nested.split(","))) if nested else ()
    except ValueError:
        raise typer.BadParameter("--nested takes comma-separated integers") from None
    _run("tokenizer", data=str(data), out=str(out), arch=arch, eval_dir=str(eval_dir) if eval_dir else None,
         steps=steps, batch=batch, crop=crop, lr=lr, seed=seed, resume=resume,
         cache_dir=str(cache_dir) if cache_dir else None, eval_every=eval_every,
         checkpoint_seconds=checkpoint_seconds, threads=threads, init=str(init) if init else None, nested=levels,
         code_lr_mult=code_lr_mult, bf16=bf16, ema=ema, decoder_only=decoder_only, adversarial=adversarial,
         feature_matching=feature_matching, perceptual=perceptual)


@train_app.command("prior")
@guarded
def train_prior(
    data: Data, out: Out,
    tokenizer: Annotated[Path, typer.Option(help="Frozen tokenizer: a tokenizer checkpoint or a model file.")],
    arch: Annotated[str, typer.Option(help="Architecture: a preset name (seed, q1 ... q5) or a .json ModelConfig.")] = "default",
    eval_dir: Annotated[Optional[Path], typer.Option(help="Held-out images [default: 2% of --data].")] = None,
    steps: int = 20000, batch: int = 16, lr: float = 1e-3, seed: int = 0,
    resume: Annotated[bool, typer.Option(help="Continue from the run folder's checkpoint.")] = False,
    cache_dir: Annotated[Optional[Path], typer.Option(help="Where decoded crops and tokens are cached.")] = None,
    eval_every: int = 500, checkpoint_seconds: float = 300.0, threads: int = 0, per_image: int = 16,
    init: Annotated[Optional[Path], typer.Option(help="Start from this prior checkpoint or model file (its integer prior read back as float weights); "
                                                    "tensors that fit: fewer layers keep the first ones.")] = None,
    ema: Annotated[float, typer.Option(help="Keep an exponential moving average of the weights with this decay "
                                            "(e.g. 0.999); it is evaluated and exported. 0: none.")] = 0.0,
) -> None:
    """Train the transformer prior on tokens of a frozen tokenizer (a wider nested one keeps its first bits)."""
    _run("prior", data=str(data), out=str(out), arch=arch, eval_dir=str(eval_dir) if eval_dir else None,
         steps=steps, batch=batch, lr=lr, seed=seed, resume=resume, tokenizer_ckpt=str(tokenizer),
         cache_dir=str(cache_dir) if cache_dir else None, eval_every=eval_every,
         checkpoint_seconds=checkpoint_seconds, threads=threads, per_image=per_image, init=str(init) if init else None,
         ema=ema)


@train_app.command("export")
@guarded
def train_export(
    run: Annotated[Path, typer.Option(help="Run folder holding tokenizer.ckpt and prior.ckpt.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Model file to write (.safetensors).")],
    data: Data,
    name: Annotated[Optional[str], typer.Option(help="Preset name stored in the model [default: the architecture's].")] = None,
    calib: Annotated[int, typer.Option(help="Tiles of training tokens used to calibrate the integer prior.")] = 256,
    force: bool = False,
) -> None:
    """Freeze a run into a model file: float tokenizer plus the integer-exported prior."""
    from ..train.export import export_run

    m = export_run(run, data, output, name=name, calib=calib, force=force)
    out_console.print(f"wrote {output}: preset {m.name}, model {m.hash_hex[:16]}", markup=False)


@train_app.command("export-look")
@guarded
def train_export_look(
    base: Annotated[list[Path], typer.Option(help="The model file whose files it decodes (the run's --init). A second "
                                                  "stage's look: each second-stage model file that shares the run's "
                                                  "coder (repeat --base), e.g. q4s ... q9.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Look model file to write (.safetensors).")],
    run: Annotated[Optional[Path], typer.Option(help="Run folder of a --decoder-only run: tokenizer.ckpt (`train "
                                                     "tokenizer`) or residual.ckpt (`train residual`).")] = None,
    from_look: Annotated[Optional[Path], typer.Option(help="Instead of --run: a first stage's look model file, re-pointed "
                                                           "at --base, a model with exactly its base's tokenizer (a "
                                                           "retrained prior); the decoder is kept as it is.")] = None,
    from_base: Annotated[Optional[Path], typer.Option(help="With --from-look: the model file it was made for, where "
                                                           "that is not installed.")] = None,
    name: Annotated[Optional[str], typer.Option(help="The look model's name, e.g. default-sharp [default with "
                                                     "--from-look: its own].")] = None,
    look: Annotated[str, typer.Option(help="Which look it gives.")] = "sharp",
    force: bool = False,
) -> None:
    """Freeze a decoder-only run into a look model file: another decoder for a model's files."""
    from ..train.export import export_look_run, export_second_look_run, rebase_look

    if (run is None) == (from_look is None):
        raise BsqError("give either --run or --from-look")
    if from_look is not None:
        if len(base) != 1:
            raise BsqError("the look of a first stage decodes one model's files: give --base once")
        m = rebase_look(from_look, base[0], output, name, force, from_base)
    elif name is None:
        raise BsqError("--name is needed with --run")
    elif (run / "residual.ckpt").exists():
        m = export_second_look_run(run, base, output, name, look, force)
    elif len(base) != 1:
        raise BsqError("the look of a first stage decodes one model's files: give --base once")
    else:
        m = export_look_run(run, base[0], output, name, look, force)
    of = ", ".join(n for n, _ in m.config.bases)
    out_console.print(f"wrote {output}: the {m.config.look} look of {of}, model {m.hash_hex[:16]}", markup=False)


@train_app.command("export-second")
@guarded
def train_export_second(
    run: Annotated[Path, typer.Option(help="Run folder holding residual.ckpt (trained with --rate-weight).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Second-stage model file to write (.safetensors).")],
    data: Data,
    name: Annotated[str, typer.Option(help="Preset name stored in the model (the rung's name).")],
    choices: Annotated[str, typer.Option(help="Bits a region's tokens may keep, rising, e.g. 0,4,8,12,16,24.")] = "0,4,8,12,16,24",
    lam: Annotated[int, typer.Option("--lambda", help="The encoder's default trade-off: squared 8-bit pixel errors per bit.")] = 400,
    base: Annotated[Optional[Path], typer.Option(help="The first stage's model file [default: the run's].")] = None,
    calib: Annotated[int, typer.Option(help="Training crops (128 pixels) used to calibrate the integer bit prior.")] = 64,
    force: bool = False,
) -> None:
    """Freeze a second-stage run into a second-stage model file (residual coder plus integer bit prior)."""
    from ..train.export import export_second_run

    try:
        levels = tuple(int(b) for b in choices.split(","))
    except ValueError:
        raise typer.BadParameter("--choices takes comma-separated integers") from None
    m = export_second_run(run, data, output, name, levels, lam, base, calib, force)
    out_console.print(f"wrote {output}: preset {m.name} on {m.config.base}, model {m.hash_hex[:16]}", markup=False)


@train_app.command("residual")
@guarded
def train_residual_cmd(
    data: Data, out: Out,
    base: Annotated[Path, typer.Option(help="The first stage: a model file (.safetensors), frozen.")],
    patch: int = 4, channels: int = 128, bits: int = 24, enc_blocks: int = 2, dec_blocks: int = 4,
    steps: int = 20000, batch: int = 16, crop: int = 64, lr: float = 5e-4, seed: int = 0,
    resume: Annotated[bool, typer.Option(help="Continue from the run folder's checkpoint.")] = False,
    init: Annotated[Optional[Path], typer.Option(help="Start from this residual checkpoint or second-stage model "
                                                      "file, e.g. bsqcodec/models/q6.safetensors (tensors that fit).")] = None,
    nested: Annotated[Optional[str], typer.Option(help="Comma-separated bit budgets drawn per sample, e.g. 4,8,16,24.")] = None,
    ema: float = 0.999,
    rate_weight: Annotated[float, typer.Option(help="Train a bit prior with the stage and add this weight times its "
                                                    "bits per pixel to the squared error (0: no rate term).")] = 0.0,
    mixed: Annotated[float, typer.Option(help="Share of samples whose bit budget is drawn region by region (one "
                                              "first-stage patch each), so the stage learns budgets that vary.")] = 0.0,
    context: Annotated[str, typer.Option(help="The bit prior's context: checker (two passes, the co-located first-stage "
                                              "token) or quad3x3 (four passes, the 3x3 first-stage tokens).")] = "checker",
    decoder_only: Annotated[bool, typer.Option(help="Fine-tune the decoder alone from --init (a look: the encoder, "
                                                    "its codes and the files stay the same).")] = False,
    perceptual: Annotated[float, typer.Option(help="With --decoder-only: weight of (100 - SSIMULACRA2) / 100 of the "
                                                   "output beside the squared error (crops of 128 or more).")] = 0.0,
    cache_dir: Annotated[Optional[Path], typer.Option(help="Where decoded crops and base pixels are cached.")] = None,
    eval_every: int = 500, checkpoint_seconds: float = 300.0, threads: int = 0,
) -> None:
    """Train the second token stage (residual BSQ tokens on a finer grid) on a frozen first-stage model."""
    from ..model.residual import ResidualConfig
    from ..train.residual import ResidualOptions, train_residual

    try:
        levels = tuple(sorted(int(b) for b in nested.split(","))) if nested else ()
    except ValueError:
        raise typer.BadParameter("--nested takes comma-separated integers") from None
    opts = ResidualOptions(
        data=str(data), out=str(out), base=str(base),
        config=ResidualConfig(patch=patch, channels=channels, bits=bits, enc_blocks=enc_blocks, dec_blocks=dec_blocks),
        steps=steps, batch=batch, crop=crop, lr=lr, seed=seed, resume=resume, init=str(init) if init else None,
        nested=levels, ema=ema, rate_weight=rate_weight, mixed=mixed, context=context, decoder_only=decoder_only,
        perceptual=perceptual, cache_dir=str(cache_dir) if cache_dir else None, threads=threads,
        eval_every=eval_every, checkpoint_seconds=checkpoint_seconds)
    t0, last = time.time(), [0.0]

    def progress(step, loss=None, metric=None, eval=None, note=None):
        now = time.time()
        if note is not None and now - last[0] > 30:
            last[0] = now
            err_console.print(note, markup=False)
        elif eval is not None:
            eval = dict(eval)
            s2 = eval.pop("ssimulacra2", None)
            err_console.print(f"step {step}: held-out PSNR " + "  ".join(
                f"{k}b {v[0]:.3f} ({v[1]:.3f} bpp)" if isinstance(v, tuple) else f"{k}b {v:.3f}" for k, v in eval.items())
                + (f"  SSIMULACRA2 {s2:.2f}" if s2 is not None else ""), markup=False)
        elif loss is not None and (now - last[0] > 30 or step == opts.steps):
            last[0] = now
            err_console.print(f"step {step}/{opts.steps}  loss {loss:.5f}  PSNR {metric:.3f}  {now - t0:.0f} s", markup=False)

    _report_end("residual", train_residual(opts, progress), out)
