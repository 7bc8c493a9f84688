"""Frozen configuration dataclasses for the tokenizer, the prior and a preset."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

# The integer prior's arithmetic (formats/intprior.md): model files name the version they were exported for
INTPRIOR_VERSION = "1"
# the encoder's search (search.py): effort levels
MIN_EFFORT, MAX_EFFORT = 1, 9
DEFAULT_EFFORT = 4
# decoding (codec.py): tiles whose prior steps run together
DEFAULT_BATCH_TILES = 128  # a 768x512 photo is one batch; memory stays around 200 MB
MAX_BATCH_TILES = 4096


def _check_ints(cfg, **bounds: tuple[int, int]) -> None:
    """ValueError unless every named field is an int within its bounds (configs come from files)."""
    for name, (lo, hi) in bounds.items():
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise ValueError(f"{name} must be an integer from {lo} to {hi}, not {v!r}")


@dataclass(frozen=True)
class TokenizerConfig:
    patch: int = 8  # pixels per patch side; the token grid is (H/patch, W/patch)
    channels: int = 192  # width of the latent-grid convolutions
    bits: int = 16  # L, bits per token (BSQ code length)
    enc_blocks: int = 2  # residual blocks on the latent grid, encoder side
    dec_blocks: int = 4  # residual blocks on the latent grid, decoder side
    overlap: bool = True  # final transposed conv has kernel 2*patch (smooths patch seams)
    # decoder only: a stage at twice the latent resolution (width up_channels, up_blocks residual
    # blocks) before the pixels; 0 = none. Written into a config's JSON only when nonzero, so the
    # hashes of models without it never change.
    up_channels: int = 0
    up_blocks: int = 0

    DECODER_FIELDS = ("dec_blocks", "overlap", "up_channels", "up_blocks")  # nothing the tokens depend on
    OPTIONAL_FIELDS = ("up_channels", "up_blocks")  # in to_dict() only when nonzero

    def __post_init__(self) -> None:
        _check_ints(self, patch=(1, 32), channels=(1, 2048), bits=(1, 48), enc_blocks=(0, 32), dec_blocks=(0, 32),
                    up_channels=(0, 2048), up_blocks=(0, 32))
        if not isinstance(self.overlap, bool):
            raise ValueError("overlap must be true or false")
        if self.up_blocks and not self.up_channels:
            raise ValueError("up_blocks needs up_channels")
        if self.up_channels and self.patch % 2:
            raise ValueError("an upsampling stage (up_channels) needs an even patch")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: v for k, v in d.items() if v or k not in self.OPTIONAL_FIELDS}

    def has_prefix(self, other: "TokenizerConfig") -> bool:
        """True when `other` is this tokenizer cut to its first other.bits bits (nested BSQ)."""
        return other.bits <= self.bits and dataclasses.replace(self, bits=other.bits) == other

    def encodes_like(self, other: "TokenizerConfig") -> bool:
        """has_prefix, whatever the two decoders: this tokenizer gives `other`'s tokens (their first bits)."""
        return self.has_prefix(dataclasses.replace(other, **{f: getattr(self, f) for f in self.DECODER_FIELDS}))

    @property
    def halo(self) -> int:
        """Latent rows/cols of context one output position depends on (for strip processing)."""
        return 1 + 2 * max(self.enc_blocks, self.dec_blocks) + self.up_blocks + 1


@dataclass(frozen=True)
class PriorConfig:
    bits: int = 16  # token bits; must equal the tokenizer's
    groups: int = 2  # a token is coded as `groups` symbols of bits/groups bits, MSB group first
    dim: int = 192  # embedding width
    layers: int = 4
    heads: int = 6
    mlp_ratio: int = 4
    tile_rows: int = 16  # a tile holds at most tile_rows x tile_cols tokens
    tile_cols: int = 16

    def __post_init__(self) -> None:
        _check_ints(self, bits=(1, 48), groups=(1, 48), dim=(1, 4096), layers=(1, 64), heads=(1, 4096),
                    mlp_ratio=(1, 16), tile_rows=(1, 512), tile_cols=(1, 512))
        if self.bits % self.groups or self.bits // self.groups > 12:
            raise ValueError("bits must split into groups of at most 12 bits")
        if self.dim % self.heads or self.dim // self.heads > 128:
            raise ValueError("dim must be a multiple of heads, with head size at most 128")
        if self.tile_rows * self.tile_cols > 512:
            raise ValueError("a tile holds at most 512 tokens (the integer attention's exactness bound)")

    @property
    def group_bits(self) -> int:
        return self.bits // self.groups

    @property
    def tile_tokens(self) -> int:
        return self.tile_rows * self.tile_cols


