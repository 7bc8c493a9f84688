"""ColorVideoVDP (cvvdp) as a second opinion on a `bsqc bench` run: the same files, scored in JOD.

    python benchmarks/cvvdp.py dump BENCH.json FOLDER DIR [--look sharp] [--model LOOK.safetensors]
    python benchmarks/cvvdp.py score DIR OUT.json [--display standard_fhd]

`dump` (in bsqcodec's environment) remakes every file the bench compared: bsqc's, encoded again with the
bench's effort and tune (the encoder is deterministic, and the bytes are checked against the bench's) and decoded
with the bench's look (and, for another look than faithful, the faithful one too), and each baseline codec's at the quality the bench matched. It writes them as PNGs
with the originals and a manifest. `score` (in an environment with `pip install cvvdp`, which brings its own
torch and needs no download: its base metric ships its calibration) scores each against its original.
JOD: 10 is indistinguishable from the original, each unit less is a just-objectionable difference.
Two steps, because cvvdp's requirements replace the torch that bsqcodec is tested with.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def dump(args) -> None:
    from PIL import Image

    from bsqcodec.bench import baselines
    from bsqcodec.codec import codec, images
    from bsqcodec.model import weights
    from bsqcodec.model.look import LookModel

    res = json.loads(Path(args.bench).read_text())
    out = Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    codecs = {c.name: c for c in baselines.LOSSY}
    given = [weights.load(m) for m in args.model]  # look models, and rungs that are not installed
    rungs = {m.name: m for m in given if not isinstance(m, LookModel)}
    manifest = []
    for row in res["per_image"]:
        src = next(Path(args.folder).rglob(row["image"]))
        a, _, _ = images.read(src)
        stem = Path(row["image"]).stem
        Image.fromarray(a).save(out / f"{stem}.ref.png")
        for rung, got in row["bsqc"].items():
            model = rungs.get(rung) or weights.preset(rung)
            data = codec.encode_array(a, model, effort=res["effort"], models=given, tune=res.get("tune", "faithful")).data
            if len(data) != got["bytes"]:
                sys.exit(f"{stem} {rung}: {len(data)} bytes, the bench had {got['bytes']}")
            for look in dict.fromkeys([args.look, "faithful"]):  # a look, and the same file's faithful pixels
                _, _, img = codec.decode_detailed(data, models=given, look=look)
                name = f"{stem}.bsqc-{rung}-{look}.png"
                Image.fromarray(img).save(out / name)
                manifest.append({"image": row["image"], "rung": rung, "codec": "bsqc", "look": look,
                                 "bytes": got["bytes"], "file": name})
            for cname, m in row.get("matched", {}).get(rung, {}).items():
                if m is None or cname not in codecs:
                    continue
                data = baselines.encode(a, codecs[cname], m["quality"])
                name = f"{stem}.{cname}-q{m['quality']}.png"
                Image.fromarray(baselines.decode(data)).save(out / name)
                manifest.append({"image": row["image"], "rung": rung, "codec": cname, "quality": m["quality"],
                                 "bytes": len(data), "file": name})
        print(row["image"], flush=True)
    (out / "manifest.json").write_text(json.dumps({"bench": Path(args.bench).name, "metric": res.get("metric"),
                                                   "look": args.look, "tune": res.get("tune", "faithful"),
                                                   "files": manifest}, indent=1) + "\n")


def score(args) -> None:
    import numpy as np
    import pycvvdp
    from PIL import Image

    d = Path(args.dir)
    man = json.loads((d / "manifest.json").read_text())
    metric = pycvvdp.cvvdp(display_name=args.display)
    refs: dict[str, np.ndarray] = {}
    for f in man["files"]:
        stem = Path(f["image"]).stem
        if stem not in refs:
            refs = {stem: np.asarray(Image.open(d / f"{stem}.ref.png").convert("RGB"))}
        test = np.asarray(Image.open(d / f["file"]).convert("RGB"))
        jod, _ = metric.predict(test, refs[stem], dim_order="HWC")
        f["cvvdp_jod"] = float(jod)
        print(f["file"], f"{f['cvvdp_jod']:.3f}", flush=True)
    means: dict[str, dict] = {}
    for f in man["files"]:
        key = f"{f['rung']}/{f['codec']}" + (f"-{f['look']}" if "look" in f else "")
        m = means.setdefault(key, {"bytes": 0, "jod": [], "images": 0})
        m["bytes"] += f["bytes"]
        m["jod"].append(f["cvvdp_jod"])
        m["images"] += 1
    man["mean"] = {k: {"bytes": v["bytes"], "images": v["images"], "mean_jod": float(np.mean(v["jod"]))}
                   for k, v in means.items()}
    man["display"] = args.display
    from importlib.metadata import version

    man["cvvdp_version"] = version("cvvdp")  # pycvvdp has no __version__
    Path(args.out).write_text(json.dumps(man, indent=1) + "\n")
    print(json.dumps(man["mean"], indent=1))


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("dump")
    a.add_argument("bench")
    a.add_argument("folder")
    a.add_argument("dir")
    a.add_argument("--look", default="faithful")
    a.add_argument("--model", action="append", default=[])
    b = sub.add_parser("score")
    b.add_argument("dir")
    b.add_argument("out")
    b.add_argument("--display", default="standard_fhd")
    args = ap.parse_args()
    {"dump": dump, "score": score}[args.cmd](args)


if __name__ == "__main__":
    main()
