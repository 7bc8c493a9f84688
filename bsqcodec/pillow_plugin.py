"""Pillow plugin: `import bsqcodec` lets every Pillow program read and write .bsq files.

    Image.open("photo.bsq")                       # header read now, pixels decoded on load()
    im.set_look("sharp")                          # before load(): decode with an installed look model
    im.save("photo.bsq", quality=3)               # quality 1..9 = the rung (-q), or preset= / model=
    im.save("photo.bsq", effort=9)                # encoder search 1..9, as `bsqc encode --effort`
    im.save("photo.bsq", tune="sharp")            # the search aims at the sharp look, as `bsqc encode --tune`

Opening reads the header (size, preset, model; checksums verified) and exposes its fields in
`im.info` (with the ICC profile as `icc_profile`); the prior runs only when the pixels are needed.
"""

from __future__ import annotations

from PIL import Image, ImageFile

from .format import container
from .config import DEFAULT_EFFORT, LOOKS, RUNG_NAMES

FORMAT = "BSQ"


def _accept(prefix: bytes) -> bool:
    return prefix[:4] == container.MAGIC


class BsqImageFile(ImageFile.ImageFile):
    format = FORMAT
    format_description = "bsqcodec learned image"

    def _open(self) -> None:
        data = self.fp.read()
        header, _ = container.unpack(data)
        self._size = (header.width, header.height)
        self._mode = "RGB"
        self.info.update({"bsq_version": f"{header.major}.{header.minor}", "bsq_preset": header.preset,
                          "bsq_model": header.model_hash.hex(), "bsq_token_bits": header.bits,
                          "bsq_tiles": header.tiles})
        icc = header.chunk(b"iCCP")
        if icc:
            self.info["icc_profile"] = icc
        self.tile = [ImageFile._Tile("bsq", (0, 0) + self._size, 0, "faithful")]

    def set_look(self, look: str) -> None:
        """Decode with this look (`bsqc decode --look`): "faithful", the model's own decoder, or another
        look whose look model is installed. Call it before the pixels are loaded."""
        if look not in LOOKS:
            raise ValueError(f"unknown look {look!r}; choose from {', '.join(LOOKS)}")
        if not self.tile:
            raise ValueError("the pixels are already loaded; set the look before load()")
        self.tile = [t._replace(args=look) for t in self.tile]


class _BsqDecoder(ImageFile.PyDecoder):
    _pulls_fd = True

    def decode(self, buffer):
        from .codec import codec

        self.fd.seek(0)
        _, _, arr = codec.decode_detailed(self.fd.read(), look=self.args[0] if self.args else "faithful")
        self.set_as_raw(arr.tobytes())
        return -1, 0


def _save(im: Image.Image, fp, filename) -> None:
    info = im.encoderinfo
    quality, preset, model = info.get("quality"), info.get("preset"), info.get("model")
    if sum(x is not None for x in (quality, preset, model)) > 1:
        raise ValueError("give at most one of quality, preset and model")
    if quality is not None:
        from .model.weights import installed

        rungs = [q for q, name in enumerate(RUNG_NAMES, 1) if name in installed()]
        if int(quality) not in rungs:
            raise ValueError(f"quality must be one of the installed rungs {', '.join(map(str, rungs))}, not {quality}")
        preset = RUNG_NAMES[int(quality) - 1]
    icc = info.get("icc_profile", im.info.get("icc_profile"))
    if icc:
        im = im.copy()
        im.info["icc_profile"] = icc
    from .codec import codec

    fp.write(codec.encode(im, model or preset, target_size=info.get("target_size"),
                          target_psnr=info.get("target_psnr"), effort=info.get("effort", DEFAULT_EFFORT),
                          tune=info.get("tune", "faithful")))


def register() -> None:
    Image.register_open(FORMAT, BsqImageFile, _accept)
    Image.register_save(FORMAT, _save)
    Image.register_extension(FORMAT, ".bsq")
    Image.register_mime(FORMAT, "image/x-bsq")
    Image.register_decoder("bsq", _BsqDecoder)
