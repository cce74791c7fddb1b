"""Fraction of wall time the GPU is busy during a search (issue 16's target: >= 95 %).

Runs ``python -m calotune.search`` on a GPU machine and samples the device's utilisation
(NVML through ``pynvml`` if installed, else ``nvidia-smi --query-gpu=utilization.gpu``)
every ``--period`` seconds. NVML's utilisation is the share of the last sample period in
which at least one kernel ran, so its mean over the search is the busy fraction. Two
figures: over the whole search (Ray start, data read, MLflow and test scoring included)
and over the training window (first to last sample with any kernel running).

    .venv/bin/python benchmarks/gpu_busy.py zdc_swiglu --trials 8 --max-epochs 20 \\
        --gpus-per-trial 0.25 --precision bf16 --json gpu_busy.json

Without an NVIDIA GPU it says so and exits with status 2, measuring nothing.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent


def utilisation_reader() -> tuple[Callable[[], list[float]], str] | None:
    """A function returning each GPU's utilisation in percent, and what it uses; None without a GPU."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        if handles:
            return (lambda: [float(pynvml.nvmlDeviceGetUtilizationRates(h).gpu) for h in handles]), "pynvml"
    except Exception:  # not installed, or no driver: fall back to the command line tool
        pass
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    query = [smi, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]
    probe = subprocess.run(query, capture_output=True, text=True)
    if probe.returncode != 0 or not probe.stdout.strip():
        return None

    def read() -> list[float]:
        out = subprocess.run(query, capture_output=True, text=True, check=True).stdout
        return [float(x) for x in out.split()]

    return read, "nvidia-smi"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("space", nargs="?", default="zdc_swiglu")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--max-epochs", type=int, default=10)
    parser.add_argument("--gpus-per-trial", type=float, default=0.25)
    parser.add_argument("--precision", choices=("fp32", "bf16"), help="fix the trainer's precision")
    parser.add_argument("--compile", action="store_true", help="fix compile: true")
    parser.add_argument("--data", type=Path, help="a data file (default: the space's synthetic sample)")
    parser.add_argument("--period", type=float, default=0.2, help="seconds between samples")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    reader = utilisation_reader()
    if reader is None:
        print("gpu_busy: no NVIDIA GPU visible (neither pynvml nor nvidia-smi reports a device); nothing to "
              "measure. Run it on a GPU machine.", file=sys.stderr)
        return 2
    read, source = reader

    from calotune.spec import resolve_space_path

    space = yaml.safe_load(resolve_space_path(args.space).read_text())
    fixed = dict(space.get("fixed") or {})
    if args.precision:
        fixed["precision"] = args.precision
    if args.compile:
        fixed["compile"] = True
    space["fixed"] = fixed
    space["name"] = f"{space.get('name', args.space)}_gpu_busy"
    work = Path(tempfile.mkdtemp(prefix="calotune-gpubusy-"))
    path = work / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    cmd = [sys.executable, "-m", "calotune.search", str(path), "--trials", str(args.trials),
           "--max-epochs", str(args.max_epochs), "--gpus-per-trial", str(args.gpus_per_trial),
           "--home", str(work / "home")]
    if args.data:
        cmd += ["--data", str(args.data)]

    samples: list[tuple[float, list[float]]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(args.period):
            samples.append((time.perf_counter(), read()))

    thread = threading.Thread(target=sample, daemon=True)
    t0 = time.perf_counter()
    thread.start()
    with open(work / "search.log", "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    stop.set()
    thread.join()
    wall = time.perf_counter() - t0
    busy = [max(u) for _, u in samples]  # one device: its utilisation; several: the busiest
    active = [i for i, u in enumerate(busy) if u > 0]
    window = busy[active[0] : active[-1] + 1] if active else []
    result: dict[str, Any] = {
        "space": args.space, "trials": args.trials, "max_epochs": args.max_epochs,
        "gpus_per_trial": args.gpus_per_trial, "precision": args.precision or "space default",
        "compile": args.compile, "source": source, "rc": rc, "wall_s": round(wall, 1),
        "samples": len(samples),
        "busy_fraction_whole_search": round(statistics.fmean(busy) / 100, 3) if busy else None,
        "busy_fraction_training_window": round(statistics.fmean(window) / 100, 3) if window else None,
        "training_window_s": round(len(window) * args.period, 1),
        "log": str(work / "search.log"),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)
    return 0 if rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
