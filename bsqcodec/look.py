"""Looks: other decoders of a first-stage model's tokens (formats/bsq.md section 9). The same file decodes
to the faithful look (the model's own decoder, trained for squared error) or, with a look model, to
another: "sharp", trained with perceptual and adversarial terms (`bsqc train tokenizer --decoder-only`).

A look model file (format `bsqcodec-look-1`) holds the decoder's tensors only (`tokenizer.*` less the
encoder's, stored like a model file's) and names the model whose tokens it decodes by name and hash.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import modelfile
from .config import LookConfig
from .errors import ModelError, ModelNotFoundError
from .tokenizer import Tokenizer


@dataclass
class LookModel(modelfile.Identity):
    config: LookConfig
    tokenizer: Tokenizer  # its decoder only: the encoder's parameters are never loaded
    tensors: dict[str, torch.Tensor]
    sha256: bytes

    def fits(self, base) -> bool:
        """Whether it decodes the tokens of `base` (a weights.Model): made for it, the same token geometry."""
        return base.sha256[:16] == self.base_hash and self.config.tokenizer.encodes_like(base.config.tokenizer)


def from_tensors(config: LookConfig, tensors: dict[str, torch.Tensor]) -> LookModel:
    from .weights import canonical_hash, check_float_tensors, float_state

    with torch.device("meta"):
        tok = Tokenizer(config.tokenizer)
    check_float_tensors(tok, tensors, "tokenizer.", skip=Tokenizer.ENCODER)
    extra = sorted(k for k in tensors if not k.startswith("tokenizer."))  # the encoder's: check_float_tensors
    if extra:
        raise ModelError(f"bad model file: unexpected tensor {extra[0]!r}")
    try:
        tok.load_state_dict(float_state(tensors), strict=False, assign=True)
    except (RuntimeError, KeyError, ValueError) as e:
        raise ModelError(f"bad model file: its tensors do not match its config: {str(e).splitlines()[0]}") from None
    tok.eval()
    return LookModel(config, tok, tensors, canonical_hash(config, tensors))


def build(base, look: str, name: str, tokenizer_state: dict, tokenizer_config=None) -> LookModel:
    """A look of `base` (a weights.Model) from a tokenizer's state (its decoder's entries are kept)."""
    from .weights import float_tensors

    config = LookConfig(name=name, look=look, base=base.name, base_hash=base.sha256[:16].hex(),
                        tokenizer=tokenizer_config or base.config.tokenizer)
    decoder = {k: v for k, v in tokenizer_state.items() if not k.startswith(Tokenizer.ENCODER)}
    return from_tensors(config, float_tensors(decoder))


def find(base, look: str, models: list | None = None) -> LookModel:
    """The look model named `look` for the model `base`: among `models`, else installed."""
    from . import weights

    for m in models or []:
        if isinstance(m, LookModel) and m.config.look == look and m.fits(base):
            return m
    inst = weights.installed()  # cached: the files are read and hashed once while they do not change
    for name, config in weights.installed_configs().items():
        if isinstance(config, LookConfig) and config.look == look and config.base_hash == base.sha256[:16].hex():
            m = weights.load(inst[name][0])
            if m.fits(base):
                return m
    raise ModelNotFoundError(f"no {look} look is installed for model {base.name!r}; pass its look model file with --model")
