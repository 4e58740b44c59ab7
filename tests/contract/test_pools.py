"""Pool workers start without re-running the program's main script (contract/pools.py)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import os, sys
    sys.path.insert(0, {root!r})
    with open({log!r}, "a") as log:  # every run of this file, in any process, leaves its pid
        log.write(f"{{os.getpid()}}\\n")

    if __name__ == "__main__":
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        from contract.pools import process_pool

        if sys.argv[1] == "ours":
            pool = process_pool(2)
        else:
            pool = ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("forkserver"))
        with pool:
            pids = {{pool.submit(os.getpid).result() for _ in range(8)}}
        print(len(pids), os.getpid(), getattr(sys.modules["__main__"], "__file__", None))
    """
)


def _run(tmp_path: Path, kind: str) -> tuple[list[str], str]:
    log = tmp_path / f"{kind}.log"
    script = tmp_path / f"{kind}_main.py"
    script.write_text(SCRIPT.format(root=str(ROOT), log=str(log)))
    out = subprocess.run([sys.executable, str(script), kind], capture_output=True, text=True, check=True, timeout=120)
    return log.read_text().split(), out.stdout


def test_workers_do_not_rerun_the_main_script(tmp_path: Path) -> None:
    runs, out = _run(tmp_path, "ours")
    workers, parent, main_file = out.split()
    assert int(workers) >= 1
    assert runs == [parent], "a pool worker ran the main script again"
    assert main_file.endswith("ours_main.py"), "the main module's __file__ is put back"


def test_a_plain_forkserver_pool_does_rerun_it(tmp_path: Path) -> None:
    # The control: what process_pool avoids happens without it (so the test above can fail).
    runs, out = _run(tmp_path, "plain")
    assert len(runs) > 1 and out.split()[1] in runs


PRELOAD_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.path[:0] = [{root!r}, {here!r}]

    if __name__ == "__main__":
        from contract.pools import process_pool
        from probe import loaded

        preload = ("colorsys",) if sys.argv[1] == "preload" else ()
        with process_pool(2, preload=preload) as pool:
            print(all(pool.submit(loaded, "colorsys").result() for _ in range(4)))
    """
)


def test_preloaded_modules_are_imported_before_the_first_task(tmp_path: Path) -> None:
    """The fork server imports them once; each worker starts with them (crawl's image code)."""
    (tmp_path / "probe.py").write_text("import sys\n\n\ndef loaded(name):\n    return name in sys.modules\n")
    script = tmp_path / "preload_main.py"
    script.write_text(PRELOAD_SCRIPT.format(root=str(ROOT), here=str(tmp_path)))

    def run(kind: str) -> str:
        return subprocess.run(
            [sys.executable, str(script), kind], capture_output=True, text=True, check=True, timeout=120
        ).stdout.strip()

    assert run("preload") == "True"
    assert run("plain") == "False"  # the control: nothing in a worker imports colorsys by itself
