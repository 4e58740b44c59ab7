"""Validate, normalize and hash one downloaded image (runs in worker processes).

Every body is decoded — a file that does not decode is not an image, whatever its Content-Type —
oriented by EXIF, converted to 8-bit RGB, shrunk so its longer side is at most `max_side`, and
re-encoded as JPEG; a JPEG that needs none of that, at most `jpeg_quality`, is stored as it came,
less its metadata (corpus/images/jpegfile.py). sha256 is taken over the original bytes; pHash and
the colour thumbnail over the decoded image.

Shared by the crawl (the corpus images) and dedup (the evaluation images, hashed the same way).
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from corpus.images.colour import colour_thumbnail
from corpus.images.imagehash import phash_windows, reduced
from corpus.images.jpegfile import estimated_quality, stripped


class ImageSettings(Protocol):
    """The image fields of a config section (the `crawl` section has them)."""

    max_side: int
    jpeg_quality: int
    max_pixels: int


@dataclass(frozen=True)
class ImageOptions:
    max_side: int = 1000
    jpeg_quality: int = 90
    max_pixels: int = 89_478_485  # Pillow's default bomb threshold (~ 9459×9459)

    @classmethod
    def from_settings(cls, cfg: ImageSettings) -> ImageOptions:
        return cls(max_side=cfg.max_side, jpeg_quality=cfg.jpeg_quality, max_pixels=cfg.max_pixels)


@dataclass
class Processed:
    jpeg: bytes
    width: int
    height: int
    orig_width: int
    orig_height: int
    orig_format: str
    orig_bytes: int  # of the body as downloaded (the crawl drops the body once this is made)
    sha256: str
    phash: int
    phash_windows: list[int]
    thumb: bytes  # CIELAB 32×32: the colour check of pHash candidates (corpus/images/colour.py)
    as_downloaded: bool = False  # the stored JPEG is the downloaded one, metadata stripped


class ImageRejected(Exception):
    """The body is not a usable image; ``reason`` is the failure code recorded in `failures`."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def process_or_reject(data: bytes, opts: ImageOptions) -> Processed | tuple[str, str]:
    """Worker entry point. Returns the failure as a tuple: custom exceptions don't pickle back."""
    try:
        return process_image(data, opts)
    except ImageRejected as exc:
        return exc.reason, exc.detail


def process_image(data: bytes, opts: ImageOptions) -> Processed:
    sha = hashlib.sha256(data).hexdigest()
    image, (orig_w, orig_h), fmt = _decode(data, opts)
    stored = _as_downloaded(data, image, fmt, opts)
    as_downloaded = stored is not None
    if stored is None:
        try:
            ImageOps.exif_transpose(image, in_place=True)
        except Exception:  # noqa: BLE001 — a broken EXIF block must not lose an otherwise good image
            pass
        image = to_rgb(image)
        if max(image.size) > opts.max_side:
            size = target_size(image.size, opts.max_side)
            # NOTE: BOX is area averaging — alias-free for downscaling, and 3× faster than LANCZOS
            # here (measured: 9.5 vs 29 ms for 1600×1200 → 1000×750), which decides crawl throughput.
            image = image.resize(size, Image.Resampling.BOX)
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=opts.jpeg_quality)
        stored = out.getvalue()
    # Hashes and thumbnail need at most HASH_SIDE pixels: one integer box reduction serves both.
    # At max_side 1000 they took 4.2 ms from the full image, more than the JPEG encode; 2.2 so.
    small = reduced(image)
    full, windows = phash_windows(small)
    thumb = colour_thumbnail(small)
    return Processed(
        stored, image.width, image.height, orig_w, orig_h, fmt, len(data), sha, full, windows, thumb, as_downloaded
    )


def _as_downloaded(data: bytes, image: Image.Image, fmt: str, opts: ImageOptions) -> bytes | None:
    """The JPEG to store as it came (metadata stripped), or None to encode one. Only for a JPEG
    whose pixels need no change (RGB, upright, within max_side) and whose quality is at most the
    one asked: a store never holds a file of better quality than `jpeg_quality`.

    Its pixels are still decoded whole (the validation, and the hashes' input): decoding at a
    reduced scale for the hashes alone saved 0.17 ms an image more at max_side 1000, but moved a
    pHash by up to 4 bits (dedup's distance), and hashes must not depend on how a file is stored."""
    if fmt != "JPEG" or image.mode != "RGB" or max(image.size) > opts.max_side:
        return None
    try:
        if image.getexif().get(ExifTags.Base.Orientation, 1) != 1:
            return None
    except Exception:  # noqa: BLE001 — a broken EXIF block: encode, as exif_transpose would
        return None
    quality = estimated_quality(image)
    if quality is None or quality > opts.jpeg_quality:
        return None
    return stripped(data)


def target_size(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    """(width, height) scaled so that the long side is max_side."""
    scale = max_side / max(size)
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def _decode(data: bytes, opts: ImageOptions) -> tuple[Image.Image, tuple[int, int], str]:
    # NOTE: Pillow's limit is a module global; set it for this decode and put it back, so the rest
    # of the process (the downstream images, the report charts) keeps Pillow's default.
    previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, opts.max_pixels
    # NOTE: the details below are ours, never Pillow's message or the data: both can quote bytes of
    # a hostile file (PNG chunk names, a text "image" such as /etc/passwd), and failures are stored.
    fmt = "image"
    try:
        with warnings.catch_warnings():
            # Pillow only warns between 1× and 2× the limit; for untrusted input that is a bomb too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            size, fmt = image.size, image.format or "?"
            if fmt == "JPEG" and max(size) > opts.max_side:
                # Let libjpeg decode at a reduced scale (1/2…1/8): far less work for big photos. It
                # keeps both sides ≥ the size asked, so ask for the real target: a square of
                # max_side allowed a reduction only when the short side was ≥ 2 × max_side.
                image.draft("RGB", target_size(size, opts.max_side))
            image.load()
            return image, size, fmt
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageRejected("decompression_bomb", f"more pixels than max_pixels ({opts.max_pixels})") from None
    except UnidentifiedImageError:
        raise ImageRejected("not_an_image", _sniff(data)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # Pillow reports truncated or corrupt data as OSError ("image file is truncated", …).
        raise ImageRejected("corrupt_image", f"{fmt} data truncated or corrupt ({type(exc).__name__})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any mode: palette and alpha composited on white, CMYK converted, 16-bit and
    float images scaled down to 8 bits (not clipped)."""
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        image = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8))
        mode = "L"
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode != "RGB":
        image = image.convert("RGB")
    return image


def _sniff(data: bytes) -> str:
    """What the body looks like, in words of ours (never its bytes)."""
    head = data[:64].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html")):
        return "HTML document"
    if not data:
        return "empty body"
    try:
        data[:4096].decode("utf-8")
        return f"text, not an image ({len(data)} bytes)"
    except UnicodeDecodeError:
        return f"unrecognized binary format ({len(data)} bytes)"
