"""The `uniter` command: the top of the composition layer (it calls the runner and the flows)."""
