"""One runner per stage and key: a lease object on the storage, with an expiry.

Two runs of the same stage for the same key would both do all the work (each shard is written
twice, identically). The first takes the lease; the second waits for it, or stops saying who holds
it. A holder renews its lease while it works, so a killed holder's lease lapses after `ttl` seconds
and the next run takes over and resumes from the finished shards.

Leases are numbered files, ``leases/<stage>/<key>/<scope>/<generation>.json``. The holder is the
writer of the highest generation that is neither released nor expired. To take a lease, write
generation n + 1 with a create-if-absent (`Storage.create`: a link on local disk, a conditional
PUT with ``If-None-Match: *`` on S3), so among racing runners exactly one wins, with no
read-then-write window. A holder that ran on this host and whose process is gone (SIGKILL) is not
waited for. Expiry compares the writer's clock with the reader's: hosts need clocks
within a fraction of `ttl`.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field

from contract.errors import UniterError
from storage import Storage, StorageError

log = logging.getLogger(__name__)

LEASES = "leases"


def alive(body: dict) -> bool:
    """False only when the holder ran on this host and its process is gone (a SIGKILLed run):
    then there is no need to wait for the expiry. Holders on other hosts count as alive."""
    host, _, pid = str(body.get("holder", "")).rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


class LeaseHeld(UniterError):
    """Another run holds the lease of this stage and key."""


@dataclass
class Lease:
    storage: Storage
    stage: str
    key: str
    scope: str = "stage"  # a whole-stage run, or one fanned-out group of shards
    ttl: float = 120.0
    generation: int | None = None
    lost: bool = False  # set when another runner took the lease over (we were paused past the expiry)
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _beat: threading.Thread | None = field(default=None, repr=False)

    @property
    def prefix(self) -> str:
        return f"{LEASES}/{self.stage}/{self.key}/{self.scope}"

    def _file(self, generation: int) -> str:
        return f"{self.prefix}/{generation:08d}.json"

    def _body(self, released: bool = False) -> bytes:
        return json.dumps(
            {
                "holder": f"{socket.gethostname()}:{os.getpid()}",
                "expires": time.time() + self.ttl,
                "released": released,
            }
        ).encode()

    def _top(self) -> tuple[int, dict | None]:
        """The highest generation and its body (None: there is none, or it is unreadable)."""
        gens = [k for k in self.storage.list(self.prefix) if k.endswith(".json")]
        if not gens:
            return -1, None
        top = gens[-1]  # zero-padded names sort by generation
        try:
            return int(top.rsplit("/", 1)[1][:-5]), json.loads(self.storage.read_bytes(top))
        except (ValueError, StorageError):
            return int(top.rsplit("/", 1)[1][:-5]), None  # half-gone or foreign: treat as free

    def acquire(self, wait: bool, poll: float = 1.0, on_wait=None) -> None:
        """Take the lease, waiting while a live holder has it (``wait``) or raising `LeaseHeld`."""
        told = False
        while True:
            gen, body = self._top()
            if body is not None and not body.get("released") and body.get("expires", 0) > time.time() and alive(body):
                holder = body.get("holder", "?")
                left = body["expires"] - time.time()
                message = (
                    f"another run ({holder}) is building {self.stage} for this key ({self.key[:12]}…); "
                    f"its lease ({self.storage.url(self._file(gen))}) is renewed while it works and lapses "
                    f"{left:.0f} s after it stops. Run again with --wait to wait for it and reuse its work."
                )
                if not wait:
                    raise LeaseHeld(message)
                if not told:
                    log.info("%s: waiting: %s", self.stage, message.split(". Run again")[0])
                    if on_wait is not None:
                        on_wait(holder)
                    told = True
                time.sleep(poll)
                continue
            if self.storage.create(self._file(gen + 1), self._body()):
                self.generation = gen + 1
                break
            # Another runner took generation gen + 1 between our listing and our write: look again.
        self._stop.clear()
        self._beat = threading.Thread(target=self._renew, name=f"lease-{self.stage}", daemon=True)
        self._beat.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                gen, _ = self._top()
                if gen != self.generation:
                    if not self.lost:
                        log.warning("%s: lease taken over by another run (we were stalled past its expiry)", self.stage)
                    self.lost = True
                    return
                self.storage.put(self._file(self.generation), self._body())
            except StorageError as exc:  # the storage hiccupped: try again at the next beat
                log.warning("%s: could not renew the lease: %s", self.stage, exc)

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        if self.generation is not None and not self.lost:
            try:
                self.storage.put(self._file(self.generation), self._body(released=True))
            except StorageError as exc:
                # NOTE: not raised: it would hide the error that ended the run (often the same outage),
                # and an unreleased lease only makes the next run wait until it lapses (not at all on
                # this host once this process is gone).
                log.warning("%s: could not release the lease (it lapses within %.0f s): %s", self.stage, self.ttl, exc)
        self.generation = None
