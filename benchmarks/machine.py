"""What every speed benchmark records about the machine it ran on, and which kind of machine it stands for.

kind: "avx512" where the CPU has AVX-512 and nothing caps it; "avx2" on a CPU without it, or on one
with it where `ONEDNN_MAX_CPU_ISA=AVX2` caps torch's oneDNN and `BSQ_PRODUCTS=float32` and
`BSQ_FLOAT32_DECODER=1` force the paths an AVX2-only CPU takes (then `emulated` says so; since 0.6.2 the
emulation also sets `ATEN_CPU_CAPABILITY=avx2` and `MKL_ENABLE_INSTRUCTIONS=AVX2`, so that torch's own
kernels and MKL's products run their AVX2 code too, as `switches` records). Result files of the avx2 kind
carry the suffix -avx2.
"""

from __future__ import annotations

import os
import platform

import torch

from bsqcodec import cpu, intprior, tokenizer


def kind() -> str:
    capped = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper().startswith("AVX2")
    return "avx512" if "avx512f" in cpu.flags() and not capped else "avx2"


def suffix() -> str:
    return "" if kind() == "avx512" else "-avx2"


def describe(model=None) -> dict:
    """The processor, its flags, the switches in force and the paths the codec takes on it."""
    if model is not None and hasattr(model.config, "base"):  # a second-stage rung: its first stage's prior
        from bsqcodec import codec

        model = codec.base_model(model)
    lin = model.prior.layers[0]["qkv"] if model is not None else None
    return {
        "kind": kind(),
        "emulated": kind() == "avx2" and "avx512f" in cpu.flags(),
        "cpu": cpu.describe(),
        "cpus": os.cpu_count(),
        "switches": {k: os.environ.get(k) for k in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS",
                                                    intprior.PRODUCTS_ENV, tokenizer.FLOAT32_ENV)},
        "paths": {
            "prior_products": lin.path if lin is not None else intprior.product_path(192, "cpu"),
            "pixel_decoder": "bfloat16" if tokenizer.native_bf16() else "float32",
            "blas_threads_default": cpu.blas_threads(),
        },
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
