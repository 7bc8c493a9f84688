"""Two decoders of the same files: a rung's own (faithful) and a trained alternative (sharp), side by side.

    python benchmarks/look.py TOKENIZER_CKPT [IMAGES...] [--preset default] [--effort 4] [--name NAME] [--crops DIR]
    python benchmarks/look.py LOOK.safetensors [IMAGES...] [--preset P ...] [--effort 4] [--name NAME]

Each image is encoded once with the preset (its file's bytes are what both looks cost); the file's tokens
are decoded by the preset's decoder and by the checkpoint's (EMA) decoder, and both are scored with PSNR and
SSIMULACRA2 (bsqcodec[perceptual]). --crops writes, per image, a 256x256 crop of the original, the faithful
and the sharp look side by side, to look at. Writes benchmarks/results/look-NAME.json.

Given a look model file instead (`bsqc train export-look`, of a first stage or of second-stage rungs), each
preset's files (default: every model the look names) are decoded whole both ways, and each preset gets
benchmarks/results/look-NAME-PRESET.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from bsqcodec.codec import codec
from bsqcodec.model import weights
from bsqcodec.metrics import psnr, ssimulacra2

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("images", nargs="*", default=[f"../shared/data/kodak/kodim{i:02d}.png" for i in (5, 14, 19, 23)])
    ap.add_argument("--preset", action="append", default=[])
    ap.add_argument("--effort", type=int, default=4)
    ap.add_argument("--name", default="default")
    ap.add_argument("--crops")
    args = ap.parse_args()
    if args.checkpoint.endswith(".safetensors"):
        return look_model(args)
    args.preset = (args.preset or ["default"])[0]
    model = weights.preset(args.preset)
    sharp = weights.load_tokenizer_any(args.checkpoint)
    if not sharp.cfg.encodes_like(model.config.tokenizer):
        raise SystemExit("the checkpoint's tokenizer does not read this preset's tokens")
    rows = []
    for path in args.images:
        a = np.asarray(Image.open(path).convert("RGB"))
        h, w = a.shape[:2]
        enc = codec.encode_array(a, model, effort=args.effort)
        faithful = codec.tokens_to_array(model, enc.tokens, w, h)
        s = sharp.tokens_to_image(enc.tokens)[:h, :w].numpy()
        row = {"image": Path(path).name, "bytes": len(enc.data), "bpp": len(enc.data) * 8 / (w * h), **_scores(a, faithful, s)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.crops:
            y0, x0 = (h - 256) // 2, (w - 256) // 2
            side = np.concatenate([im[y0 : y0 + 256, x0 : x0 + 256] for im in (a, faithful, s)], 1)
            Path(args.crops).mkdir(parents=True, exist_ok=True)
            Image.fromarray(side).save(Path(args.crops) / f"{Path(path).stem}-original-faithful-sharp.png")
    mean = {look: {k: float(np.mean([r[look][k] for r in rows])) for k in ("psnr", "ssimulacra2")} for look in ("faithful", "sharp")}
    res = {"preset": args.preset, "model": model.hash_hex, "checkpoint": Path(args.checkpoint).name,
           "checkpoint_step": weights.load_checkpoint(args.checkpoint)["step"], "effort": args.effort,
           "images": rows, "mean": mean}
    (HERE / "results" / f"look-{args.name}.json").write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(mean, indent=2))


def _scores(a: np.ndarray, faithful: np.ndarray, sharp: np.ndarray) -> dict:
    return {"faithful": {"psnr": psnr(a, faithful), "ssimulacra2": ssimulacra2(a, faithful)},
            "sharp": {"psnr": psnr(a, sharp), "ssimulacra2": ssimulacra2(a, sharp)}}


def look_model(args) -> None:
    """A look model file: each preset's files decoded whole, by the models' own decoders and by the look."""
    from bsqcodec.config import LookConfig

    lm = weights.load(args.checkpoint)
    c = lm.config
    presets = args.preset or [n for n, _ in c.bases]
    if not isinstance(c, LookConfig):
        return second_stage_looks(args, lm, presets)
    for preset in presets:
        model, rows = weights.preset(preset), []
        for path in args.images:
            a = np.asarray(Image.open(path).convert("RGB"))
            h, w = a.shape[:2]
            data = codec.encode_array(a, model, effort=args.effort).data
            faithful = codec.decode_detailed(data)[2]
            sharp = codec.decode_detailed(data, models=[lm], look=c.look)[2]
            row = {"image": Path(path).name, "bytes": len(data), "bpp": len(data) * 8 / (w * h), **_scores(a, faithful, sharp)}
            rows.append(row)
            print(preset, json.dumps(row), flush=True)
        mean = {look: {k: float(np.mean([r[look][k] for r in rows])) for k in ("psnr", "ssimulacra2")}
                for look in ("faithful", "sharp")}
        res = {"preset": preset, "model": model.hash_hex, "look_model": Path(args.checkpoint).name,
               "look_model_hash": lm.hash_hex, "effort": args.effort, "images": rows, "mean": mean}
        (HERE / "results" / f"look-{args.name}-{preset}.json").write_text(json.dumps(res, indent=2) + "\n")
        print(preset, json.dumps(mean), flush=True)


def second_stage_looks(args, lm, presets: list[str]) -> None:
    """A look of second-stage rungs that share one first stage: per image, the first stage is searched and
    coded once (codec.first_stage) and each rung's second stage on it (codec.add_second_stage), the files
    bsqc encode makes for each rung alone (the first image's checked byte for byte). The faithful pixels
    are the encoder's; the sharp ones decode the file's second stage again (codec.pixels, as bsqc decode)."""
    rungs = [weights.preset(p) for p in presets]
    base = codec.base_model(rungs[0])
    if any(codec.base_model(m) is not base for m in rungs):
        raise SystemExit("these rungs have different first stages")
    rows = {p: [] for p in presets}
    for n, path in enumerate(args.images):
        a = np.asarray(Image.open(path).convert("RGB"))
        h, w = a.shape[:2]
        first = codec.first_stage(base, a, args.effort)
        for m in rungs:
            enc = codec.add_second_stage(first, m, effort=args.effort)
            if n == 0:
                assert enc.data == codec.encode_array(a, m, effort=args.effort).data, m.name
            faithful = enc.pixels()
            sharp = codec.pixels(enc.header, enc.tokens, [lm], lm.config.look)
            row = {"image": Path(path).name, "bytes": len(enc.data), "bpp": len(enc.data) * 8 / (w * h),
                   **_scores(a, faithful, sharp)}
            rows[m.name].append(row)
            print(m.name, json.dumps(row), flush=True)
    for m in rungs:
        mean = {look: {k: float(np.mean([r[look][k] for r in rows[m.name]])) for k in ("psnr", "ssimulacra2")}
                for look in ("faithful", "sharp")}
        res = {"preset": m.name, "model": m.hash_hex, "look_model": Path(args.checkpoint).name,
               "look_model_hash": lm.hash_hex, "effort": args.effort, "images": rows[m.name], "mean": mean}
        (HERE / "results" / f"look-{args.name}-{m.name}.json").write_text(json.dumps(res, indent=2) + "\n")
        print(m.name, json.dumps(mean), flush=True)


if __name__ == "__main__":
    main()
