"""Start-up of the commands a user types most (issue 15): wall time and peak RSS of each whole
process, on a 10-row CC file and a local storage folder.

Goal: `uniter run ingest` (10 rows), `uniter status`, `uniter sql "select 1"` each ≤ 3 s wall
and ≤ 300 MB RSS on this machine. Each command runs `--repeat` times (the first also warms the
page cache); the median and the spread are printed.

    .venv/bin/python benchmarks/startup.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
UNITER = str(Path(sys.executable).parent / "uniter")
WALL_GOAL, RSS_GOAL_MB = 3.0, 300


def measure(args: list[str], cwd: Path) -> tuple[float, float, int]:
    """(wall seconds, peak RSS in MB, exit code) of one whole command, its own process only."""
    started = time.perf_counter()
    proc = subprocess.Popen([UNITER, *args], cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return time.perf_counter() - started, usage.ru_maxrss / 1024, proc.returncode  # ru_maxrss: KB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="uniter-startup-") as tmp:
        folder = Path(tmp)
        rows = "".join(f"a photo of thing {i}\thttp://example.org/{i}.jpg\n" for i in range(10))
        (folder / "cc.tsv").write_text(rows)
        (folder / "c.yaml").write_text(
            f"storage:\n  uri: {folder / 'data'}\ningest:\n  sources: [{{format: cc, path: cc.tsv}}]\n"
        )
        commands = {
            "uniter run ingest (10 rows, --force)": ["run", "ingest", "-c", "c.yaml", "-q", "--force"],
            "uniter status": ["status", "-c", "c.yaml", "--json"],
            'uniter sql "select 1"': ["sql", "-c", "c.yaml", "select 1"],
            "uniter --help": ["--help"],
        }
        print(f"| command | wall s, median (min–max) of {args.repeat} | peak RSS MB | goal |")
        print("|---|---:|---:|---|")
        for name, argv in commands.items():
            runs = [measure(argv, folder) for _ in range(args.repeat)]
            if any(code != 0 for _, _, code in runs):
                raise SystemExit(f"{name}: exited with {[code for _, _, code in runs]}")
            walls = [w for w, _, _ in runs]
            rss = max(r for _, r, _ in runs)
            wall = statistics.median(walls)
            ok = "met" if wall <= WALL_GOAL and rss <= RSS_GOAL_MB else "MISSED"
            print(
                f"| {name} | {wall:.2f} ({min(walls):.2f}–{max(walls):.2f}) | {rss:.0f} "
                f"| ≤ {WALL_GOAL:.0f} s, ≤ {RSS_GOAL_MB} MB: {ok} |"
            )


if __name__ == "__main__":
    main()
