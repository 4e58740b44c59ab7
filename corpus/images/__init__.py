"""Fetching, decoding and hashing images: shared by the crawl and dedup stages (not a stage)."""
