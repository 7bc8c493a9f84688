"""What every speed benchmark records about the machine it ran on, and which kind of machine it stands for.

kind: "avx512" where the CPU has AVX-512 and nothing caps it; "avx2" on a CPU without it, or on one
with it where benchmarks/avx2.env caps every library that picks its kernels by the CPU's features at AVX2
and forces the paths bsqcodec takes without VNNI and bfloat16 (then `emulated` says so, `switches` records
them and `complete` whether all were set). Before 0.6.3 the emulation left NumPy's OpenBLAS and NumPy's own
loops on their AVX-512 kernels (OPENBLAS_CORETYPE and NPY_DISABLE_CPU_FEATURES were not set), which made the
prior's float32 products of an emulated decode about 15% faster than an AVX2-only CPU's. Result files of
the avx2 kind carry the suffix -avx2.
"""

from __future__ import annotations

import compileall
import os
import platform
import shlex
from pathlib import Path

import torch

from bsqcodec import cpu
from bsqcodec.model import intprior, tokenizer


def _avx2_env() -> dict[str, str]:
    """The switches benchmarks/avx2.env exports and their values: the one list of them."""
    out = {}
    for line in (Path(__file__).resolve().parent / "avx2.env").read_text().splitlines():
        words = shlex.split(line, comments=True)
        if words[:1] == ["export"]:
            out.update(w.split("=", 1) for w in words[1:])
    return out


SWITCHES = _avx2_env()
assert {intprior.PRODUCTS_ENV, tokenizer.FLOAT32_ENV} <= SWITCHES.keys(), "avx2.env must force bsqcodec's float32 paths"


def kind() -> str:
    capped = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper().startswith("AVX2")
    return "avx512" if "avx512f" in cpu.flags() and not capped else "avx2"


def suffix() -> str:
    return "" if kind() == "avx512" else "-avx2"


def describe(model=None) -> dict:
    """The processor, its flags, the switches in force and the paths the codec takes on it."""
    if model is not None and hasattr(model.config, "base"):  # a second-stage rung: its first stage's prior
        from bsqcodec.codec import codec

        model = codec.base_model(model)
    lin = model.prior.layers[0]["qkv"] if model is not None else None
    emulated = kind() == "avx2" and "avx512f" in cpu.flags()
    return {
        "kind": kind(),
        "emulated": emulated,
        "cpu": cpu.describe(),
        "cpus": os.cpu_count(),
        "switches": {k: os.environ.get(k) for k in SWITCHES},
        "complete": all(os.environ.get(k) == v for k, v in SWITCHES.items()) if emulated else None,
        "paths": {
            "prior_products": lin.path if lin is not None else intprior.product_path(192, "cpu"),
            "pixel_decoder": "bfloat16" if tokenizer.native_bf16() else "float32",
            "blas_threads_default": cpu.blas_threads(),
            "numpy_blas_core": cpu.blas_core(),
            "numpy_simd": _numpy_simd(),
        },
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


def _numpy_simd() -> list[str]:
    """NumPy's dispatch targets that this process runs (the ones NPY_DISABLE_CPU_FEATURES leaves on)."""
    try:
        from numpy._core._multiarray_umath import __cpu_dispatch__, __cpu_features__
    except ImportError:
        return []
    return [t for t in __cpu_dispatch__ if __cpu_features__.get(t)]


def compile_package() -> dict:
    """Writes bsqcodec's bytecode (__pycache__) as `pip install` of a wheel does, so that timed processes load
    it instead of compiling every module from source. An editable install under PYTHONDONTWRITEBYTECODE=1
    never writes it, which cost every whole-process run about 0.05 s that no installed copy spends."""
    import bsqcodec

    ok = compileall.compile_dir(Path(bsqcodec.__file__).parent, quiet=1)
    return {"package_bytecode": "compiled before timing" if ok else "compile failed",
            "PYTHONDONTWRITEBYTECODE": os.environ.get("PYTHONDONTWRITEBYTECODE")}
