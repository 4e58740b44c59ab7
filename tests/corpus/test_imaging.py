"""Decode, orient, convert, resize and hash: every awkward image file ends as 8-bit RGB JPEG; a JPEG
needing no change is stored as downloaded, less its metadata."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
from PIL import Image

from corpus.images.imagehash import hamming, phash
from corpus.images.imaging import ImageOptions, ImageRejected, process_image
from corpus.images.jpegfile import estimated_quality, stripped
from tests.fixtures import images as fx

PHOTO = fx.synthetic_photo(1, (320, 240))


def _decoded(jpeg: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(jpeg))
    assert im.format == "JPEG" and im.mode == "RGB"
    return im


@pytest.mark.parametrize(
    "name, data",
    [
        ("jpeg", fx.jpeg(PHOTO)),
        ("cmyk", fx.cmyk_jpeg(PHOTO)),
        ("palette", fx.palette_png(PHOTO)),
        ("alpha", fx.alpha_png(PHOTO)),
        ("png16", fx.png16(PHOTO)),
    ],
)
def test_every_mode_becomes_rgb_jpeg(name, data):
    out = process_image(data, ImageOptions())
    im = _decoded(out.jpeg)
    assert (out.width, out.height) == im.size == (320, 240)
    assert out.sha256 == hashlib.sha256(data).hexdigest()
    if name != "alpha":  # (the alpha fixture masks the corners out: a different picture)
        assert hamming(out.phash, phash(PHOTO)) <= 12, name  # still the same picture


def test_alpha_is_composited_on_white():
    out = _decoded(process_image(fx.alpha_png(PHOTO), ImageOptions()).jpeg)
    corner = np.asarray(out)[:4, :4].mean()
    assert corner > 240  # transparent corner → white, not black


def test_png16_is_scaled_not_clipped():
    out = np.asarray(_decoded(process_image(fx.png16(PHOTO), ImageOptions()).jpeg).convert("L"), dtype=float)
    ref = np.asarray(PHOTO.convert("L"), dtype=float)
    assert abs(out.mean() - ref.mean()) < 3


def test_exif_orientation_is_applied():
    out = process_image(fx.exif_rotated_jpeg(PHOTO), ImageOptions())
    assert (out.width, out.height) == (320, 240)  # stored 240×320, shown 320×240
    assert (out.orig_width, out.orig_height) == (240, 320)
    assert hamming(out.phash, phash(PHOTO)) <= 6


def test_resize_keeps_aspect_and_never_upscales():
    big = fx.jpeg(fx.synthetic_photo(2, (1600, 900)))
    out = process_image(big, ImageOptions(max_side=400))
    assert (out.width, out.height) == (400, 225) and (out.orig_width, out.orig_height) == (1600, 900)
    small = process_image(fx.jpeg(fx.synthetic_photo(3, (120, 80))), ImageOptions(max_side=400))
    assert (small.width, small.height) == (120, 80)


@pytest.mark.parametrize("progressive", [False, True])
def test_a_jpeg_needing_no_change_is_stored_as_downloaded_less_its_metadata(progressive):
    data = fx.tagged_jpeg(PHOTO, 75, progressive=progressive)
    out = process_image(data, ImageOptions(jpeg_quality=90))
    assert out.as_downloaded
    # the pixels are the downloaded file's, not a second generation of JPEG loss
    assert np.array_equal(np.asarray(_decoded(out.jpeg)), np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    for secret in (b"SecretCam", b"Jane Q. Owner", b"gps here", b"not-a-real-icc-profile", b"a private comment"):
        assert secret in data and secret not in out.jpeg, secret
    assert len(out.jpeg) < len(data) and out.jpeg.endswith(b"\xff\xd9")
    assert out.sha256 == hashlib.sha256(data).hexdigest()  # of what was downloaded
    # the hashes do not depend on how the file is stored: a re-encoded copy gets the same ones
    encoded = process_image(data, ImageOptions(jpeg_quality=70))
    assert not encoded.as_downloaded and len(encoded.jpeg) != len(out.jpeg)
    assert (encoded.phash, encoded.phash_windows, encoded.thumb) == (out.phash, out.phash_windows, out.thumb)


@pytest.mark.parametrize(
    "why, data, opts",
    [
        ("better than asked", fx.jpeg(PHOTO, 95), ImageOptions(jpeg_quality=90)),
        ("larger than max_side", fx.jpeg(PHOTO, 75), ImageOptions(max_side=200)),
        ("rotated by EXIF", fx.exif_rotated_jpeg(PHOTO), ImageOptions()),
        ("CMYK", fx.cmyk_jpeg(PHOTO), ImageOptions()),
        ("grayscale", fx.jpeg(PHOTO.convert("L"), 75), ImageOptions()),
        ("not a JPEG", fx.png(PHOTO), ImageOptions()),
    ],
)
def test_images_needing_new_pixels_or_better_than_asked_are_encoded(why, data, opts):
    out = process_image(data, opts)
    assert not out.as_downloaded, why
    assert b"SecretCam" not in out.jpeg and _decoded(out.jpeg).size == (out.width, out.height)


def test_quality_is_read_from_the_quantization_table():
    for quality in (30, 75, 90, 95):
        assert estimated_quality(Image.open(io.BytesIO(fx.jpeg(PHOTO, quality)))) == quality
    assert estimated_quality(Image.open(io.BytesIO(fx.png(PHOTO)))) is None


def test_what_follows_the_end_of_image_is_not_stored():
    data = fx.jpeg(PHOTO, 75) + b"PK\x03\x04" + b"an appended archive" * 50 + b"\xff\xd9"
    out = process_image(data, ImageOptions())
    assert out.as_downloaded and b"appended archive" not in out.jpeg
    assert np.array_equal(np.asarray(_decoded(out.jpeg)), np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))


def test_stripping_never_raises_on_damaged_bytes():
    """Every cut and many corruptions of a JPEG: bytes that start and end a JPEG, or None (then the
    image is re-encoded); never an exception, never a read past the end."""
    data = fx.tagged_jpeg(PHOTO, 75, progressive=True)
    rng = np.random.default_rng(0)
    results = [stripped(data[:cut]) for cut in range(0, len(data), 7)]
    for _ in range(300):
        bad = bytearray(data)
        for at in rng.integers(0, len(bad), 3):
            bad[at] = int(rng.integers(0, 256))
        results.append(stripped(bytes(bad)))
    results += [stripped(b"\xff\xd8\xff\xe1\xff\xff" + b"x" * 10), stripped(b"\xff\xd8\xff"), stripped(b"\xff\xd8")]
    for r in results:
        assert r is None or (r.startswith(b"\xff\xd8") and r.endswith(b"\xff\xd9"))
    assert results[-3:] == [None, None, None]
    assert stripped(data) is not None and any(r is None for r in results) and any(r is not None for r in results)


@pytest.mark.parametrize(
    "data, reason",
    [
        (fx.decompression_bomb_png(), "decompression_bomb"),
        (fx.truncated_jpeg(PHOTO), "corrupt_image"),
        (b"<!DOCTYPE html><html><body>nope</body></html>", "not_an_image"),
        (b"", "not_an_image"),
    ],
)
def test_bad_bodies_are_rejected_with_a_reason(data, reason):
    with pytest.raises(ImageRejected) as exc:
        process_image(data, ImageOptions())
    assert exc.value.reason == reason


def test_bomb_limit_is_configurable():
    data = fx.jpeg(fx.synthetic_photo(4, (300, 300)))
    with pytest.raises(ImageRejected, match="decompression_bomb"):
        process_image(data, ImageOptions(max_pixels=40_000))
    assert process_image(data, ImageOptions(max_pixels=90_000)).width == 300


def test_colour_check_tells_flat_shapes_apart_and_keeps_copies():
    """The second look at a pHash candidate: copies (re-encoded, resized, cropped, brighter) stay
    close; the same shape in another colour, size or place does not; aspect ratios are compared."""
    from corpus.dedup.config import DedupConfig
    from corpus.images.colour import aspect_ratio_close, colour_distances, colour_thumbnail, fine_differences

    limit = DedupConfig().colour_max_distance
    shape = fx.flat_shape("rectangle", "yellow", "medium", (1, 1), 0, side=96)
    others = [
        fx.flat_shape("rectangle", "teal", "medium", (1, 1), 0, side=96),  # colour
        fx.flat_shape("rectangle", "yellow", "large", (1, 1), 0, side=96),  # size
        fx.flat_shape("rectangle", "yellow", "medium", (0, 1), 0, side=96),  # place
    ]
    copies = [
        fx.recompressed(shape, 40),
        fx.resized(shape, 0.5),
        fx.cropped(shape, 0.05),
        fx.brightened(shape, 1.1),
        fx.recompressed(PHOTO, 40),
        fx.cropped(PHOTO, 0.05),
        fx.brightened(PHOTO, 0.9),
    ]
    originals = [shape] * 4 + [PHOTO] * 3
    same = colour_distances([colour_thumbnail(a) for a in originals], [colour_thumbnail(b) for b in copies])
    assert (same <= limit).all(), same
    apart = colour_distances([colour_thumbnail(shape)] * 3, [colour_thumbnail(b) for b in others])
    assert (apart > limit).all(), apart
    assert len(colour_thumbnail(PHOTO)) == 64 * 64 * 3
    assert aspect_ratio_close(320, 240, 304, 240) and not aspect_ratio_close(320, 240, 240, 240)
    fine = fine_differences([colour_thumbnail(a) for a in originals], [colour_thumbnail(b) for b in copies])
    assert (fine == 0).all(), fine


def test_the_fine_check_sees_what_the_coarse_grid_cannot():
    """A grey triangle 8 or 13 pixels wide in a 64-pixel picture (stored as JPEG): the coarse grid,
    which must forgive JPEG and a crop along edges, passes them; the pixels do not. Copies of the
    smaller one still pass both."""
    from corpus.dedup.config import DedupConfig
    from corpus.images.colour import colour_distances, colour_thumbnail, fine_differences

    def stored(image):
        return Image.open(io.BytesIO(fx.jpeg(image))).convert("RGB")

    small = stored(fx.flat_shape("triangle", "grey", "small", (2, 2), 2))
    medium = stored(fx.flat_shape("triangle", "grey", "medium", (2, 2), 2))
    ts, tm = colour_thumbnail(small), colour_thumbnail(medium)
    assert colour_distances([ts], [tm])[0] <= DedupConfig().colour_max_distance
    assert fine_differences([ts], [tm])[0] > 0 and fine_differences([tm], [ts])[0] > 0
    copies = [stored(c) for c in (fx.recompressed(small, 40), fx.resized(small, 2.0), fx.cropped(small, 0.05),
                                  fx.brightened(small, 1.1), fx.brightened(small, 0.9))]  # fmt: skip
    assert (fine_differences([ts] * len(copies), [colour_thumbnail(c) for c in copies]) == 0).all()
