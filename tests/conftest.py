import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings

from bsqcodec.model import weights
from bsqcodec.config import ModelConfig, PriorConfig, TokenizerConfig

settings.register_profile(
    "ci", max_examples=int(os.environ.get("HYPOTHESIS_EXAMPLES", "30")), deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile("ci")

TINY = ModelConfig(
    name="tiny",
    tokenizer=TokenizerConfig(patch=4, channels=16, bits=12, enc_blocks=1, dec_blocks=1),
    prior=PriorConfig(bits=12, groups=2, dim=32, layers=2, heads=2, tile_rows=4, tile_cols=5),
)


def smooth_image(rng, width: int, height: int):
    """A small photo-like test image: random 8x6 colours upscaled (PIL.Image)."""
    from PIL import Image

    small = rng.integers(0, 256, (6, 8, 3), dtype="uint8")
    return Image.fromarray(small).resize((width, height), Image.BICUBIC)


def image_folder(root, sizes, seed: int, stem: str = "img"):
    """root with a smooth_image PNG of each (width, height) in sizes, named STEM0.png, STEM1.png, ..."""
    rng = np.random.default_rng(seed)
    for i, (w, h) in enumerate(sizes):
        smooth_image(rng, w, h).save(root / f"{stem}{i}.png")
    return root


@pytest.fixture(scope="session")
def tiny_model() -> weights.Model:
    return weights.random_model(TINY, seed=0)


@pytest.fixture(scope="session")
def model_file(tmp_path_factory, tiny_model):
    """tiny_model saved as a model file (for --model)."""
    p = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    weights.save(tiny_model, p)
    return p


def empty_streams_file(model, width: int, height: int, major: int | None = None) -> bytes:
    """A well-formed file of the model's geometry whose every stream is empty (a crafted file), in the
    encoder's format version or as a 1.2 file (major=1)."""
    from bsqcodec.codec import codec
    from bsqcodec.format import container

    h = codec.make_header(model, width, height)
    if major == 1:
        h = as_version_1_2(h, model)
    return container.pack(h, [b""] * h.tiles)


def as_version_1_2(header, model):
    """A copy of a header as format 1.2 writes it (the whole model hash)."""
    import dataclasses

    return dataclasses.replace(header, major=1, minor=2 if header.chunks else 0, model_hash=model.sha256)


def repack_1_2(data: bytes, model) -> bytes:
    """The 1.2 file of the same tokens as a file of the encoder's version (streams coded again)."""
    from bsqcodec.codec import codec
    from bsqcodec.format import container

    header, tokens, _ = codec.decode_detailed(data, [model])
    h = as_version_1_2(header, model)
    return container.pack(h, codec.encode_tokens(model, h, tokens)[0])


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)
