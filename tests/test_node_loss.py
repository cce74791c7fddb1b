"""Node loss, for real: a two-node loopback Ray cluster loses its worker node mid-search."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from calotune.spec import SPACES_DIR
from tests.conftest import kill_pids, pids_mentioning, ray_cluster, tool_env, wait_for
from tests.helpers import trial_runs

pytestmark = pytest.mark.slow
SPACE = "zdc_swiglu_tiny"


def test_trials_on_a_lost_node_are_retried_on_the_survivor(tmp_path: Path) -> None:
    home = tmp_path / "home"
    # The tiny space with more data and epochs and no early stopping: every trial runs
    # long enough to need its node.
    raw = yaml.safe_load((SPACES_DIR / f"{SPACE}.yaml").read_text())
    raw.update(scheduler={"type": "none"}, data={"events": 3000, "seed": 1})
    raw["fixed"]["hidden_width"] = 64
    space = tmp_path / f"{SPACE}.yaml"
    space.write_text(yaml.safe_dump(raw))
    (tmp_path / "logs").mkdir()
    with ray_cluster(tmp_path / "logs", workers=1, cpus_per_node=1) as cluster:
        roles = cluster.alive_nodes()
        worker_id = next(n for n, role in roles.items() if role == "worker_node")
        head_id = next(n for n, role in roles.items() if role == "head_node")
        log = tmp_path / "search.log"
        hung = tmp_path / "hung"  # written by the trial that hangs: the fault reached the node
        with log.open("w") as out:
            search = subprocess.Popen(
                [sys.executable, "-m", "calotune.search", str(space), "--home", str(home), "--trials", "3",
                 "--max-epochs", "15", "--address", cluster.gcs_address],
                cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT,
                # a trial on the worker node blocks at epoch 2 until the node dies, so the kill
                # lands while it runs however fast the machine is; on the head it runs through
                env=tool_env(**cluster.env, CALOTUNE_FAULT=json.dumps(
                    {"kind": "hang", "epoch": 2, "node": worker_id, "once_file": str(hung)})),
                start_new_session=True)
        try:
            def on_worker() -> bool:
                return any(r.data.tags.get("calotune.node_id") == worker_id and r.info.status == "RUNNING"
                           for r in trial_runs(home, SPACE))

            wait_for(lambda: hung.exists() and on_worker(), 300, "a trial hung on the worker node",
                     proc=search, log=log)
            # Kill every process of the worker node at once: a pre-empted machine.
            node_proc = cluster.procs[1]
            kill_pids(pids_mentioning(str(cluster.root / "n1")))
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node_proc.pid, signal.SIGKILL)
            killed_at = time.monotonic()
            search.wait(timeout=600)
        finally:
            if search.poll() is None:
                os.killpg(search.pid, signal.SIGKILL)
        text = log.read_text()
        assert search.returncode == 0, text[-5000:]
        assert worker_id not in cluster.alive_nodes(), "the worker node must really be gone"
    runs = trial_runs(home, SPACE)
    assert len(runs) == 3, "a retried trial keeps its single MLflow run"
    assert {r.data.tags["calotune.state"] for r in runs} <= {"complete", "pruned"}, text[-3000:]
    moved = [r for r in runs if r.data.tags.get("calotune.nodes", "").split(",")[:1] == [worker_id]
             and r.data.tags.get("calotune.node_id") == head_id]
    assert moved, [r.data.tags.get("calotune.nodes") for r in runs]
    print(f"search finished {time.monotonic() - killed_at:.0f} s after the node was killed; "
          f"{len(moved)} trial(s) moved to the surviving node")
