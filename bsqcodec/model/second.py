"""Second-stage models (formats/bsq.md section 11): build, check, export from a training run.

A second-stage model file holds the residual coder (`residual.*`, stored like a tokenizer: int8 weights
with a scale per output channel, float16 for the rest) and the integer bit prior (`bits.*`), with a
SecondConfig that names the first stage it was trained on by name and hash. Its identity is the
canonical hash of config and tensors (modelfile.digest, format `bsqcodec-second-1`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import intbits
from ..format import modelfile
from ..config import ResidualConfig, SecondConfig
from ..errors import ModelError
from .residual import BitPrior, ResidualCoder


@dataclass
class SecondModel(modelfile.Identity):
    config: SecondConfig
    coder: ResidualCoder  # float32, eval mode
    prior: intbits.IntBitPrior
    tensors: dict[str, torch.Tensor]
    sha256: bytes

    def context_size(self, base_bits: int, ratio: int) -> int:
        return BitPrior.context_size(base_bits, ratio, self.config.residual.bits, self.config.budget, self.config.context)

    def fits(self, base) -> bool:
        """Whether `base` (a weights.Model) is the first stage this model was made for, with a patch it divides."""
        return (base.sha256[:16] == self.base_hash and base.config.tokenizer.patch % self.config.residual.patch == 0
                and self.prior.context_size == self.context_size(base.config.tokenizer.bits,
                                                                 base.config.tokenizer.patch // self.config.residual.patch))


def _meta_coder(cfg: ResidualConfig) -> ResidualCoder:
    with torch.device("meta"):
        return ResidualCoder(cfg)


def from_tensors(config: SecondConfig, tensors: dict[str, torch.Tensor]) -> SecondModel:
    from .weights import canonical_hash, check_float_tensors, float_state

    coder = _meta_coder(config.residual)
    check_float_tensors(coder, tensors, "residual.")
    extra = sorted(k for k in tensors if not k.startswith(("residual.", "bits.")))
    if extra:
        raise ModelError(f"bad model file: unexpected tensor {extra[0]!r}")
    w = tensors.get("bits.fc1.w")
    if w is None or w.dim() != 2:
        raise ModelError("bad model file: missing tensor 'bits.fc1.w'")
    try:
        intbits.validate(tensors, int(w.shape[1]), config.prior_width, config.residual.bits)
        coder.load_state_dict(float_state(tensors, "residual."), strict=True, assign=True)
        prior = intbits.IntBitPrior(tensors, config.budget, kind=config.context)
    except (RuntimeError, KeyError, ValueError) as e:
        raise ModelError(f"bad model file: its tensors do not match its config: {str(e).splitlines()[0]}") from None
    coder.eval()
    return SecondModel(config, coder, prior, tensors, canonical_hash(config, tensors))


def build(config: SecondConfig, coder_state: dict, bit_tensors: dict[str, torch.Tensor]) -> SecondModel:
    from .weights import float_tensors

    tensors = float_tensors(coder_state, "residual.")
    tensors.update({k: v.detach().cpu().contiguous() for k, v in bit_tensors.items()})
    return from_tensors(config, tensors)


@torch.no_grad()
def export(checkpoint: dict, base, name: str, choices: tuple[int, ...], lam: int, calib: torch.Tensor) -> SecondModel:
    """A second-stage training checkpoint (train/residual.py, with its bit prior) -> a SecondModel.

    base: the first stage's weights.Model (the run's --base); calib: (N, C) integer contexts of training
    crops, for the ranges of the bit prior's hidden layers.
    """
    from .weights import trained_state

    if "bit_prior" not in checkpoint:
        raise ModelError("the run has no bit prior (train it with --rate-weight)")
    cfg = ResidualConfig(**checkpoint["config"])
    context = checkpoint.get("context", "checker")  # the bit prior's context kind
    tok = base.config.tokenizer
    fp = BitPrior.from_state(checkpoint["bit_prior"], tok.bits, tok.patch // cfg.patch, cfg.bits, context)
    config = SecondConfig(name=name, base=base.name, base_hash=base.sha256[:16].hex(), residual=cfg,
                          prior_width=fp.net[0].weight.shape[0], budget=fp.budget, choices=tuple(choices), lam=int(lam),
                          context=context)
    return build(config, trained_state(checkpoint), intbits.export(fp, calib))
