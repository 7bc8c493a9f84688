"""Frozen models: save, load and hash them; the registry of presets shipped in the package.

A model file is a safetensors file: `tokenizer.*` tensors (computed in float32), `prior.*` integer tensors of the
exported integer prior, and the config as JSON metadata. Tokenizer weights of two or more dims are
stored as int8 with a float32 scale per output channel (`NAME` and `NAME.scale`); the rest, and every
tensor of files written before that, as float16. Its identity is the SHA-256 of a canonical
serialization of config and tensors, so re-saving the same weights gives the same hash.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch

from ..format import modelfile
from ..config import LookConfig, ModelConfig, SecondConfig, SecondLookConfig
from ..errors import ModelError, ModelNotFoundError
from .intprior import VERSION as INTPRIOR_VERSION
from .intprior import IntPrior
from .tokenizer import Tokenizer

MODELS_DIR = modelfile.MODELS_DIR
FORMAT = modelfile.FORMAT


@dataclass
class Model(modelfile.Identity):
    config: ModelConfig
    tokenizer: Tokenizer
    prior: IntPrior
    tensors: dict[str, torch.Tensor]
    sha256: bytes
    _float_prior: object = field(default=None, init=False, repr=False, compare=False)

    def prior_tensors(self) -> dict[str, torch.Tensor]:
        """The integer prior's tensors, without their `prior.` prefix."""
        return {k[len("prior."):]: v for k, v in self.tensors.items() if k.startswith("prior.")}

    def float_prior(self):
        """The integer prior read back as a float Prior (intprior.float_state), made once: what the search's
        rate estimates come from (its tables are within a few thousandths of a bit of the exact ones, a few
        times faster) and what `train prior --init MODEL` starts from. Never codes a file."""
        if self._float_prior is None:
            from .intprior import float_state
            from .prior import Prior

            net = Prior(self.config.prior)
            net.load_state_dict(float_state(self.config.prior, self.prior_tensors()))
            self._float_prior = net.eval().requires_grad_(False)
        return self._float_prior


def canonical_hash(config: ModelConfig, tensors: dict[str, torch.Tensor]) -> bytes:
    def entry(name: str, t: torch.Tensor):
        t = t.detach().cpu().contiguous()
        return name, str(t.dtype), tuple(t.shape), t.numpy().astype(t.numpy().dtype.newbyteorder("<")).tobytes()

    return modelfile.digest(config, [entry(n, t) for n, t in tensors.items()])


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one float32 scale per slice along dim 0."""
    w = w.detach().float().cpu()
    scale = w.reshape(w.shape[0], -1).abs().amax(1).clamp_min(1e-12) / 127
    q = torch.round(w / scale.view(-1, *[1] * (w.dim() - 1))).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def float_tensors(state: dict, pre: str = "tokenizer.") -> dict[str, torch.Tensor]:
    """A float network's state as a model file stores it, names under `pre`: int8 and a scale per output
    channel for weights of two or more dims, float16 for the rest."""
    out = {}
    for k, v in state.items():
        if v.dim() >= 2:
            out[f"{pre}{k}"], out[f"{pre}{k}.scale"] = quantize_weight(v)
        else:
            out[f"{pre}{k}"] = v.detach().half().cpu().contiguous()
    return out


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Whether two sets of named tensors are the same names with equal tensors."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def float_state(tensors: dict[str, torch.Tensor], pre: str = "tokenizer.") -> dict[str, torch.Tensor]:
    """float_tensors' inverse: the float32 state of the network whose tensors are under `pre`."""
    out = {}
    for k, v in tensors.items():
        if not k.startswith(pre) or k.endswith(".scale"):
            continue
        scale = tensors.get(k + ".scale")
        if scale is not None:
            # one product promoting int8 to float32 (exact): no float32 copy of the int8 weights first,
            # which doubled the fresh memory a process touches when it loads a model
            out[k[len(pre):]] = torch.mul(v, scale.float().view(-1, *[1] * (v.dim() - 1)))
        else:
            out[k[len(pre):]] = v.float()
    return out


MAX_TOKENIZER_PARAMS = 50_000_000  # a model file may not make the decoder allocate more than this


def _meta_tokenizer(cfg) -> Tokenizer:
    """A Tokenizer with no weights yet (the meta device): no memory, no random initialisation to replace."""
    with torch.device("meta"):
        return Tokenizer(cfg)