@dataclass(frozen=True)
class ModelConfig:
    name: str
    tokenizer: TokenizerConfig
    prior: PriorConfig

    def to_dict(self) -> dict:
        return {"name": self.name, "tokenizer": self.tokenizer.to_dict(), "prior": dataclasses.asdict(self.prior)}

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        return cls(
            name=str(d["name"]),
            tokenizer=TokenizerConfig(**d["tokenizer"]),
            prior=PriorConfig(**d["prior"]),
        )


@dataclass(frozen=True)
class ResidualConfig:
    """The second token stage's coder (residual.py)."""

    patch: int = 4  # P2, pixels per patch side of the second grid
    channels: int = 128
    bits: int = 24  # L2, bits per token (nested: a token keeps a prefix)
    enc_blocks: int = 2
    dec_blocks: int = 4

    def __post_init__(self) -> None:
        _check_ints(self, patch=(2, 16), channels=(1, 1024), bits=(1, 32), enc_blocks=(0, 32), dec_blocks=(0, 32))
        if self.patch % 2:
            raise ValueError("the residual stage needs an even patch (its output overlaps by half a patch)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class SecondConfig:
    """A second-stage model (formats/bsq.md section 11): its coder, its bit prior, its budget choices, the
    first stage it is trained on (by name and hash) and the encoder's default rate-distortion trade-off."""

    name: str
    base: str  # the first stage's preset name
    base_hash: str  # the first 16 bytes of the first stage's model hash, 32 lower-case hex digits
    residual: ResidualConfig
    prior_width: int
    budget: bool  # the bit prior sees each token's bit count
    choices: tuple[int, ...]  # bits a region's tokens keep, one entry per choice of the budget map
    lam: int  # the encoder's default trade-off: squared 8-bit pixel errors per bit ("lambda" in files)
    context: str = "checker"  # the bit prior's context kind, one of CONTEXTS (omitted from files when "checker")

    CONTEXTS = {"checker": 2, "quad3x3": 4}  # context kind -> passes of each band (formats/bsq.md section 11)

    def __post_init__(self) -> None:
        import re

        if self.context not in self.CONTEXTS:
            raise ValueError(f"context must be one of {', '.join(self.CONTEXTS)}, not {self.context!r}")

        if not isinstance(self.base_hash, str) or not re.fullmatch(r"[0-9a-f]{32}", self.base_hash):
            raise ValueError("base_hash must be 32 lower-case hex digits")
        _check_ints(self, prior_width=(1, 4096), lam=(0, 2**40))
        if not isinstance(self.budget, bool):
            raise ValueError("budget must be true or false")
        c = self.choices
        if not 2 <= len(c) <= 64 or any(isinstance(k, bool) or not isinstance(k, int) for k in c) \
                or list(c) != sorted(set(c)) or c[0] < 0 or c[-1] > self.residual.bits:
            raise ValueError(f"choices must be 2 to 64 rising bit counts from 0 to {self.residual.bits}")

    def to_dict(self) -> dict:
        return {"name": self.name, "base": self.base, "base_hash": self.base_hash, "residual": self.residual.to_dict(),
                "prior_width": self.prior_width, "budget": self.budget, "choices": list(self.choices), "lambda": self.lam} | ({} if self.context == "checker" else {"context": self.context})

    @property
    def passes(self) -> int:
        return self.CONTEXTS[self.context]

    @classmethod
    def from_dict(cls, d: dict) -> "SecondConfig":
        return cls(name=str(d["name"]), base=str(d["base"]), base_hash=d["base_hash"],
                   residual=ResidualConfig(**d["residual"]), prior_width=d["prior_width"], budget=d["budget"],
                   choices=tuple(d["choices"]), lam=d["lambda"], context=d.get("context", "checker"))


@dataclass(frozen=True)
class LookConfig:
    """Another decoder for a first-stage model's tokens (a *look*, formats/bsq.md section 9): the same files,
    other pixels. Named by the model it decodes for (its name and the first 16 bytes of its hash)."""

    name: str
    look: str  # what the decoder is for: "sharp" (trained with perceptual and adversarial terms)
    base: str
    base_hash: str
    tokenizer: TokenizerConfig  # the base's, with this decoder's fields

    LOOKS = ("sharp",)  # "faithful" is the model's own decoder

    def __post_init__(self) -> None:
        import re

        if not isinstance(self.base_hash, str) or not re.fullmatch(r"[0-9a-f]{32}", self.base_hash):
            raise ValueError("base_hash must be 32 lower-case hex digits")
        if self.look not in self.LOOKS:
            raise ValueError(f"look must be one of {', '.join(self.LOOKS)}, not {self.look!r}")

    @property
    def bases(self) -> tuple[tuple[str, str], ...]:
        """(name, hash) of the model whose files it decodes, as a look of second stages names its several."""
        return ((self.base, self.base_hash),)

    def base_hashes(self) -> set[str]:
        return {self.base_hash}

    def to_dict(self) -> dict:
        return {"name": self.name, "look": self.look, "base": self.base, "base_hash": self.base_hash,
                "tokenizer": self.tokenizer.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> "LookConfig":
        return cls(name=str(d["name"]), look=str(d["look"]), base=str(d["base"]), base_hash=d["base_hash"],
                   tokenizer=TokenizerConfig(**d["tokenizer"]))


@dataclass(frozen=True)
class SecondLookConfig:
    """Another decoder for the second stage of files (a look, formats/bsq.md section 11). Second-stage models
    that share one coder (the rungs q4s-q9: one coder, several trade-offs) share its looks, so it names each
    model whose files it decodes (its name and the first 16 bytes of its hash) in `bases`."""

    name: str
    look: str
    bases: tuple[tuple[str, str], ...]  # (name, hash) of each second-stage model it decodes for
    residual: ResidualConfig  # the models' coder's, with this decoder's fields

    MAX_BASES = 64

    def __post_init__(self) -> None:
        import re

        if self.look not in LookConfig.LOOKS:
            raise ValueError(f"look must be one of {', '.join(LookConfig.LOOKS)}, not {self.look!r}")
        if not 1 <= len(self.bases) <= self.MAX_BASES:
            raise ValueError(f"bases must name 1 to {self.MAX_BASES} models")
        for name, h in self.bases:
            if not isinstance(name, str) or not isinstance(h, str) or not re.fullmatch(r"[0-9a-f]{32}", h):
                raise ValueError("each of bases is a name and 32 lower-case hex digits")
        if len({h for _, h in self.bases}) != len(self.bases):
            raise ValueError("bases names a model twice")

    def base_hashes(self) -> set[str]:
        return {h for _, h in self.bases}

    def to_dict(self) -> dict:
        return {"name": self.name, "look": self.look, "bases": [{"name": n, "hash": h} for n, h in self.bases],
                "residual": self.residual.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> "SecondLookConfig":
        bases = d["bases"]
        if not isinstance(bases, list) or not all(isinstance(b, dict) for b in bases):
            raise ValueError("bases must be a list of objects")
        return cls(name=str(d["name"]), look=str(d["look"]), bases=tuple((b["name"], b["hash"]) for b in bases),
                   residual=ResidualConfig(**d["residual"]))


LOOKS = ("faithful", *LookConfig.LOOKS)  # what a decoder can give: the model's own decoder, then the look models'


SEED = ModelConfig(
    name="seed",
    tokenizer=TokenizerConfig(patch=5, channels=128, bits=10, enc_blocks=0, dec_blocks=0, overlap=False),
    prior=PriorConfig(bits=10, groups=1, dim=128, layers=6, heads=4, tile_rows=16, tile_cols=16),
)
# the default rung's prior has 2 layers since 0.5.0: as good in bits as 4 once trained on (11.658 held-out
# bits per token against 11.707), and decoding costs about half as much per token
DEFAULT = ModelConfig(name="default", tokenizer=TokenizerConfig(), prior=PriorConfig(layers=2))


def _rung(name: str, bits: int, groups: int) -> ModelConfig:
    return ModelConfig(name=name, tokenizer=TokenizerConfig(bits=bits), prior=PriorConfig(bits=bits, groups=groups))


# The first-stage models (`bsqc train --arch q4` ...): one nested tokenizer (trained as NESTED, every
# model keeps its first `bits`), one prior per model. Groups of at most 8 bits keep decoding fast.
LADDER = (
    _rung("q1", 6, 1),
    _rung("q2", 10, 2),
    DEFAULT,  # q3
    _rung("q4", 24, 3),
    _rung("q5", 28, 4),
)
# The quality ladder (`bsqc encode -q N` names RUNG_NAMES[N - 1]): q1, q2 and the default rung are
# first-stage models; above them, second-stage presets (formats/bsq.md section 11) on the default rung.
# Since 0.6.0 rungs 4 and 5 are q4s and q5s (the second stage at lambda 1800 and 850): on Kodak, q4s
# gives 0.24 dB more than the first-stage q4 with 14% fewer bytes, q5s 0.77 dB more than q5 with 5% fewer. q4 and q5 stay installed, so that their files
# decode, and `--preset q4` still names them (weights.preset: a preset's name wins over a rung number).
SECOND_RUNGS = ("q4s", "q5s", "q6", "q7", "q8", "q9")
RUNG_NAMES = ("q1", "q2", "default", *SECOND_RUNGS)
# the architecture the ladder's tokenizer is trained in: 48 bits, of which the rungs use a prefix
NESTED = _rung("nested", 48, 6)
ARCHITECTURES = {c.name: c for c in (SEED, *LADDER, NESTED)}
