"""Frozen models: save, load and hash them; the registry of presets shipped in the package.

A model file is a safetensors file: `tokenizer.*` float16 tensors (computed in float32), `prior.*` integer tensors of the
exported integer prior, and the config as JSON metadata. Its identity is the SHA-256 of a canonical
serialization of config and tensors, so re-saving the same weights gives the same hash.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from .config import ModelConfig
from .errors import ModelError, ModelNotFoundError
from .intprior import IntPrior
from .tokenizer import Tokenizer

MODELS_DIR = Path(__file__).parent / "models"
FORMAT = "bsqcodec-model-1"


@dataclass
class Model:
    config: ModelConfig
    tokenizer: Tokenizer
    prior: IntPrior
    tensors: dict[str, torch.Tensor]
    sha256: bytes

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def hash_hex(self) -> str:
        return self.sha256.hex()


def canonical_hash(config: ModelConfig, tensors: dict[str, torch.Tensor]) -> bytes:
    h = hashlib.sha256()
    h.update(FORMAT.encode())
    h.update(json.dumps(config.to_dict(), sort_keys=True, separators=(",", ":")).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"\n{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.numpy().astype(t.numpy().dtype.newbyteorder("<")).tobytes())
    return h.digest()


def build(config: ModelConfig, tokenizer_state: dict, prior_tensors: dict, device="cpu") -> Model:
    # the tokenizer ships in float16 (half the bytes); it computes in float32 after loading
    tensors = {f"tokenizer.{k}": v.detach().half().cpu().contiguous() for k, v in tokenizer_state.items()}
    tensors.update({f"prior.{k}": v.detach().cpu().contiguous() for k, v in prior_tensors.items()})
    return from_tensors(config, tensors, device)


def from_tensors(config: ModelConfig, tensors: dict[str, torch.Tensor], device="cpu") -> Model:
    if config.tokenizer.bits != config.prior.bits:
        raise ModelError("tokenizer and prior disagree on bits per token")
    tok = Tokenizer(config.tokenizer)
    tstate = {k[len("tokenizer."):]: v.float() for k, v in tensors.items() if k.startswith("tokenizer.")}
    try:
        tok.load_state_dict(tstate, strict=True)
        prior = IntPrior(config.prior, {k[len("prior."):]: v for k, v in tensors.items() if k.startswith("prior.")}, device)
    except (RuntimeError, KeyError) as e:
        raise ModelError(f"model tensors do not match its config: {str(e).splitlines()[0]}") from None
    tok.eval()
    return Model(config, tok, prior, tensors, canonical_hash(config, tensors))


def save(model: Model, path: str | os.PathLike) -> None:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(model.tensors, str(tmp), metadata={"format": FORMAT, "config": json.dumps(model.config.to_dict())})
    os.replace(tmp, path)


def load(path: str | os.PathLike, device="cpu") -> Model:
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (OSError, SafetensorError, ValueError) as e:
        raise ModelError(f"cannot read model file {path}: {e}") from None
    if meta.get("format") != FORMAT:
        raise ModelError(f"{path} is not a bsqcodec model file")
    try:
        config = ModelConfig.from_dict(json.loads(meta["config"]))
    except (KeyError, TypeError, ValueError) as e:
        raise ModelError(f"{path} has a bad config: {e}") from None
    return from_tensors(config, tensors, device)


@lru_cache(maxsize=None)
def _installed_cached(key: tuple) -> dict[str, tuple[str, bytes]]:
    out = {}
    for p in sorted(MODELS_DIR.glob("*.safetensors")):
        m = _load_cached(str(p))  # kept: preset() and find() reuse it instead of loading again
        out[m.name] = (str(p), m.sha256)
    return out


def installed() -> dict[str, tuple[str, bytes]]:
    """Preset name -> (file, hash) of every model shipped in the package."""
    files = tuple((p.name, p.stat().st_mtime_ns) for p in sorted(MODELS_DIR.glob("*.safetensors")))
    return _installed_cached(files)


_loaded: dict[str, Model] = {}


def _load_cached(path: str) -> Model:
    if path not in _loaded:
        _loaded[path] = load(path)
    return _loaded[path]


def preset(name: str) -> Model:
    inst = installed()
    if name not in inst:
        known = ", ".join(sorted(inst)) or "none"
        raise ModelNotFoundError(f"unknown preset {name!r} (installed: {known})")
    return _load_cached(inst[name][0])


def find(model_hash: bytes, name: str, extra: list[Model] | None = None) -> Model:
    """The model with this hash among `extra` and the installed presets."""
    for m in extra or []:
        if m.sha256 == model_hash:
            return m
    for pname, (path, h) in installed().items():
        if h == model_hash:
            return _load_cached(path)
    raise ModelNotFoundError(
        f"model {name!r} ({model_hash.hex()[:16]}...) is not installed; pass the model file with --model"
    )


def load_checkpoint(path: str | os.PathLike) -> dict:
    """A training checkpoint: {step, config, model, ...}."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError) as e:
        raise ModelError(f"cannot read checkpoint {path}: {e}") from None


def load_tokenizer_any(path: str | os.PathLike) -> Tokenizer:
    """A tokenizer from a training checkpoint (.ckpt) or a model file (.safetensors)."""
    path = str(path)
    if path.endswith(".safetensors"):
        return load(path).tokenizer
    state = load_checkpoint(path)
    cfg = ModelConfig.from_dict(state["config"])
    tok = Tokenizer(cfg.tokenizer)
    tok.load_state_dict(state["model"])
    return tok.eval()


def freeze(config: ModelConfig, tokenizer: Tokenizer, prior, calib_tokens: torch.Tensor) -> Model:
    """A float tokenizer and float prior -> a frozen Model with the integer prior exported."""
    from .intprior import export

    return build(config, tokenizer.state_dict(), export(prior, calib_tokens))


def random_model(config: ModelConfig, seed: int = 0) -> Model:
    """A randomly initialised model (tests and examples); deterministic given the seed."""
    from .prior import Prior

    g = torch.manual_seed(seed)
    tok = Tokenizer(config.tokenizer)
    prior = Prior(config.prior)
    with torch.no_grad():
        for p in prior.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    p = config.prior
    calib = torch.randint(0, 2**p.bits, (8, p.tile_rows, p.tile_cols), generator=g)
    return freeze(config, tok, prior, calib)
