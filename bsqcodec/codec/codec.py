"""The codec: image -> tokens -> tiles -> streams -> container, and back.

The only module that composes tokenizer, integer prior, entropy coder and container.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..format import container, entropy
from . import images, search
from ..model import weights
from ..model import look as look_mod
from . import workers as workers_mod
from ..config import DEFAULT_BATCH_TILES, LOOKS, MAX_BATCH_TILES, RUNG_NAMES
from ..format.container import Header
from ..errors import BsqError, FormatError, TargetError
from ..metrics import psnr  # noqa: F401  (re-exported: codec.psnr)
from .autoregress import run_tiles
from ..cpu import single_threaded_kernels
from ..model.second import SecondModel
from ..model.tokenizer import join_groups, split_groups

Progress = Callable[[str, int, int], None]  # (stage, done, total)

ENCODE_BATCH = 8  # tiles per teacher-forced pass; affects speed only, never the bytes
APPROX_BATCH = 32  # tiles per pass of the float prior (the search's rate estimates)


@dataclass
class Encoded:
    data: bytes
    tokens: torch.Tensor  # (rows, cols) int64
    estimated_bits: float  # sum of -log2 p over all coded symbols under the integer prior (the first stage's)
    header: Header
    pixels: Callable[[], np.ndarray] | None = None  # the decoder's (height, width, 3) pixels, computed when called


def _model(model: weights.Model | SecondModel | str | None) -> weights.Model | SecondModel:
    m = weights.preset(model or "default") if model is None or isinstance(model, str) else model
    if not isinstance(m, (weights.Model, SecondModel)):
        raise BsqError(look_mod.coding_error(m))
    return m


def tile_slices(header: Header) -> list[tuple[slice, slice]]:
    gr, gc = header.grid
    out = []
    for r0 in range(0, gr, header.tile_rows):
        for c0 in range(0, gc, header.tile_cols):
            out.append((slice(r0, min(gr, r0 + header.tile_rows)), slice(c0, min(gc, c0 + header.tile_cols))))
    return out


def _pad(arr: np.ndarray, patch: int) -> np.ndarray:
    h, w = arr.shape[:2]
    if h % patch == 0 and w % patch == 0:
        return arr
    return np.pad(arr, ((0, -h % patch), (0, -w % patch), (0, 0)), mode="edge")


def image_to_tokens(model: weights.Model, arr: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (rows, cols) tokens, padding to the patch multiple by edge replication."""
    padded = _pad(arr, model.tokenizer.cfg.patch)
    return model.tokenizer.image_to_tokens(padded)


def tokens_to_array(model: weights.Model, tokens: torch.Tensor, width: int, height: int) -> np.ndarray:
    """(rows, cols) tokens -> (height, width, 3) uint8 pixels."""
    px = model.tokenizer.tokens_to_image(tokens)
    return px[:height, :width].numpy()


def make_header(model: weights.Model, width: int, height: int, icc: bytes | None = None,
                tokens: torch.Tensor | None = None) -> Header:
    """The header of a file; with `tokens`, it carries their checksum (tCRC) for the decoder to verify."""
    t, p = model.config.tokenizer, model.config.prior
    chunks = [(b"iCCP", icc)] if icc else []
    if tokens is not None:
        chunks.append((container.TOKEN_CRC, container.token_crc(tokens.numpy())))
    h = Header(width, height, t.patch, t.bits, p.groups, p.tile_rows, p.tile_cols, model.name,
               model.sha256[: container.HASH_BYTES[container.MAJOR]], chunks=chunks)
    h.validate()
    return h


