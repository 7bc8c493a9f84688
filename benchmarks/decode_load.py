"""Whole-process decode time, idle and beside busy processes; writes results/decode-load-PRESET.json.

    python benchmarks/decode_load.py ../shared/data/kodak/kodim01.png [--preset default] [--runs 5] [--busy 2]

What a user waits for: `bsqc decode FILE -o OUT.png` as a fresh process, net of importing torch, numpy,
Pillow, constriction, typer and rich (best of RUNS each). The import is timed as a process that imports
them and leaves with os._exit, as bsqc does: a process that exits the ordinary way also spends about
0.4 s unloading them, which bsqc skips and which is not importing. That older baseline (import, then an
ordinary exit) is kept in the results as net_idle_best_vs_ordinary_exit for comparison with earlier runs. Then the same decode RUNS times while BUSY other CPU-bound processes run (pure Python
loops, as another encoder, a build or `xargs -P` would be): the slowest of them against the idle best.
Targets (issue 13): net idle decode under 1.0 s on 2 cores; slowest under load at most 3x the idle time.
First, `bsqc encode IMAGE` at the default effort is timed the same way (ENCODE_RUNS times, best net of the
imports; issue 24: under 4 s for kodim01 at the default rung), which also makes the file that is decoded.
bsqcodec's bytecode is written first, as an installed copy has it (machine.compile_package).
Run it on an otherwise idle machine (pause training first).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bsqcodec.config import DEFAULT_EFFORT  # light: no torch in this process before the timing

HERE = Path(__file__).resolve().parent
IMPORTS = "import torch, numpy, PIL, constriction, typer, rich"
IMPORTS_ONLY = IMPORTS + "; import os; os._exit(0)"  # no teardown, as bsqc leaves


def _bsqc() -> list[str]:
    exe = shutil.which("bsqc")
    return [exe] if exe else [sys.executable, "-c", "from bsqcodec.cli.cli import main; main()"]


def _timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def _spin() -> None:
    while True:
        pass


def _machine(preset: str) -> tuple[dict, str]:
    """The machine and its paths for the preset's model, and that model's hash (which model was timed)."""
    import machine  # benchmarks/machine.py (imports torch: only here, never in a timed process)
    from bsqcodec.model import weights

    model = weights.preset(preset)
    return machine.describe(model), model.hash_hex


def _compile() -> dict:
    import machine

    return machine.compile_package()


def _suffix() -> str:
    import machine

    return machine.suffix()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("image")
    ap.add_argument("--preset", default="default")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--busy", type=int, default=2)
    ap.add_argument("--encode-runs", type=int, default=3, help="whole-process encodes to time first (0: none)")
    args = ap.parse_args()
    bytecode = _compile()
    with tempfile.TemporaryDirectory() as tmp:
        bsq, out = Path(tmp) / "a.bsq", Path(tmp) / "a.png"
        encode = _bsqc() + ["encode", args.image, "-o", str(bsq), "-p", args.preset, "--quiet", "--force"]
        encodes = [_timed(encode) for _ in range(max(1, args.encode_runs))][: args.encode_runs]
        decode = _bsqc() + ["decode", str(bsq), "-o", str(out), "--force", "--quiet"]
        imports = [_timed([sys.executable, "-c", IMPORTS_ONLY]) for _ in range(args.runs)]
        imports_exit = [_timed([sys.executable, "-c", IMPORTS]) for _ in range(args.runs)]
        idle = [_timed(decode) for _ in range(args.runs)]
        procs = [mp.Process(target=_spin, daemon=True) for _ in range(args.busy)]
        for p in procs:
            p.start()
        try:
            time.sleep(0.5)
            loaded = [_timed(decode) for _ in range(args.runs)]
        finally:
            for p in procs:
                p.terminate()
                p.join()
    described, model_hash = _machine(args.preset)  # after the timings: it imports torch
    res = {
        "image": os.path.basename(args.image), "preset": args.preset, "runs": args.runs, "busy_processes": args.busy,
        "cpus": os.cpu_count(), "machine": described, "bytecode": bytecode, "model": model_hash,
        "import_seconds": imports, "import_and_ordinary_exit_seconds": imports_exit,
        "decode_seconds_idle": idle, "decode_seconds_busy": loaded,
        "net_idle_best": min(idle) - min(imports), "whole_idle_best": min(idle),
        "net_idle_best_vs_ordinary_exit": min(idle) - min(imports_exit),
        "busy_slowest": max(loaded), "busy_slowest_over_idle_best": max(loaded) / min(idle),
        "encode_seconds_idle": encodes, "encode_effort": DEFAULT_EFFORT,
        "encode_net_idle_best": min(encodes) - min(imports) if encodes else None,
    }
    path = HERE / "results" / f"decode-load-{args.preset}{_suffix()}.json"
    path.write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps({k: v for k, v in res.items() if not isinstance(v, list)}, indent=1))


if __name__ == "__main__":
    main()
