"""Reading annotation files: shared by the ingest and dedup stages (not a stage)."""
