"""Bits of the integer-exported prior against the float prior it came from, on a folder of images.

    python benchmarks/export_cost.py PRESET RUN_DIR [DIR]

RUN_DIR holds the training run's prior.ckpt (the float prior); PRESET is the shipped model exported
from it. Writes benchmarks/results/export-cost-PRESET.json. The target is under 1% more bits.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from bsqcodec.codec import codec
from bsqcodec.model import weights
from bsqcodec.config import ModelConfig
from bsqcodec.model.prior import Prior

HERE = Path(__file__).resolve().parent


def main() -> None:
    preset, run = sys.argv[1], Path(sys.argv[2])
    folder = Path(sys.argv[3] if len(sys.argv) > 3 else "../shared/data/kodak")
    model = weights.preset(preset)
    state = weights.load_checkpoint(run / "prior.ckpt")
    prior = Prior(ModelConfig.from_dict(state["config"]).prior)
    prior.load_state_dict(weights.trained_state(state))  # the weights export took
    prior.eval()
    fbits = ibits = 0.0
    for p in sorted(folder.glob("*.png")):
        arr = np.asarray(Image.open(p).convert("RGB"))
        enc = codec.encode_array(arr, model)
        ibits += enc.estimated_bits
        for rs, cs in codec.tile_slices(enc.header):
            t = enc.tokens[rs, cs][None]
            fbits += prior.bits(t)
    res = {"preset": preset, "model": model.hash_hex, "dataset": folder.name, "float_bits": fbits,
           "integer_bits": ibits, "relative_cost": ibits / fbits - 1}
    out = HERE / "results" / f"export-cost-{preset}.json"
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