def tile_tables(model: weights.Model, header: Header, tokens: torch.Tensor, approx: bool = False):
    """Yields (tile indices, symbols (B, T, G), tables (B, T, G, n)) for batches of same-shape tiles.

    approx: the float prior read back from the integer one (Model.float_prior), for estimates only: its
    tables never code a file.
    """
    slices = tile_slices(header)
    by_shape: dict[tuple[int, int], list[int]] = {}
    for i, (rs, cs) in enumerate(slices):
        by_shape.setdefault((rs.stop - rs.start, cs.stop - cs.start), []).append(i)
    prior, per_batch = (model.float_prior(), APPROX_BATCH) if approx else (model.prior, ENCODE_BATCH)
    for (r, c), idxs in by_shape.items():
        for k in range(0, len(idxs), per_batch):
            batch = idxs[k : k + per_batch]
            grid = torch.stack([tokens[slices[i]] for i in batch]).reshape(len(batch), r * c)
            sym = split_groups(grid, header.bits, header.groups)  # (B, T, G)
            with torch.no_grad():
                tabs = torch.stack(prior.tables(sym, r, c), 2).cpu()  # (B, T, G, n)
            yield batch, sym, tabs


def encode_tokens(model: weights.Model, header: Header, tokens: torch.Tensor, progress: Progress | None = None) -> tuple[list[bytes], float]:
    """Token grid -> one range-coded stream per tile, and the ideal code length in bits."""
    n_tiles = header.tiles
    streams: list[bytes | None] = [None] * n_tiles
    est = 0.0
    done = 0
    for batch, sym, tabs in tile_tables(model, header, tokens):
        tabs = tabs.numpy()
        for b, i in enumerate(batch):
            s = sym[b].reshape(-1).numpy()
            t = tabs[b].reshape(len(s), -1)
            streams[i] = entropy.encode(s, t, trimmed=header.major >= 2)
            est += entropy.bits(s, t)
        done += len(batch)
        if progress:
            progress("encode", done, n_tiles)
    return streams, est  # type: ignore[return-value]


