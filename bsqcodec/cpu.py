"""What this processor offers the codec's fast paths: its feature flags, read once (Linux), and a summary.

The prior's int8 products are fast only where the CPU has VNNI or AMX dot products, and bfloat16
convolutions only where it has bfloat16 dot products; elsewhere both fall back to slow emulation, so
the codec picks its paths from these flags (benchmarks record them beside every speed result).
"""

from __future__ import annotations

import contextlib
import functools
import platform

INT8_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")  # int8 dot products that oneDNN's int8 products use
BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # bfloat16 dot products
REPORTED = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16")


@functools.cache
def _cpuinfo() -> tuple[str, frozenset[str]]:
    """(model name, flags) from /proc/cpuinfo; ("", {}) where there is none (not Linux)."""
    name, flags = "", frozenset()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and not name:
                    name = value.strip()
                elif key in ("flags", "Features") and not flags:  # x86, ARM
                    flags = frozenset(value.split())
    except OSError:
        pass
    return name or platform.processor() or platform.machine(), flags


def flags() -> frozenset[str]:
    return _cpuinfo()[1]


def has_any(names: tuple[str, ...]) -> bool:
    return any(n in flags() for n in names)


def describe() -> dict:
    """The processor as benchmark results record it: model name and the flags that choose paths."""
    name, fl = _cpuinfo()
    return {"model": name, "machine": platform.machine(), "flags": {f: f in fl for f in REPORTED}}


@functools.cache
def _openblas_fn(name: str):
    """The function `name` (e.g. get_num_threads) of the OpenBLAS that NumPy loaded, or None (another BLAS,
    not Linux).

    NumPy's wheels bundle OpenBLAS under a prefixed name (scipy_openblas64_) in the folder numpy.libs
    beside the package; opening that file again gives the library NumPy already loaded.
    """
    import ctypes
    from pathlib import Path

    import numpy

    for path in sorted((Path(numpy.__file__).parent.parent / "numpy.libs").glob("*openblas*.so*")):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for pre, suf in (("scipy_", "64_"), ("scipy_", ""), ("", "64_"), ("", "")):
            fn = getattr(lib, f"{pre}openblas_{name}{suf}", None)
            if fn is not None:
                return fn
    return None


@functools.cache
def _openblas():
    """(get, set) of the thread count of NumPy's OpenBLAS, or None."""
    import ctypes

    get, set_ = _openblas_fn("get_num_threads"), _openblas_fn("set_num_threads")
    if get is None or set_ is None:
        return None
    get.restype, set_.argtypes = ctypes.c_int, [ctypes.c_int]
    return get, set_


def blas_core() -> str | None:
    """The kernels NumPy's OpenBLAS chose when it loaded (Haswell: AVX2; SkylakeX, Cooperlake: AVX-512), or
    None (another BLAS); OPENBLAS_CORETYPE overrides its choice."""
    import ctypes

    fn = _openblas_fn("get_corename")
    if fn is None:
        return None
    fn.restype = ctypes.c_char_p
    return fn().decode()


def blas_threads() -> int | None:
    """NumPy's BLAS thread count where it can be read (OpenBLAS), else None."""
    lib = _openblas()
    return lib[0]() if lib else None


class single_threaded_kernels:
    """Context manager: torch's intra-op threads and NumPy's BLAS threads set to 1, restored on exit.

    Small products split between threads wait for every thread to be scheduled, and forked worker
    processes would each start a BLAS thread per core: on 2 cores NumPy's float32 products of the
    prior's step took 2.4x as long decoding kodim01 with its default threads as with one.
    """

    def __enter__(self):
        import torch

        self.n = torch.get_num_threads()
        torch.set_num_threads(1)
        lib = _openblas()
        self.blas = lib[0]() if lib else None
        if lib:
            lib[1](1)

    def __exit__(self, *exc):
        import torch

        torch.set_num_threads(self.n)
        if self.blas is not None:
            _openblas()[1](self.blas)


@contextlib.contextmanager
def threads_of_kernels(workers: int):
    """Yields run(fn, items) -> [fn(item) ...], mapping over items in `workers` Python threads (here when 1),
    each on single-threaded kernels (torch releases the interpreter lock in them).

    For work cut into pieces whose shapes depend on the input alone: each piece's float sums are then
    the same for any thread count (a multi-threaded kernel may split and round them differently).
    """
    with single_threaded_kernels():
        if workers <= 1:
            yield lambda fn, items: [fn(i) for i in items]
            return
        from concurrent.futures import ThreadPoolExecutor

        import torch

        # torch's count is each thread's own, and a new thread takes the process's latest setting, which a
        # region of another thread (twostage.decode's) may change meanwhile: each worker sets its own
        with ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            yield lambda fn, items: list(pool.map(fn, items))
