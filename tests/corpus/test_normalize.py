"""The row-by-row (JSON formats) and vectorized (line formats) normalizers follow the same rules,
and parallel ingest produces exactly the bytes of in-process ingest."""

from __future__ import annotations

import random

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from corpus.annotations.records import flickr_id_from_url
from corpus.ingest.formats import (
    CONTROL_CHAR,
    CREDENTIALS_PATTERN,
    MAX_URL_CHARS,
    URL_PATTERN,
    caption_problem,
    clean_caption,
    clean_captions,
    url_key,
    url_keys,
    url_problem,
)
from tests.conftest import run_ingest

TRICKY_CAPTIONS = [
    "plain caption",
    " leading",
    "trailing ",
    "a  b",
    "tab\there",
    "new\nline",
    "cr\r\nlf",
    "nbsp\xa0here",
    "ideographic\u3000space",
    "thin\u2009space",
    "zero\u200bwidth",
    "line\u2028sep",
    "\x1cfile sep",
    "",
    "   ",
    "\t\n",
    "émoji 🐈 ok",
    "mixed \t\xa0\u3000 runs  ",
]


def test_caption_cleaning_agrees():
    vector = clean_captions(pa.array(TRICKY_CAPTIONS)).to_pylist()
    scalar = [clean_caption(c) or "" for c in TRICKY_CAPTIONS]
    assert vector == scalar


def test_caption_cleaning_agrees_on_random_text():
    rng = random.Random(7)
    alphabet = "ab \t\n\r\x0b\x0c\x1c\x1f\x85\xa0\u1680\u2000\u200a\u200b\u2028\u202f\u205f\u3000é"
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12))) for _ in range(3000)]
    assert clean_captions(pa.array(texts)).to_pylist() == [clean_caption(t) or "" for t in texts]


def test_control_character_rule_agrees():
    """Every code point below U+00A0 and a few above, through Python's re and Arrow's RE2."""
    texts = [f"a{chr(c)}b" for c in [*range(0xA0), 0x2028, 0xFEFF, 0x1F408]]
    scalar = [caption_problem(t, 1000) == "control_characters" for t in texts]
    assert pc.match_substring_regex(pa.array(texts), CONTROL_CHAR).to_pylist() == scalar
    assert sum(scalar) == 9 + 14 + 1 + 31  # C0 but whitespace, DEL, C1 but NEL


@pytest.mark.parametrize(
    "url, ok",
    [
        ("http://example.org/a.jpg", True),
        ("https://a.b/c?d=e#f", True),
        ("http://host", True),
        ("http://h/with space.jpg", False),
        ("http:///nohost.jpg", False),
        ("ftp://x.org/a", False),
        ("http://h/ctrl\x7f", False),
        ("http://h/tab\t", False),
        ("javascript:alert(1)", False),
        ("//example.org/a.jpg", False),
        ("http://h/" + "a" * MAX_URL_CHARS, False),
        ("http://user:pw@h/a.jpg", False),
        ("https://token@h/a.jpg", False),
        ("http://h/a@2x.jpg?by=me@x", True),
    ],
)
def test_url_rule_agrees(url, ok):
    assert (url_problem(url) is None) == ok
    arr = pa.array([url])
    vector_ok = pc.and_(
        pc.and_(pc.match_substring_regex(arr, f"^{URL_PATTERN}$"), pc.less_equal(pc.utf8_length(arr), MAX_URL_CHARS)),
        pc.invert(pc.match_substring_regex(arr, CREDENTIALS_PATTERN)),
    )
    assert vector_ok.to_pylist() == [ok]


def test_url_keys_agree_and_flickr_ids():
    urls = ["http://a.org/1.jpg", "https://farm4.staticflickr.com/3153/2970773875_164f0c0b83_z.jpg", "http://ü.org/é"]
    assert url_keys(pa.array(urls)).to_pylist() == [url_key(u) for u in urls]
    assert url_key(urls[0]) == url_key(urls[0]) != url_key(urls[2])
    assert flickr_id_from_url(urls[1]) == 2970773875
    assert flickr_id_from_url("http://static.flickr.com/2723/4385058960_b0f291553e.jpg") == 4385058960
    assert flickr_id_from_url("http://example.org/4385058960_b0f291553e.jpg") is None
    assert flickr_id_from_url(None) is None


def test_parallel_ingest_equals_in_process(tmp_path):
    rng = random.Random(3)
    with open(tmp_path / "cc.tsv", "w") as f:
        for i in range(30_000):
            url = f"http://img{i % 7}.example.org/{rng.randrange(10**6)}.jpg" if i % 97 else "not a url"
            f.write(f"caption  number {i}\t{url}\n")
    src = {"format": "cc", "path": str(tmp_path / "cc.tsv")}
    one = run_ingest(tmp_path / "one", src, storage={"uri": str(tmp_path / "d1")}, shard_rows=4000, workers=1)[2]
    two = run_ingest(tmp_path / "two", src, storage={"uri": str(tmp_path / "d2")}, shard_rows=4000, workers=2)[2]
    assert one.manifest.key == two.manifest.key  # workers is not part of the key
    assert one.manifest.content_sha256 == two.manifest.content_sha256
    assert one.manifest.counts["pairs"] == 30_000 - 310 and one.manifest.counts["rejects"] == 310
