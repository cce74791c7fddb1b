"""calotune.cli.exit_now: a command's process ends without the interpreter's module
teardown, but with everything the interpreter's exit would still have done before it."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

CHILD = textwrap.dedent("""
    import atexit, logging, sys, threading, time
    from pathlib import Path
    from calotune.cli import exit_now

    out = Path(sys.argv[1])
    logging.basicConfig(filename=out / "log.txt", level=logging.INFO)
    logging.getLogger("child").info("logged before exit")
    atexit.register(lambda: (out / "atexit.txt").write_text("ran"))
    started = threading.Event()

    def late_writer():  # a non-daemon thread: the interpreter would wait for it
        started.set()
        time.sleep(0.2)
        (out / "thread.txt").write_text("joined")

    threading.Thread(target=late_writer).start()
    started.wait()
    sys.stdout.write("no newline, still buffered")
    exit_now(3)
    (out / "after.txt").write_text("exit_now returned")
""")


def test_exit_now_joins_threads_runs_atexit_flushes_and_keeps_the_code(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == "no newline, still buffered"
    assert (tmp_path / "thread.txt").read_text() == "joined"
    assert (tmp_path / "atexit.txt").read_text() == "ran"
    assert "logged before exit" in (tmp_path / "log.txt").read_text()
    assert not (tmp_path / "after.txt").exists()

