"""Storing a downloaded JPEG as it came, when it needs no change: its quality estimated from its
quantization table, its metadata stripped at the byte level.

A JPEG within `max_side`, upright and RGB needs no new pixels. Decoding and encoding it again
cost its encode (≈ 1 ms at 1000 px, a third of such an image's CPU) and a second generation of
loss, and re-encoding a q75 web image at q90 stores it larger and no better. So the crawl keeps it
when its quality is at most `jpeg_quality`: the stored bytes are the downloaded ones without the
segments that carry no pixels (EXIF with GPS positions and camera serials, XMP, IPTC, ICC profiles
— which re-encoded images lose too — and comments) and without anything after the end of the
image (data appended to a JPEG: a ZIP, another file). The decoder sees the same scans, so the
pixels are the ones the crawl validated and hashed.

This parses bytes from anywhere, so it never raises on them: anything it does not recognise
returns None, and the image is re-encoded instead.
"""

from __future__ import annotations

import io
import re
from functools import cache

import numpy as np
from PIL import Image

# Segments kept before the first scan: JFIF (APP0) and Adobe (APP14, whose transform flag says how
# to read the colour channels), and every segment that is not an APP or COM (tables, frame, restart
# interval). Every other APPn and COM is metadata.
_KEPT_APPS = {0xE0, 0xEE}
_METADATA = set(range(0xE0, 0xF0)) | {0xFE}
_SOS, _EOI = 0xDA, 0xD9
# In entropy-coded data 0xFF is followed by 0x00 (a stuffed byte), a restart marker (D0-D7) or
# fill bytes (FF); anything else is a marker that ends the scan.
_MARKER_IN_SCAN = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")


def stripped(data: bytes) -> bytes | None:
    """``data`` without metadata segments and without what follows the end of image, or None when
    its structure is not the plain one this walks (then it is re-encoded)."""
    if not data.startswith(b"\xff\xd8"):
        return None
    out, i, n, scanning = [b"\xff\xd8"], 2, len(data), False
    while i < n:
        if scanning:
            # Entropy-coded data runs to the next marker; copy it whole.
            match = _MARKER_IN_SCAN.search(data, i)
            if match is None:
                return None  # no end of image
            out.append(data[i : match.start()])
            i = match.start()
        while data.startswith(b"\xff\xff", i):
            i += 1  # fill bytes before a marker
        if i + 2 > n or data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == _EOI:
            out.append(b"\xff\xd9")
            return b"".join(out)
        if 0xD0 <= marker <= 0xD7 or marker in (0x00, 0x01, 0xD8):
            return None  # a standalone marker where a segment belongs
        if i + 4 > n:
            return None
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        end = i + 2 + length
        if length < 2 or end > n:
            return None
        if marker not in _METADATA or marker in _KEPT_APPS:
            out.append(data[i:end])
        scanning = scanning or marker == _SOS
        # After a scan header its entropy-coded data follows; a progressive file has several
        # scans, with tables between them: each marker found in scan data is walked like this one.
        i = end
    return None


def estimated_quality(image: Image.Image) -> int | None:
    """The libjpeg quality (1-100) whose luminance table is nearest this JPEG's, or None."""
    tables = getattr(image, "quantization", None)
    if not tables or 0 not in tables or len(tables[0]) != 64:
        return None
    distance = np.abs(_standard_tables() - np.asarray(tables[0], dtype=np.int32)).sum(axis=1)
    return int(np.argmin(distance)) + 1


@cache
def _standard_tables() -> np.ndarray:
    """libjpeg's luminance table at quality 1…100 (row q - 1), as Pillow reports a file's tables
    (encoding a tiny image gives them in the same order and scaling as a downloaded file's)."""
    tiny, tables = Image.new("L", (8, 8)), []
    for quality in range(1, 101):
        buf = io.BytesIO()
        tiny.save(buf, format="JPEG", quality=quality)
        with Image.open(buf) as im:
            tables.append(list(im.quantization[0]))  # type: ignore[attr-defined]
    return np.asarray(tables, dtype=np.int32)
