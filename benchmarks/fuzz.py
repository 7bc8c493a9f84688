"""Fuzz campaign: structured mutations of .bsq files and model files, every checksum kept valid.

    python benchmarks/fuzz.py [--cases 100000] [--workers 2] [--seed 0]

Mutations (tests/mutate.py): header fields, preset name, model hash, tile count, stream lengths,
chunk table, the token checksum, streams (random bytes, bit flips, resized, swapped, from another
file), trailing bytes; 5% of the cases mutate the model file instead (config fields, tensor values,
shapes, dtypes, missing and extra tensors, metadata). Files are made with a small random model
(the conformance vectors' architecture) so that a case takes milliseconds.
Each case is classified: rejected with a BsqError, accepted unchanged (same tokens), accepted as a
valid header variant, accepted with altered streams (a failure), or a crash (any other exception; a
failure). A case slower than 5 s counts as a hang. Writes results/fuzz.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import resource
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

HANG_SECONDS = 5.0


def _setup():
    import torch

    from bsqcodec.codec import codec
    from bsqcodec.model import weights
    from conftest import TINY, smooth_image

    torch.set_num_threads(1)
    model = weights.random_model(TINY, seed=0)
    rng = np.random.default_rng(4)
    files = []
    for w, h, icc in ((1, 1, None), (16, 12, b"icc profile"), (45, 33, None), (9, 40, None)):
        enc = codec.encode_array(np.asarray(smooth_image(rng, w, h)), model, icc)
        files.append((enc.data, enc.tokens))
    return model, files


def _run(args: tuple[int, int, int]) -> dict:
    seed, start, count = args
    from safetensors.torch import save_file

    from bsqcodec.codec import codec
    from bsqcodec.model import weights
    from bsqcodec.errors import ModelError
    from mutate import classify, mutate, mutate_model

    model, files = _setup()
    rng = np.random.default_rng([seed, start])
    outcomes: Counter = Counter()
    by_kind: dict[str, Counter] = {}
    failures: list[dict] = []
    slowest = 0.0
    tmp = Path(tempfile.mkdtemp())
    for case in range(start, start + count):
        t0 = time.perf_counter()
        if rng.random() < 0.05:
            cfg, tensors, meta, kind = mutate_model(model.config.to_dict(), model.tensors, rng)
            kind = "model_" + kind
            path = tmp / "m.safetensors"
            try:
                save_file({k: v.contiguous() for k, v in tensors.items()}, str(path),
                          metadata={"format": weights.FORMAT, "config": json.dumps(cfg), **meta})
                m = weights.load(path)
                data = codec.encode_array(np.zeros((8, 8, 3), np.uint8), m).data
                codec.decode_detailed(data, [m])
                outcome, detail = "accepted_model", ""
            except ModelError as e:
                outcome, detail = "rejected", str(e)[:60]
            except Exception as e:  # noqa: BLE001
                outcome, detail = "crash", f"{type(e).__name__}: {e}"[:200]
        else:
            which = int(rng.integers(0, len(files)))
            data, tokens = files[which]
            mutated, kind = mutate(data, rng, foreign=files[(which + 1) % len(files)][0])
            outcome, detail = classify(data, tokens, mutated, lambda d: codec.decode_detailed(d, [model]))
        dt = time.perf_counter() - t0
        slowest = max(slowest, dt)
        if dt > HANG_SECONDS:
            outcome = "hang"
        outcomes[outcome] += 1
        by_kind.setdefault(kind, Counter())[outcome] += 1
        if outcome in ("crash", "hang", "accepted_altered_stream") and len(failures) < 20:
            failures.append({"case": case, "kind": kind, "outcome": outcome, "detail": detail, "seconds": dt})
    return {"outcomes": dict(outcomes), "by_kind": {k: dict(v) for k, v in by_kind.items()}, "failures": failures,
            "slowest_case_seconds": slowest, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=100_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(HERE / "results" / "fuzz.json"))
    args = ap.parse_args()
    t0 = time.time()
    per = -(-args.cases // args.workers)
    jobs = [(args.seed, w * per, min(per, args.cases - w * per)) for w in range(args.workers)]
    with mp.get_context("spawn").Pool(args.workers) as pool:
        parts = pool.map(_run, jobs)
    outcomes, by_kind = Counter(), {}
    for p in parts:
        outcomes.update(p["outcomes"])
        for k, v in p["by_kind"].items():
            by_kind.setdefault(k, Counter()).update(v)
    failed = outcomes["crash"] + outcomes["hang"] + outcomes["accepted_altered_stream"]
    res = {
        "cases": args.cases, "seed": args.seed, "workers": args.workers, "seconds": time.time() - t0,
        "outcomes": dict(outcomes), "failures": sum((p["failures"] for p in parts), [])[:20],
        "crashes": outcomes["crash"], "hangs": outcomes["hang"],
        "silently_accepted_altered_streams": outcomes["accepted_altered_stream"],
        "slowest_case_seconds": max(p["slowest_case_seconds"] for p in parts),
        "peak_rss_bytes_per_worker": max(p["peak_rss_bytes"] for p in parts),
        "by_kind": {k: dict(v) for k, v in sorted(by_kind.items())},
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "verdict": "pass" if failed == 0 else "FAIL",
    }
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k != "by_kind"}, indent=1))
    sys.exit(0 if failed == 0 else 1)


if __name__ == "__main__":
    main()
