"""Join two `bsqc bench` results of the same images into one ladder: the rungs of both, with bsqc's curve and
its BD-rates computed again over all of them (the baselines' curves are the newer file's, or with
--keep-baselines the older file's).

    python benchmarks/merge_bench.py results/bench-kodak.json NEW.json -o results/bench-kodak.json [--keep-baselines]

For a ladder whose lower rungs were benched before its upper rungs shipped: the same images and effort are
required (checked), and each rung keeps the numbers of the run that measured it.
The result notes which presets came from which file.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bsqcodec.bench.bench import LADDER_NAMES
from bsqcodec.config import RUNG_NAMES
from bsqcodec.metrics import bd_rate, overlap


def merge(old: dict, new: dict, old_name: str, new_name: str, keep_baselines: bool = False) -> dict:
    """keep_baselines: the baselines' curves (and so the BD-rates) are the older file's, for a newer run of some
    rungs without a sweep (--no-sweep: no curves of its own)."""
    for key in ("dataset", "images", "effort", "schema"):
        if old.get(key) != new.get(key):
            raise SystemExit(f"the two results differ in {key!r}: {old.get(key)!r} and {new.get(key)!r}")
    if [r["image"] for r in old["per_image"]] != [r["image"] for r in new["per_image"]]:
        raise SystemExit("the two results are of different images")
    metric = new.get("metric", "psnr")
    out = dict(new)
    presets = [p for p in old["presets"] if p not in new["presets"]] + new["presets"]
    # the ladder's rungs in its order, then the other presets (ones it no longer holds, say) as they came
    presets.sort(key=lambda p: RUNG_NAMES.index(p) if p in RUNG_NAMES else len(RUNG_NAMES))
    out["presets"] = presets
    out["models"] = {**old["models"], **new["models"]}
    out["totals"] = {**{p: old["totals"][p] for p in old["presets"] if p not in new["presets"]}, **new["totals"]}
    out["per_image"] = []
    for a, b in zip(old["per_image"], new["per_image"]):
        row = dict(b)
        row["bsqc"] = {**{p: v for p, v in a["bsqc"].items() if p not in b["bsqc"]}, **b["bsqc"]}
        row["matched"] = {**{p: v for p, v in a["matched"].items() if p not in b["matched"]}, **b["matched"]}
        out["per_image"].append(row)
    rungs = [p for p in presets if p in LADDER_NAMES]
    base = old if keep_baselines else new
    out["baselines"] = base["baselines"]
    out["curves"] = dict(base["curves"])
    out["curves"]["bsqc"] = sorted(({"preset": p, "bpp": out["totals"][p]["bpp"], metric: out["totals"][p][f"mean_{metric}"]}
                                    for p in rungs), key=lambda d: d["bpp"])
    # a run of some rungs joins the older file: its notes (which rung came from where) stay
    notes = [n for n in (old["notes"] if keep_baselines else []) + new["notes"]
             if not n.startswith(("BD-rate against", "the baselines' curves are"))]
    bd, rng = {}, {}
    ours = out["curves"]["bsqc"]
    for c in base["baselines"]:  # the baselines of the file whose curves are kept (a codec it could not run has none)
        theirs = out["curves"].get(c, [])
        if not theirs:
            continue
        pa, pb = [d[metric] for d in theirs], [d[metric] for d in ours]
        rng[c] = list(overlap(pa, pb))
        try:
            bd[c] = bd_rate([d["bpp"] for d in theirs], pa, [d["bpp"] for d in ours], pb)
        except ValueError as e:
            bd[c] = None
            notes.append(f"BD-rate against {c}: {e}")
    out[f"bd_rate_{metric}"] = bd
    out["bd_rate_psnr_range_db" if metric == "psnr" else f"bd_rate_{metric}_range"] = rng
    kept = [p for p in old["presets"] if p not in new["presets"]]
    notes.append(f"merged (benchmarks/merge_bench.py): {', '.join(kept)} from {old_name}; {', '.join(new['presets'])} from {new_name}")
    if keep_baselines:
        notes.append(f"the baselines' curves are {old_name}'s")
    missing = [c for c in old["baselines"] if c not in base["baselines"]]
    if missing:
        notes.append(f"{', '.join(missing)}: in {old_name} only, so matched for its rungs only and without a curve here")
    out["notes"] = notes
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--old-name", default=None, help="how the note names the older run (default: its file name)")
    ap.add_argument("--new-name", default=None)
    ap.add_argument("--keep-baselines", action="store_true",
                    help="the baselines' curves from OLD (NEW was run with --no-sweep)")
    args = ap.parse_args()
    old, new = (json.loads(Path(p).read_text()) for p in (args.old, args.new))
    res = merge(old, new, args.old_name or Path(args.old).name, args.new_name or Path(args.new).name,
                args.keep_baselines)
    Path(args.output).write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {args.output}: {', '.join(res['presets'])}; BD-rate {res['bd_rate_' + res.get('metric', 'psnr')]}")


if __name__ == "__main__":
    main()