def rate_costs(model: weights.Model, header: Header, tokens: torch.Tensor,
               approx: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The prior's cost in bits of each token bit being 0 and being 1, given the other tokens.

    Each (bits, rows, cols); the context of every token is `tokens` (see search.py). approx: from the
    float prior (Model.float_prior: a few times faster; costs within about a tenth of a bit, a few
    thousandths on average).
    """
    g = header.bits // header.groups
    slices = tile_slices(header)
    shape = (header.bits, *tokens.shape)
    cost0, cost1 = torch.zeros(shape, dtype=torch.float64), torch.zeros(shape, dtype=torch.float64)
    for batch, _, tabs in tile_tables(model, header, tokens, approx):
        c0, c1 = search.bit_costs(tabs, g)  # (B, T, G, g) each
        for b, i in enumerate(batch):
            rs, cs = slices[i]
            r, c = rs.stop - rs.start, cs.stop - cs.start
            cost0[:, rs, cs] = c0[b].reshape(r, c, -1).permute(2, 0, 1)
            cost1[:, rs, cs] = c1[b].reshape(r, c, -1).permute(2, 0, 1)
    return cost0, cost1


def search_inputs(model: weights.Model, arr: np.ndarray) -> tuple[torch.Tensor, search.Costs]:
    """What the search starts from: the tokenizer's latent of the image (1, bits, rows, cols) and the
    prior's per-bit costs with the tokenizer's own signs as context (one teacher-forced pass)."""
    h, w = arr.shape[:2]
    latent = model.tokenizer.image_to_latent(_pad(arr, model.tokenizer.cfg.patch))
    start = model.tokenizer.quant.codes_to_tokens(latent)[0]
    return latent, rate_costs(model, make_header(model, w, h), start, approx=True)


def search_tokens(model: weights.Model, arr: np.ndarray, effort: int, progress: Progress | None = None,
                  look: look_mod.LookModel | None = None) -> torch.Tensor:
    """The token grid of an image at an effort (1: the tokenizer's own signs; see search.py); look: a look
    of the model to tune the search for (tuned_look), None: its own decoder and squared error."""
    steps = search.iterations(effort, tuned=look is not None)
    if not steps:
        return image_to_tokens(model, arr)
    latent, costs = search_inputs(model, arr)
    return search.refine(model.tokenizer, latent, arr, steps, costs, search.rate_weight(model.config.tokenizer.bits), progress,
                         look.tokenizer if look is not None else None)


def tuned_look(model: weights.Model | SecondModel, tune: str, effort: int, models: list | None = None) -> look_mod.LookModel | None:
    """The look an encoder's search is tuned for (`--tune`): None for "faithful" (the model's own decoder and
    squared error); else that look of the model, installed or among `models`. BsqError where it cannot be."""
    if tune not in LOOKS:
        raise BsqError(f"unknown tune {tune!r}; choose from {', '.join(LOOKS)}")
    if tune == "faithful":
        return None
    if isinstance(model, SecondModel):
        raise BsqError(f"--tune {tune} is for rungs of one stage (q1, q2, default), not the two-stage rung {model.name!r}")
    if not search.iterations(effort):
        raise BsqError(f"--tune {tune} tunes the encoder's search, and effort 1 does not search: use effort 2 or more")
    return look_mod.find(model, tune, models)


def encode_array(arr: np.ndarray, model: weights.Model | SecondModel | str | None = None, icc: bytes | None = None,
                 progress: Progress | None = None, effort: int = search.DEFAULT_EFFORT, lam: float | None = None,
                 models: list | None = None, tune: str = "faithful") -> Encoded:
    """effort 1..9: how hard the encoder searches for better tokens (1: none; see search.py). A second-stage
    model codes its first stage (installed, or among `models`), then its own (lam: its rate-distortion
    trade-off; None: the model's). tune: the look the search aims at (tuned_look; the file is the same kind)."""
    model = _model(model)
    look = tuned_look(model, tune, effort, models)
    if isinstance(model, SecondModel):
        return _encode_two(arr, model, icc, progress, effort, lam, models)
    return encode_grid(model, search_tokens(model, arr, effort, progress, look), arr.shape[1], arr.shape[0], icc, progress)


def base_model(smodel: SecondModel, models: list | None = None) -> weights.Model:
    """The first stage a second-stage model was made for (installed, or among `models`)."""
    return weights.find(smodel.base_hash, smodel.config.base, models)


def _encode_two(arr: np.ndarray, smodel: SecondModel, icc, progress, effort: int, lam: float | None,
                models: list | None) -> Encoded:
    """A 2.1 file: the first stage's tokens and streams as its own file has them, then the second stage."""
    return add_second_stage(first_stage(base_model(smodel, models), arr, effort, icc, progress), smodel, lam, effort)


@dataclass
class FirstStage:
    """A first stage coded as its own file codes it, and what a second stage is coded on."""
    model: weights.Model
    tokens: torch.Tensor
    header: Header
    streams: list[bytes]
    estimated_bits: float
    padded: np.ndarray  # the image, padded to the patch multiple
    pixels: np.ndarray  # the first stage's pixels over the padded image


def first_stage(base: weights.Model, arr: np.ndarray, effort: int = search.DEFAULT_EFFORT, icc: bytes | None = None,
                progress: Progress | None = None) -> FirstStage:
    tokens = search_tokens(base, arr, effort, progress)
    header = make_header(base, arr.shape[1], arr.shape[0], icc, tokens)
    streams, est = encode_tokens(base, header, tokens, progress)
    return FirstStage(base, tokens, header, streams, est, _pad(arr, base.config.tokenizer.patch),
                      padded_pixels(base, tokens))


def add_second_stage(first: FirstStage, smodel: SecondModel, lam: float | None = None,
                     effort: int = search.DEFAULT_EFFORT) -> Encoded:
    """The 2.1 file of a first stage and smodel's second stage on it (first is not changed: several second-stage
    models can be coded on one first stage, each file as encode_array makes it)."""
    from . import twostage  # second-stage files only

    header = copy.copy(first.header)
    width, height = header.width, header.height
    header.minor, header.preset = 1, smodel.name
    header.second, bits, budget = twostage.encode(smodel, first.padded, first.pixels, first.tokens.numpy(),
                                                  first.model.config.tokenizer.bits, width, height, lam, effort)
    return Encoded(container.pack(header, first.streams), first.tokens, first.estimated_bits, header,
                   lambda: twostage.pixels(smodel, first.pixels, bits, budget)[:height, :width])


def padded_pixels(model: weights.Model, tokens: torch.Tensor) -> np.ndarray:
    """The first stage's uint8 pixels over the whole token grid (the padded image)."""
    P = model.config.tokenizer.patch
    return tokens_to_array(model, tokens, tokens.shape[1] * P, tokens.shape[0] * P)


def encode_grid(model: weights.Model, tokens: torch.Tensor, width: int, height: int, icc: bytes | None = None,
                progress: Progress | None = None) -> Encoded:
    """A token grid (whatever chose it) -> the whole file."""
    header = make_header(model, width, height, icc, tokens)
    streams, est = encode_tokens(model, header, tokens, progress)
    return Encoded(container.pack(header, streams), tokens, est, header,
                   lambda: tokens_to_array(model, tokens, width, height))


def ladder_models() -> list[weights.Model | SecondModel]:
    """The installed presets of the quality ladder, from -q 1 (smallest files) up (second-stage rungs last)."""
    inst = weights.installed()
    return [weights.preset(name) for name in RUNG_NAMES if name in inst]


def encode_to_target(arr: np.ndarray, icc: bytes | None = None, *, target_size: int | None = None,
                     target_psnr: float | None = None, models: list[weights.Model] | None = None,
                     progress: Progress | None = None, effort: int = search.DEFAULT_EFFORT) -> tuple[Encoded, weights.Model]:
    """Encode with the rung a target picks, from `models` (the installed ladder by default, smallest first).

    target_size: the best rung whose whole file has at most this many bytes (rungs tried from the top).
    target_psnr: the smallest rung whose decoded image reaches this PSNR (rungs tried from the bottom;
    at effort 1 only the chosen one runs the prior). Every rung tried is encoded at `effort`.
    """
    if (target_size is None) == (target_psnr is None):
        raise ValueError("give exactly one of target_size and target_psnr")
    models = models if models is not None else ladder_models()
    if not models:
        raise TargetError("no quality ladder is installed")
    if target_size is not None:
        smallest = None
        for m in reversed(models):
            enc = encode_array(arr, m, icc, progress, effort)
            if len(enc.data) <= target_size:
                return enc, m
            smallest = len(enc.data)
        raise TargetError(f"no quality fits in {target_size} bytes: the smallest file, "
                          f"with preset {models[0].name}, is {smallest} bytes")
    best, best_name = -math.inf, ""
    for m in models:
        if isinstance(m, SecondModel):  # its pixels need its whole file
            enc = encode_array(arr, m, icc, progress, effort)
            q = psnr(arr, enc.pixels())
            if q >= target_psnr:
                return enc, m
        else:
            tokens = search_tokens(m, arr, effort, progress)
            q = psnr(arr, tokens_to_array(m, tokens, arr.shape[1], arr.shape[0]))
            if q >= target_psnr:
                return encode_grid(m, tokens, arr.shape[1], arr.shape[0], icc, progress), m
        if q > best:
            best, best_name = q, m.name
    raise TargetError(f"no quality reaches {target_psnr:g} dB PSNR: the best, preset {best_name}, gives {best:.2f} dB")


def encode(image: Image.Image | np.ndarray, model: weights.Model | str | None = None,
           progress: Progress | None = None, *, target_size: int | None = None,
           target_psnr: float | None = None, max_pixels: int | None = None,
           effort: int = search.DEFAULT_EFFORT, tune: str = "faithful") -> bytes:
    """An image (PIL or (H, W, 3) uint8 array) -> the bytes of a .bsq file.

    model: a Model, a preset name, or None for the default preset. target_size (bytes) or
    target_psnr (dB) instead picks a rung of the quality ladder (see encode_to_target).
    effort: 1 (fastest: the tokenizer's own tokens) to 9 (slowest, smallest files at equal quality).
    tune: the look the encoder's search aims at: "faithful" (squared error) or "sharp" (the sharp look's
    SSIMULACRA2; decode those files with look="sharp"); see tuned_look.
    """
    search.iterations(effort)  # a bad effort fails before any work
    if tune != "faithful" and (target_size is not None or target_psnr is not None):
        raise ValueError("a target picks among every rung; --tune sharp is for one-stage rungs: give a preset with it")
    icc = None
    if isinstance(image, Image.Image):
        container.check_pixels(*image.size, max_pixels)  # before converting its pixels
        icc = image.info.get("icc_profile")
        image, _ = images.to_rgb(image)
    arr = np.asarray(image, dtype=np.uint8)
    container.check_pixels(arr.shape[1], arr.shape[0], max_pixels)
    if target_size is not None or target_psnr is not None:
        if model is not None:
            raise ValueError("a target picks the model: give no model with it")
        return encode_to_target(arr, icc, target_size=target_size, target_psnr=target_psnr, progress=progress,
                                effort=effort)[0].data
    return encode_array(arr, model, icc, progress, effort, tune=tune).data


def _check_geometry(header: Header, model: weights.Model) -> None:
    t, p = model.config.tokenizer, model.config.prior
    got = (header.patch, header.bits, header.groups, header.tile_rows, header.tile_cols)
    want = (t.patch, t.bits, p.groups, p.tile_rows, p.tile_cols)
    if got != want:
        raise FormatError(f"the file's token geometry {got} does not match model {model.name!r} {want}")


def decode_streams(model: weights.Model, header: Header, streams: list[bytes], batch_tiles: int = DEFAULT_BATCH_TILES,
                   progress: Progress | None = None, workers: int = 1) -> torch.Tensor:
    """Streams -> token grid, running the integer prior token by token with a KV cache.

    A step of the prior is hundreds of small operations. Shared between threads, each of them
    waits for every thread to be scheduled, which on a busy machine made decoding up to 17x
    slower; so the prior runs single-threaded, and `workers` > 1 splits the tiles between that
    many processes (forked, on Linux). The tokens are the same for any split and any batching.
    """
    _check_geometry(header, model)
    gr, gc = header.grid
    slices = tile_slices(header)
    batch_tiles = max(1, min(MAX_BATCH_TILES, int(batch_tiles)))
    n_shares = max(1, min(int(workers), len(slices)))
    shares = [list(range(w, len(slices), n_shares)) for w in range(n_shares)]
    total = sum((rs.stop - rs.start) * (cs.stop - cs.start) for rs, cs in slices)
    done = 0

    def decode_share(idxs: list[int], report: bool) -> list[np.ndarray]:
        out: list[np.ndarray] = []
        for k in range(0, len(idxs), batch_tiles):
            part = idxs[k : k + batch_tiles]
            shapes = [(slices[i][0].stop - slices[i][0].start, slices[i][1].stop - slices[i][1].start) for i in part]
            decs = [_tile_decoder(streams[i], i, header.major >= 2) for i in part]

            def choose(b, t, j, earlier, table, decs=decs, part=part):
                try:
                    return decs[b].decode_row(table)
                except FormatError as e:
                    raise FormatError(f"tile {part[b]}: {e}") from None

            def on_step(t, n_active, decs=decs, part=part):
                nonlocal done
                if t % 16 == 15:  # a stream that is too short is caught within 16 steps, not at the end
                    for i, d in zip(part, decs):
                        _verified(d.check, i)
                if report:  # only the first share (this process) reports; the others keep pace
                    done += n_active
                    if progress and t % 16 == 15:
                        progress("decode", min(total, done * n_shares), total)

            sym = run_tiles(model.prior, shapes, choose, on_step)
            for b, (r, c) in enumerate(shapes):
                _verified(decs[b].finish, part[b])
                out.append(join_groups(sym[b, : r * c], header.bits).reshape(r, c).numpy())
        return out

    with single_threaded_kernels():
        results = workers_mod.run_shares(lambda sh: decode_share(sh, sh is shares[0]), shares)
    tokens = torch.zeros(gr, gc, dtype=torch.int64)
    for idxs, res in zip(shares, results):
        for i, tk in zip(idxs, res):
            tokens[slices[i]] = torch.from_numpy(tk)
    if progress:
        progress("decode", total, total)
    return tokens


def _tile_decoder(stream: bytes, tile: int, trimmed: bool) -> entropy.Decoder:
    return _verified(lambda: entropy.Decoder(stream, trimmed), tile)


def _verified(fn, tile: int):
    """fn(), with a FormatError from a tile's stream naming that tile."""
    try:
        return fn()
    except FormatError as e:
        raise FormatError(f"tile {tile}: {e}") from None


def decode_detailed(data: bytes, models: list | None = None, batch_tiles: int = DEFAULT_BATCH_TILES,
                    progress: Progress | None = None, workers: int = 1, max_pixels: int | None = None,
                    look: str = "faithful") -> tuple[Header, torch.Tensor, np.ndarray]:
    """(header, first-stage tokens, pixels) of a file; look: which decoder turns the tokens into pixels
    (LOOKS; another than "faithful" needs its look model, installed or among `models`)."""
    if look not in LOOKS:
        raise BsqError(f"unknown look {look!r}; choose from {', '.join(LOOKS)}")
    header, streams = container.unpack(data)
    container.check_pixels(header.width, header.height, max_pixels, "the file's image")  # before any work
    model = weights.find(header.model_hash, header.preset, models)
    makers = _pixel_makers(header, model, models, look)  # before the tokens: a missing model fails at once
    tokens = decode_streams(model, header, streams, batch_tiles, progress, workers)
    crc = header.chunk(container.TOKEN_CRC)
    if crc is not None and crc != container.token_crc(tokens.numpy()):
        raise FormatError("the decoded tokens do not match the file's token checksum (tCRC): a stream was altered")
    return header, tokens, _pixels(header, model, tokens, makers)


def _pixel_makers(header: Header, model: weights.Model, models: list | None, look: str):
    """What turns a file's tokens into pixels in `look`: (the first stage's decoder: the model or its look;
    None, or for a two-stage file (its second-stage model, that model or its look)). A two-stage file's look
    is its second stage's, on the first stage's faithful pixels (which that stage's decoder sees)."""
    if header.second is None:
        return (model if look == "faithful" else look_mod.find(model, look, models)), None
    from . import twostage

    smodel = twostage.find_model(header, model, models)
    return model, (smodel, smodel if look == "faithful" else look_mod.find(smodel, look, models))


def _pixels(header: Header, model: weights.Model, tokens: torch.Tensor, makers) -> np.ndarray:
    first, second = makers
    if second is None:
        return tokens_to_array(first, tokens, header.width, header.height)
    from . import twostage

    px = twostage.decode(header, tokens.numpy(), lambda: padded_pixels(model, tokens), *second)
    return px[: header.height, : header.width]


def pixels(header: Header, tokens: torch.Tensor, models: list | None = None, look: str = "faithful") -> np.ndarray:
    """A file's pixels in `look` from its header and first-stage tokens, as decode_detailed gives them (without
    running the prior again; a second stage's bits are decoded again from the header)."""
    model = weights.find(header.model_hash, header.preset, models)
    return _pixels(header, model, tokens, _pixel_makers(header, model, models, look))


def decode(data: bytes, models: list | None = None, batch_tiles: int = DEFAULT_BATCH_TILES,
           progress: Progress | None = None, workers: int = 1, max_pixels: int | None = None,
           look: str = "faithful") -> Image.Image:
    """The bytes of a .bsq file -> a PIL RGB image (with its ICC profile, if the file has one).

    workers > 1 decodes the tiles in that many forked processes (Linux; elsewhere in this one):
    faster on a multi-core machine, the same pixels. Files of more than max_pixels pixels
    (default container.DEFAULT_MAX_PIXELS) are refused before any decoding. look: "faithful" (the
    model's own decoder) or another look whose look model is installed or among `models`.
    """
    header, _, arr = decode_detailed(data, models, batch_tiles, progress, workers, max_pixels, look)
    return images.to_pil(arr, header.chunk(b"iCCP"))
