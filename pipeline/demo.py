"""The demo's stand-in for the web: the sample's CC/SBU images served on 127.0.0.1 while it runs."""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from contract.errors import UniterError

SAMPLE_WEB = Path(__file__).resolve().parent.parent / "sample" / "images" / "web"
SAMPLE_PORT = 18765  # the port in sample/cc and sample/sbu URLs


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@contextlib.contextmanager
def serve_sample(directory: Path = SAMPLE_WEB, port: int = SAMPLE_PORT) -> Iterator[str]:
    try:
        server = ThreadingHTTPServer(("127.0.0.1", port), functools.partial(_Quiet, directory=str(directory)))
    except OSError as exc:
        raise UniterError(
            f"the demo serves its sample images on 127.0.0.1:{port}, which is taken ({exc.strerror}); "
            "stop whatever listens there and run the demo again"
        ) from None
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.shutdown()
        server.server_close()