def check_float_tensors(net: torch.nn.Module, tensors: dict[str, torch.Tensor], pre: str = "tokenizer.",
                        skip: tuple[str, ...] = ()) -> None:
    """ModelError unless the tensors under `pre` are exactly net's (as float_tensors stores them), less those
    whose names start with one of `skip`: names, shapes, dtypes, finite."""
    want = {k: tuple(v.shape) for k, v in net.state_dict().items() if not (skip and k.startswith(skip))}
    if sum(math.prod(s) for s in want.values()) > MAX_TOKENIZER_PARAMS:
        raise ModelError(f"bad model file: its {pre[:-1]} is too large")
    names = {f"{pre}{k}" for k in want} | {f"{pre}{k}.scale" for k, s in want.items() if len(s) >= 2}
    extra = sorted(k for k in tensors if k.startswith(pre) and k not in names)
    if extra:
        raise ModelError(f"bad model file: unexpected tensor {extra[0]!r}")
    floats = (torch.float16, torch.float32)
    for k, shape in want.items():
        v, scale = tensors.get(f"{pre}{k}"), tensors.get(f"{pre}{k}.scale")
        if v is None:
            raise ModelError(f"bad model file: missing tensor '{pre}{k}'")
        ok = tuple(v.shape) == shape and (v.dtype == torch.int8 if scale is not None else v.dtype in floats)
        if scale is not None:
            ok = ok and tuple(scale.shape) == shape[:1] and scale.dtype in floats and bool(torch.isfinite(scale).all())
        elif ok:
            ok = bool(torch.isfinite(v).all())
        if not ok:
            raise ModelError(f"bad model file: tensor '{pre}{k}' has the wrong shape, type or values")


def build(config: ModelConfig, tokenizer_state: dict, prior_tensors: dict, device="cpu") -> Model:
    # the tokenizer ships as int8 weights (half the bytes of float16); it computes in float32 after loading
    tensors = float_tensors(tokenizer_state)
    tensors.update({f"prior.{k}": v.detach().cpu().contiguous() for k, v in prior_tensors.items()})
    return from_tensors(config, tensors, device)


def from_tensors(config, tensors: dict[str, torch.Tensor], device="cpu"):
    """The Model of a config and its tensors, or the second.SecondModel of a second-stage model's config."""
    if isinstance(config, SecondConfig):
        from . import second

        return second.from_tensors(config, tensors)
    if isinstance(config, (LookConfig, SecondLookConfig)):
        from . import look

        return look.from_tensors(config, tensors)
    if config.tokenizer.bits != config.prior.bits:
        raise ModelError("tokenizer and prior disagree on bits per token")
    tok = _meta_tokenizer(config.tokenizer)
    check_float_tensors(tok, tensors)
    tstate = float_state(tensors)
    try:
        tok.load_state_dict(tstate, strict=True, assign=True)
        prior = IntPrior(config.prior, {k[len("prior."):]: v for k, v in tensors.items() if k.startswith("prior.")}, device)
    except (RuntimeError, KeyError, ValueError) as e:
        raise ModelError(f"bad model file: its tensors do not match its config: {str(e).splitlines()[0]}") from None
    tok.eval()
    return Model(config, tok, prior, tensors, canonical_hash(config, tensors))


def save(model: Model, path: str | os.PathLike) -> None:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(model.tensors, str(tmp), metadata={"format": modelfile.format_of(model.config),
                                                 "config": json.dumps(model.config.to_dict()),
                                                 "intprior": INTPRIOR_VERSION})
    os.replace(tmp, path)


def load(path: str | os.PathLike, device="cpu") -> Model:
    return from_tensors(*_read(path), device)


def _read(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (OSError, SafetensorError, ValueError) as e:
        raise ModelError(f"cannot read model file {path}: {e}") from None
    return modelfile.config_of(path, meta), tensors


@lru_cache(maxsize=None)
def _installed_cached(key: tuple) -> tuple[dict[str, tuple[str, bytes]], dict[str, str], dict]:
    found, broken = modelfile.installed(MODELS_DIR)  # name, hash and config only; a model is built when it is used
    return {name: (path, h) for name, (path, h, _) in found.items()}, broken, {n: c for n, (_, _, c) in found.items()}


def _installed_files() -> tuple:
    return tuple((p.name, p.stat().st_mtime_ns) for p in sorted(MODELS_DIR.glob("*.safetensors")))


def installed() -> dict[str, tuple[str, bytes]]:
    """Preset name -> (file, hash) of every readable model shipped in the package."""
    return _installed_cached(_installed_files())[0]


def installed_configs() -> dict:
    """Preset name -> config of every readable model shipped in the package (read with installed())."""
    return _installed_cached(_installed_files())[2]


def broken() -> dict[str, str]:
    """File stem -> error of every installed model file that cannot be read."""
    return _installed_cached(_installed_files())[1]


_loaded: dict[str, Model] = {}


def load_installed(path: str) -> Model:
    """An installed file's model (or look model), read and hashed once per process."""
    if path not in _loaded:
        _loaded[path] = load(path)
    return _loaded[path]


def _named(name: str) -> Model | None:
    """The installed file named after preset `name` if it holds that preset, else None.

    The fast path of preset() and find(): it reads one file, where installed() reads and hashes
    every one (a few tenths of a second of a decode's start). Whatever it does not find, installed()
    is asked; it also reports broken files.
    """
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):  # a file's header names it: never a path
        return None
    path = MODELS_DIR / f"{name}.safetensors"
    if not path.is_file():
        return None
    try:
        model = load_installed(str(path))
    except ModelError:
        return None
    return model if model.name == name else None


