"""Looks: other decoders of the same files. A file decodes to the faithful look (the models' own decoders,
trained for squared error) or, with look models, to another: "sharp", a decoder trained with a perceptual
term (and optionally an adversarial one) beside the squared error (`bsqc train tokenizer --decoder-only`,
`bsqc train residual --decoder-only`).

A look model file of a first stage (format `bsqcodec-look-1`, formats/bsq.md section 9) holds the
decoder's tensors only (`tokenizer.*` less the encoder's, stored like a model file's) and names the model
whose tokens it decodes by name and hash. One of a second stage (format `bsqcodec-second-look-1`, section
11) holds the residual coder's decoder (`residual.*` less the encoder's) and names every second-stage
model it decodes for: the rungs q4s-q9 share one coder, so one look serves them all. A two-stage file's
sharp look is its first stage's faithful pixels (the second stage's decoder sees those) with the second
stage's correction by the look's decoder.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..format import modelfile
from ..config import LookConfig, SecondLookConfig
from ..errors import ModelError, ModelNotFoundError
from .residual import ResidualCoder
from .tokenizer import Tokenizer


@dataclass
class LookModel(modelfile.Identity):
    """A look of a first-stage model (format bsqcodec-look-1)."""

    config: LookConfig
    tokenizer: Tokenizer  # its decoder only: the encoder's parameters are never loaded
    tensors: dict[str, torch.Tensor]
    sha256: bytes

    def fits(self, base) -> bool:
        """Whether it decodes the tokens of `base` (a weights.Model): made for it, the same token geometry."""
        return base.sha256[:16] == self.base_hash and self.config.tokenizer.encodes_like(base.config.tokenizer)


@dataclass
class SecondLookModel(modelfile.Identity):
    """A look of second-stage models that share one coder (format bsqcodec-second-look-1)."""

    config: SecondLookConfig
    coder: ResidualCoder  # its decoder only: the encoder's parameters are never loaded
    tensors: dict[str, torch.Tensor]
    sha256: bytes

    def fits(self, smodel) -> bool:
        """Whether it decodes the second stage of `smodel` (a second.SecondModel): made for it, the same code."""
        a, b = self.config.residual, smodel.config.residual
        return smodel.sha256[:16].hex() in self.config.base_hashes() and (a.patch, a.bits) == (b.patch, b.bits)


def coding_error(m) -> str:
    """Why a look model cannot encode, sample or be benched as a rung: it only decodes other models' files."""
    of = ", ".join(n for n, _ in m.config.bases)
    return f"{m.name} is a look model: it decodes the files of {of} (decode --look {m.config.look}); use that preset"


def from_tensors(config: LookConfig | SecondLookConfig, tensors: dict[str, torch.Tensor]) -> LookModel | SecondLookModel:
    """The look model of a config and its tensors (the decoder's only), checked."""
    from .weights import canonical_hash, check_float_tensors, float_state

    kind, net_cls, pre = ((LookModel, Tokenizer, "tokenizer.") if isinstance(config, LookConfig)
                          else (SecondLookModel, ResidualCoder, "residual."))
    with torch.device("meta"):
        net = net_cls(config.tokenizer if kind is LookModel else config.residual)
    check_float_tensors(net, tensors, pre, skip=net_cls.ENCODER)
    extra = sorted(k for k in tensors if not k.startswith(pre))  # the encoder's: check_float_tensors
    if extra:
        raise ModelError(f"bad model file: unexpected tensor {extra[0]!r}")
    try:
        net.load_state_dict(float_state(tensors, pre), strict=False, assign=True)
    except (RuntimeError, KeyError, ValueError) as e:
        raise ModelError(f"bad model file: its tensors do not match its config: {str(e).splitlines()[0]}") from None
    return kind(config, net.eval(), tensors, canonical_hash(config, tensors))


def build(base, look: str, name: str, tokenizer_state: dict, tokenizer_config=None) -> LookModel:
    """A look of `base` (a weights.Model) from a tokenizer's state (its decoder's entries are kept)."""
    from .weights import float_tensors

    config = LookConfig(name=name, look=look, base=base.name, base_hash=base.sha256[:16].hex(),
                        tokenizer=tokenizer_config or base.config.tokenizer)
    decoder = {k: v for k, v in tokenizer_state.items() if not k.startswith(Tokenizer.ENCODER)}
    return from_tensors(config, float_tensors(decoder))


def build_second(bases: list, look: str, name: str, coder_state: dict) -> SecondLookModel:
    """A look of the second-stage models `bases` (which share one coder) from a residual coder's state (its
    decoder's entries are kept)."""
    from .weights import float_tensors, same_tensors

    if not bases:
        raise ModelError("a second-stage look needs the second-stage models it decodes for")
    enc = [{k: v for k, v in m.tensors.items() if k.startswith(tuple(f"residual.{e}" for e in ResidualCoder.ENCODER))
            or k.startswith("bits.")} for m in bases]
    if any(m.config.residual != bases[0].config.residual or not same_tensors(e, enc[0]) for m, e in zip(bases, enc)):
        raise ModelError("the second-stage models of one look must share one coder (the same encoder and bit prior)")
    config = SecondLookConfig(name=name, look=look, bases=tuple((m.name, m.sha256[:16].hex()) for m in bases),
                              residual=bases[0].config.residual)
    decoder = {k: v for k, v in coder_state.items() if not k.startswith(ResidualCoder.ENCODER)}
    return from_tensors(config, float_tensors(decoder, "residual."))


def find(model, look: str, models: list | None = None) -> LookModel | SecondLookModel:
    """The look model named `look` for `model` (a first-stage weights.Model, or a second.SecondModel): among
    `models`, else installed."""
    from . import weights

    kind = LookModel if isinstance(model, weights.Model) else SecondLookModel
    for m in models or []:
        if isinstance(m, kind) and m.config.look == look and m.fits(model):
            return m
    inst = weights.installed()  # cached: the files are read and hashed once while they do not change
    h = model.sha256[:16].hex()
    for name, config in weights.installed_configs().items():
        if isinstance(config, (LookConfig, SecondLookConfig)) and config.look == look and h in config.base_hashes():
            m = weights.load_installed(inst[name][0])  # once per process: every tuned encode and sharp decode asks
            if isinstance(m, kind) and m.fits(model):
                return m
    what = "model" if kind is LookModel else "the second-stage model"
    raise ModelNotFoundError(f"no {look} look is installed for {what} {model.name!r}; pass its look model file with --model")
