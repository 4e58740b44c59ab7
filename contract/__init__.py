"""The contract every stage builds on: the stage and its context, artifacts and manifests, content
keys, the config base types, errors and progress. Imports no stage package (tests/test_layers.py)."""