def preset(name: str) -> Model:
    """An installed preset by name; qN that is no preset's name names rung N of the quality ladder (q3: the
    default rung). A name wins over a rung: q4 is the first-stage model of that name (kept so that its files
    decode), where rung 4 (`-q 4`) is q4s since 0.6.0."""
    from ..config import RUNG_NAMES

    asked = name
    model = _named(name)
    if model is not None:
        return model
    if name.startswith("q") and name[1:].isdigit() and 1 <= int(name[1:]) <= len(RUNG_NAMES) and name not in installed():
        name = RUNG_NAMES[int(name[1:]) - 1]
        model = _named(name)
        if model is not None:
            return model
    inst = installed()
    if name not in inst:
        if name in broken():
            raise ModelError(f"installed preset {name!r} is broken: {broken()[name]}")
        known = ", ".join(sorted(inst)) or "none"
        if name in RUNG_NAMES:
            rungs = ", ".join(str(q) for q, n in enumerate(RUNG_NAMES, 1) if n in inst) or "none"
            raise ModelNotFoundError(f"quality {RUNG_NAMES.index(name) + 1} (preset {name!r}) is not installed "
                                     f"(installed qualities: {rungs})")
        raise ModelNotFoundError(f"unknown preset {asked!r} (installed: {known})")
    return load_installed(inst[name][0])


def find(model_hash: bytes, name: str, extra: list[Model] | None = None) -> Model:
    """The model with this hash among `extra` and the installed presets.

    model_hash: the whole SHA-256 (files of format 1.x) or its first bytes (format 2.0: 16 of them).
    """
    n = len(model_hash)
    for m in extra or []:
        if m.sha256[:n] == model_hash:
            return m
    named = _named(name)
    if named is not None and named.sha256[:n] == model_hash:
        return named
    if named is not None and isinstance(named.config, SecondConfig):  # a two-stage file names its second stage:
        first = _named(named.config.base)  # its first stage is that model's base, most likely installed as named
        if first is not None and first.sha256[:n] == model_hash:
            return first
    for pname, (path, h) in installed().items():
        if h[:n] == model_hash:
            return load_installed(path)
    if name in broken():
        raise ModelError(f"the file needs preset {name!r}, whose installed file is broken: {broken()[name]}")
    old = next((v for k, v in retired().items() if k.startswith(model_hash.hex())), None)
    if old is not None:
        raise ModelNotFoundError(
            f"the file was made with model {old['name']!r} ({model_hash.hex()[:16]}...) of bsqcodec {old['release']}, "
            f"which this release does not install; decode it with bsqcodec {old['release']} "
            f"(pip install bsqcodec=={old['release']}) or pass that model file with --model"
        )
    raise ModelNotFoundError(
        f"model {name!r} ({model_hash.hex()[:16]}...) is not installed; pass the model file with --model"
    )


def retired() -> dict[str, dict[str, str]]:
    """Hex hash -> {"name", "release"} of models that earlier releases shipped and this one does not."""
    return _retired(MODELS_DIR)


@lru_cache(maxsize=4)
def _retired(models_dir: Path) -> dict[str, dict[str, str]]:  # by folder: a test may point MODELS_DIR elsewhere
    return json.loads((models_dir / "retired.json").read_text())["models"]


def load_checkpoint(path: str | os.PathLike) -> dict:
    """A training checkpoint: {step, config, model, ...}."""
    import pickle

    try:  # weights_only: tensors, numbers, strings, lists and dicts; never code from the file
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, ValueError) as e:
        raise ModelError(f"cannot read checkpoint {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def trained_state(checkpoint: dict) -> dict:
    """The weights a training checkpoint stands for: its EMA average where the run kept one, else the
    last step's (what export ships, --init starts from and benchmarks compare against)."""
    return checkpoint.get("ema", checkpoint["model"])


def load_tokenizer_any(path: str | os.PathLike) -> Tokenizer:
    """A tokenizer from a training checkpoint (.ckpt) or a model file (.safetensors)."""
    path = str(path)
    if path.endswith(".safetensors"):
        return load(path).tokenizer
    state = load_checkpoint(path)
    cfg = ModelConfig.from_dict(state["config"])
    tok = Tokenizer(cfg.tokenizer)
    tok.load_state_dict(trained_state(state))
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
