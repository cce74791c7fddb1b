"""calotune.cli.exit_now: a command's process ends without the interpreter's module
teardown, but with everything the interpreter's exit would still have done before it."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

CHILD = textwrap.dedent("""
    import atexit, logging, sys, threading
    from pathlib import Path
    from calotune.cli import exit_now

    out = Path(sys.argv[1])
    logging.basicConfig(filename=out / "log.txt", level=logging.INFO)
    logging.getLogger("child").info("logged before exit")
    atexit.register(lambda: (out / "atexit.txt").write_text("ran"))

    def late_writer():  # a non-daemon thread: the interpreter would wait for it
        sys.stdin.readline()  # the test answers only once exit_now has been called
        (out / "thread.txt").write_text("joined")

    threading.Thread(target=late_writer).start()
    sys.stdout.write("no newline, still buffered")
    sys.stderr.write("calling exit_now\\n")
    sys.stderr.flush()
    exit_now(3)
    (out / "after.txt").write_text("exit_now returned")
""")


def test_exit_now_joins_threads_runs_atexit_flushes_and_keeps_the_code(tmp_path: Path) -> None:
    """The child's thread is still blocked on its stdin when exit_now is called (the test
    writes the line only after the child says so), so exit_now must wait for it."""
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    try:
        assert proc.stderr.readline() == "calling exit_now\n"
        assert not (tmp_path / "thread.txt").exists()
        stdout, stderr = proc.communicate("go\n", timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 3, stderr
    assert stdout == "no newline, still buffered"
    assert (tmp_path / "thread.txt").read_text() == "joined"
    assert (tmp_path / "atexit.txt").read_text() == "ran"
    assert "logged before exit" in (tmp_path / "log.txt").read_text()
    assert not (tmp_path / "after.txt").exists()
