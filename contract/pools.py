"""Process pools whose workers start without re-running the program.

A forkserver (or spawn) child runs the parent's main script again, so that functions defined in it
can be unpickled there. For `uniter` that script imports the whole CLI: a pool of 2 workers under
it gave its first results after 0.74 s, each worker having spent 0.6 s of CPU, against 0.41 s and
0.25 s with the main module hidden (measured). CPython 3.11's forkserver means to import the main
module once, in the server, but passes its path under a key the server never reads, so every
child pays.

The functions our pools run live in modules, never in a main script, so their workers start with
the main module hidden.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager


def process_pool(workers: int, preload: tuple[str, ...] = ()) -> ProcessPoolExecutor:
    """A forkserver pool of ``workers`` processes, started now, without the main module.
    ``preload``: modules the fork server imports once, before forking the workers (if this process's
    fork server is not running yet), instead of every worker importing them on its first task."""
    # NOTE: forkserver, not fork: the parent holds threads (the event loop's, boto3, DuckDB) that
    # fork would copy mid-operation.
    context = multiprocessing.get_context("forkserver")
    if preload:
        context.set_forkserver_preload(list(preload))
    pool = ProcessPoolExecutor(workers, mp_context=context)
    with main_module_hidden():
        # A submit starts a process while none is idle; these return long after the last submit
        # (a child takes tens of ms to start), so each of them starts one.
        for _ in range(workers):
            pool.submit(os.getpid)
    return pool


@contextmanager
def main_module_hidden() -> Iterator[None]:
    """Processes started in this block do not import the parent's main script or module (what
    multiprocessing reads to decide that: ``__main__.__file__`` and ``__main__.__spec__``)."""
    main = sys.modules.get("__main__")
    saved = {name: main.__dict__[name] for name in ("__file__", "__spec__") if main and name in main.__dict__}
    for name in saved:
        if name == "__file__":
            del main.__dict__[name]
        else:
            main.__dict__[name] = None
    try:
        yield
    finally:
        for name, value in saved.items():
            main.__dict__[name] = value
