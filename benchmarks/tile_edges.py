"""What the first stage's tiles cost at their edges: an upper bound on a prior that sees across tiles.

    python benchmarks/tile_edges.py ../shared/data/train [--preset default] [--every 117] [--first 4] [--count 12]

Every tile is coded alone (formats/bsq.md section 4), so the tokens of a tile's first row and first column
lack the context of the tiles above and to the left. For every `--every`-th image under the folder (sorted
paths, from the `--first`-th, `--count` of them), the default effort's tokens are scored by the exact
tables the encoder codes them with, and the ideal bits of each token are summed by its place in its
tile: the corner, the rest of the first row, the rest of the first column, and the inside. The bits the
edges spend over the inside's mean are what any context across tiles could save at most, and likely more
than it would (an edge token of a textured region costs more with any context). Writes
benchmarks/results/tile-edges-PRESET.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from bsqcodec.codec import codec, images, search
from bsqcodec.format import entropy
from bsqcodec.model import weights
from bsqcodec.train.data import find_images

HERE = Path(__file__).resolve().parent
PLACES = ("corner", "first row", "first column", "inside")


def edge_bits(model: weights.Model, arr: np.ndarray) -> dict[str, list[float]]:
    """{place: [ideal bits, tokens]} of one image's default-effort tokens."""
    tokens = codec.search_tokens(model, arr, search.DEFAULT_EFFORT)
    header = codec.make_header(model, arr.shape[1], arr.shape[0])
    slices = codec.tile_slices(header)
    acc = {k: [0.0, 0] for k in PLACES}
    for batch, sym, tabs in codec.tile_tables(model, header, tokens):
        n = tabs.shape[-1]
        for k, i in enumerate(batch):
            rs, cs = slices[i]
            r, c = rs.stop - rs.start, cs.stop - cs.start
            s, t = sym[k].reshape(r, c, -1).numpy(), tabs[k].reshape(r, c, -1, n).numpy()
            for place, (rows, cols) in zip(PLACES, ((slice(0, 1), slice(0, 1)), (slice(0, 1), slice(1, None)),
                                                    (slice(1, None), slice(0, 1)), (slice(1, None), slice(1, None)))):
                part = s[rows, cols]
                acc[place][0] += entropy.bits(part.reshape(-1), t[rows, cols].reshape(-1, n))
                acc[place][1] += part.shape[0] * part.shape[1]
    return acc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder")
    ap.add_argument("--preset", default="default")
    ap.add_argument("--every", type=int, default=117)
    ap.add_argument("--first", type=int, default=4)
    ap.add_argument("--count", type=int, default=12)
    args = ap.parse_args()
    model = weights.preset(args.preset)
    files = find_images(args.folder)[args.first :: args.every][: args.count]
    total = {k: [0.0, 0] for k in PLACES}
    for f in files:
        arr, _, _ = images.read(f, None)
        for place, (b, n) in edge_bits(model, arr).items():
            total[place][0] += b
            total[place][1] += n
    all_bits = sum(b for b, _ in total.values())
    inside = total["inside"][0] / total["inside"][1]
    res = {
        "preset": args.preset, "model": model.hash_hex, "effort": search.DEFAULT_EFFORT,
        "images": [str(Path(f).relative_to(args.folder)) for f in files],
        "tokens": sum(n for _, n in total.values()), "mean_bits": all_bits / sum(n for _, n in total.values()),
        "places": {k: {"tokens": n, "bits_per_token": b / n, "excess_bits": b - inside * n,
                       "excess_share": (b - inside * n) / all_bits} for k, (b, n) in total.items()},
    }
    res["edge_excess_share"] = sum(v["excess_share"] for v in res["places"].values())
    path = HERE / "results" / f"tile-edges-{args.preset}.json"
    path.write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k != "images"}, indent=1))


if __name__ == "__main__":
    main()
