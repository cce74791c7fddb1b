"""Peak memory of a real search on a multi-GB sample: the driver and each trial process.

Builds a ZDC file of ``--gib`` GiB of float32 events (full 10x10 ECAL + 10x10x36 HCAL
geometry, 16 kB per event) in /tmp, runs ``python -m calotune.search`` on it with two
concurrent one-epoch trials, and samples every process of the search's tree from
/proc twice a second: the kernel's peak resident size (VmHWM, which counts the object
store's shared pages a process touched) and the peak private memory (RssAnon, sampled).
The object store holds the train and validation splits: 70 % of the sample.

``--before DIR`` also runs the same search with the code in DIR (``git archive HEAD | tar
-x -C DIR``) first on PYTHONPATH, interleaved with the working tree's, so the two are
measured under the same load. The file is deleted at the end unless ``--keep``.

    .venv/bin/python benchmarks/memory.py --gib 4 --before /tmp/calotune-head --json memory.json

``--scoring`` measures instead the step after a search (``orchestrate._finish``) on a
held-out test split of ``--gib`` GiB (full-geometry ZDC, float32, in memory): two saved
models (the best and the default trial) generated, scored and plotted against it, once
the old way (``score_model``: each generated sample whole, both held until the plots;
"whole") and once streamed (``score_model_streamed``: batches of 1000 reduced to per-event
summaries, the reference summarised once; "streamed"). Each variant runs in its own
process; reported: the step's peak resident memory above what the process held before it
(the kernel's VmHWM, reset through /proc/self/clear_refs), tracemalloc's peak of the step
(numpy's allocations; torch's are not traced) and the scores, which must agree.

    .venv/bin/python benchmarks/memory.py --scoring --gib 1 --json memory-scoring.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
log = logging.getLogger("benchmarks.memory")

SPACE = """\
name: memory_bench
family: zdc_swiglu
detector: zdc
objective: {metric: mean_separation, mode: min}
budget: {trials: 2, max_epochs: 1}
scheduler: {type: none}
resources: {cpus_per_trial: 1, max_concurrent_trials: 2}
params:
  lr_generator: {type: float, low: 1.0e-4, high: 5.0e-3, log: true}
fixed: {hidden_width: 8, critic_width: 8, low_rank: 2, n_layers: 1, noise_dim: 4, batch_size: 1024}
"""

#: Installed as ``sitecustomize`` on the search's PYTHONPATH, so it runs in the driver and in
#: every Ray worker, for the old code and the new alike: each epoch trains on the first
#: $CALOTUNE_BENCH_TRAIN_EVENTS events of its shuffled order. A full epoch of 180 000
#: full-geometry events takes about 10 minutes per trial on one loaded core, and memory does
#: not depend on it: the trial maps the whole training split either way.
SITECUSTOMIZE = """\
import importlib.abc, importlib.util, os, sys

class _Patch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "calotune.tuning.worker":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            original, limit = module._train_epoch, int(os.environ["CALOTUNE_BENCH_TRAIN_EVENTS"])

            def short_epoch(model, optimizers, ctx, train_set, order, *args, **kwargs):
                return original(model, optimizers, ctx, train_set, order[:limit], *args, **kwargs)

            module._train_epoch = short_epoch

        spec.loader.exec_module = exec_module
        return spec

if os.environ.get("CALOTUNE_BENCH_TRAIN_EVENTS"):
    sys.meta_path.insert(0, _Patch())
"""


def build_file(path: Path, gib: float, chunk: int = 8192) -> int:
    """Write about ``gib`` GiB of float32 ZDC events in the zdc layout; returns the event count.

    Synthesising 270 000 full-geometry events takes many minutes, and memory does not
    depend on the showers' content, so two synthetic chunks are written over and over,
    each copy with its cells scaled by a slightly different factor. Uncompressed (gzip
    would take ten minutes for 4 GiB here), written in chunks: memory is two chunks.
    """
    import h5py

    from calotune.detectors import get_detector

    detector = get_detector("zdc")
    row = 4 * (len(detector.conditions) + sum(detector.part_sizes.values()))
    n_events = int(gib * 2**30 // row) + 1
    chunks = [detector._datasets(detector.synthesize(chunk, seed=s)) for s in (1, 2)]
    tmp = path.with_suffix(".tmp")
    with h5py.File(tmp, "w") as f:
        for key, value in detector._file_attrs({"source": "benchmarks/memory.py"}).items():
            f.attrs[key] = value
        out = {k: f.create_dataset(k, shape=(n_events, v.shape[1]), dtype=v.dtype) for k, v in chunks[0].items()}
        for i, lo in enumerate(range(0, n_events, chunk)):
            hi = min(n_events, lo + chunk)
            scale = np.float32(1 + 1e-3 * i)
            for key, value in chunks[i % 2].items():
                block = value[: hi - lo]
                out[key][lo:hi] = block * scale if key in detector.part_sizes else block
    tmp.rename(path)
    log.info("wrote %s: %d events, %.2f GiB as float32", path, n_events, path.stat().st_size / 2**30)
    return n_events


def _status(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssShmem", "PPid"):
                out[key] = int(value.split()[0])
    return out


def _title(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:160]


class Sampler:
    """Peaks of every process descending from ``root``, sampled until stopped."""

    def __init__(self, root: int, period: float = 0.5) -> None:
        self.root, self.period = root, period
        self.procs: dict[int, dict[str, Any]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _tree(self) -> list[int]:
        parents: dict[int, int] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    parents[int(entry)] = _status(int(entry)).get("PPid", 0)
                except OSError:
                    continue
        tree, frontier = [self.root], [self.root]
        while frontier:
            frontier = [p for p, pp in parents.items() if pp in frontier]
            tree += frontier
        return tree

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            for pid in self._tree():
                try:
                    status, title = _status(pid), _title(pid)
                except OSError:
                    continue
                rec = self.procs.setdefault(pid, {"hwm_kib": 0, "anon_kib": 0, "title": title})
                rec["title"] = title or rec["title"]  # Ray renames its workers after they start
                rec["hwm_kib"] = max(rec["hwm_kib"], status.get("VmHWM", 0))
                rec["anon_kib"] = max(rec["anon_kib"], status.get("RssAnon", 0))


def _kind(pid: int, root: int, title: str) -> str:
    if pid == root:
        return "driver"
    if "ImplicitFunc" in title or "trial_driver" in title:
        return "trial"
    return "other"


def run_search(data: Path, tree: Path | None, workdir: Path, train_events: int) -> dict[str, Any]:
    """One search; peaks per process kind in GiB."""
    space = workdir / "memory_bench.yaml"
    space.write_text(SPACE)
    home = workdir / f"home-{time.monotonic_ns()}"
    (workdir / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = dict(os.environ, CALOTUNE_BENCH_TRAIN_EVENTS=str(train_events))
    env["PYTHONPATH"] = os.pathsep.join([str(workdir), *([str(tree)] if tree else []), env.get("PYTHONPATH", "")])
    where = subprocess.run([sys.executable, "-c", "import calotune; print(calotune.__file__)"], env=env,
                           capture_output=True, text=True, check=True, cwd=workdir).stdout.strip()
    cmd = [sys.executable, "-m", "calotune.search", str(space), "--data", str(data), "--home", str(home),
           "--max-concurrent", "2"]
    t0 = time.perf_counter()
    with open(workdir / "search.log", "a") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=workdir)
        with Sampler(proc.pid) as sampler:
            rc = proc.wait()
    wall = time.perf_counter() - t0
    shutil.rmtree(home, ignore_errors=True)
    gib = 2**20
    rows = [{"pid": pid, "kind": _kind(pid, proc.pid, r["title"]), "title": r["title"][:80],
             "peak_rss_gib": round(r["hwm_kib"] / gib, 3), "peak_private_gib": round(r["anon_kib"] / gib, 3)}
            for pid, r in sampler.procs.items()]
    return {"code": where, "rc": rc, "wall_s": round(wall, 1),
            "driver": next(r for r in rows if r["kind"] == "driver"),
            "trials": [r for r in rows if r["kind"] == "trial"],
            "largest_other": sorted((r for r in rows if r["kind"] == "other"),
                                    key=lambda r: -r["peak_private_gib"])[:3]}


#: The scoring benchmark's two models: zdc_swiglu as small as SPACE's trials (memory does not
#: depend on their quality; generating 65 000 events must take seconds, not minutes).
SCORING_PARAMS: dict[str, Any] = {"hidden_width": 8, "critic_width": 8, "low_rank": 2, "n_layers": 1,
                                  "noise_dim": 4}


def _vm(key: str) -> int:
    """This process's /proc/self/status ``key`` in KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _reference(gib: float, chunk: int = 4096):
    """A full-geometry ZDC test split of about ``gib`` GiB in memory (two synthetic chunks
    repeated, each copy scaled a little, as :func:`build_file` writes them)."""
    from calotune.detectors import get_detector
    from calotune.showers import ShowerSet

    detector = get_detector("zdc")
    row = 4 * (len(detector.conditions) + sum(detector.part_sizes.values()))
    n = int(gib * 2**30 // row) + 1
    chunks = [detector.synthesize(chunk, seed=s) for s in (1, 2)]
    cells = {k: np.empty((n, w), np.float32) for k, w in detector.part_sizes.items()}
    conditions = {k: np.empty(n, np.float32) for k in detector.conditions}
    for i, lo in enumerate(range(0, n, chunk)):
        hi, src = min(n, lo + chunk), chunks[i % 2]
        for k in cells:
            np.multiply(src.cells[k][: hi - lo], np.float32(1 + 1e-3 * i), out=cells[k][lo:hi])
        for k in conditions:
            conditions[k][lo:hi] = src.conditions[k][: hi - lo]
    return detector, ShowerSet(conditions=conditions, cells=cells)


def scoring_child(variant: str, gib: float, workdir: Path) -> dict[str, Any]:
    """One variant of the scoring step in this process (see the module docstring)."""
    import gc
    import tracemalloc

    import torch

    from calotune.artifacts import save_model
    from calotune.models.registry import build_model
    from calotune.sampling import score_model, score_model_streamed

    torch.set_num_threads(1)
    detector, reference = _reference(gib)
    dirs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = build_model("zdc_swiglu", SCORING_PARAMS, detector)
        dirs.append(save_model(workdir / f"model-{variant}-{seed}", model, family="zdc_swiglu", detector=detector,
                               params=SCORING_PARAMS))
    del model
    gc.collect()
    base_kib = _vm("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        hwm_reset = True
    except OSError:
        hwm_reset = False
    tracemalloc.start()
    t0 = time.perf_counter()
    scores = []
    if variant == "whole":
        generated = []
        for d in dirs:
            s, g = score_model(d, reference, 0)
            scores.append(s)
            generated.append(g)
        for i, g in enumerate(generated):
            detector.plot(reference, g, workdir / f"plots-{variant}-{i}")
    else:
        summary = detector.summarise(reference)
        generated = []
        for d in dirs:
            s, g = score_model_streamed(d, reference, 0, reference_summary=summary)
            scores.append(s)
            generated.append(g)
        summary = summary.for_plots()
        for i, g in enumerate(generated):
            detector.plot(summary, g, workdir / f"plots-{variant}-{i}")
    wall = time.perf_counter() - t0
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    gib_ = 2**30
    return {
        "variant": variant, "events": len(reference),
        "reference_gib": round(sum(v.nbytes for v in reference.cells.values()) / gib_, 3),
        "rss_before_step_gib": round(base_kib / 2**20, 3),
        "step_peak_rss_above_before_gib": round((_vm("VmHWM") - base_kib) / 2**20, 3) if hwm_reset else None,
        "process_peak_rss_gib": round(_vm("VmHWM") / 2**20, 3),
        "step_tracemalloc_peak_gib": round(traced_peak / gib_, 3),
        "step_wall_s": round(wall, 1),
        "mean_separation": [s["mean_separation"] for s in scores],
        "gen_time_ms": [round(s["gen_time_ms"], 4) for s in scores],
    }


def run_scoring(gib: float, repeats: int, workdir: Path) -> dict[str, Any]:
    """Both variants, each in a fresh process, ``repeats`` rounds interleaved."""
    runs: dict[str, list[dict[str, Any]]] = {"streamed": [], "whole": []}
    for r in range(repeats):
        for variant in runs:
            log.info("round %d: scoring %s", r + 1, variant)
            out = subprocess.run([sys.executable, __file__, "--scoring-child", variant, "--gib", str(gib),
                                  "--workdir", str(workdir)], capture_output=True, text=True, cwd=ROOT)
            if out.returncode != 0:
                raise RuntimeError(f"scoring child {variant} failed:\n{out.stderr[-4000:]}")
            runs[variant].append(json.loads(out.stdout.strip().splitlines()[-1]))
            log.info("%s", json.dumps(runs[variant][-1]))
    same = all(_close(a["mean_separation"], b["mean_separation"])
               for a, b in zip(runs["streamed"], runs["whole"], strict=True))
    summary = {v: {k: statistics.median(r[k] for r in rs) for k in
                   ("step_peak_rss_above_before_gib", "process_peak_rss_gib", "step_tracemalloc_peak_gib",
                    "step_wall_s") if all(r[k] is not None for r in rs)}
               for v, rs in runs.items()}
    return {"gib": gib, "runs": runs, "summary": summary, "scores_agree": same}


def _close(a: list[float], b: list[float], rel: float = 1e-9) -> bool:
    """Equal within ``rel`` (float summation order), element by element."""
    return len(a) == len(b) and all(abs(x - y) <= rel * max(abs(x), abs(y), 1e-300) for x, y in zip(a, b, strict=True))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gib", type=float, default=4.0, help="sample size as float32 (default 4)")
    parser.add_argument("--before", type=Path, help="a checkout of the code to compare with (interleaved)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--train-events", type=int, default=2048,
                        help="events each trial trains on per epoch (see SITECUSTOMIZE; default 2048)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--keep", action="store_true", help="keep the data file and logs")
    parser.add_argument("--scoring", action="store_true",
                        help="measure the held-out scoring step instead, on a test split of --gib GiB")
    parser.add_argument("--scoring-child", choices=("whole", "streamed"), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.scoring_child:
        sys.path.insert(0, str(ROOT))
        print(json.dumps(scoring_child(args.scoring_child, args.gib, args.workdir)))
        return 0
    workdir = Path(tempfile.mkdtemp(prefix="calotune-membench-", dir="/tmp"))
    if args.scoring:
        try:
            text = json.dumps(run_scoring(args.gib, args.repeats, workdir), indent=2)
            print(text)
            if args.json:
                args.json.write_text(text)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        return 0
    data = workdir / "zdc-big.h5"
    results: dict[str, Any] = {"gib": args.gib, "train_events_per_epoch": args.train_events,
                               "runs": {"after": []}}
    try:
        t0 = time.perf_counter()
        results["events"] = build_file(data, args.gib)
        results["build_s"] = round(time.perf_counter() - t0, 1)
        variants: list[tuple[str, Path | None]] = [("after", None)]
        if args.before is not None:
            variants.insert(0, ("before", args.before.resolve()))
            results["runs"]["before"] = []
        for r in range(args.repeats):
            for name, tree in variants:
                log.info("round %d: %s", r + 1, name)
                run = run_search(data, tree, workdir, args.train_events)
                log.info("%s", json.dumps(run))
                results["runs"][name].append(run)
        results["summary"] = {
            name: {"driver_peak_rss_gib": statistics.median(r["driver"]["peak_rss_gib"] for r in runs),
                   "driver_peak_private_gib": statistics.median(r["driver"]["peak_private_gib"] for r in runs),
                   "trial_peak_private_gib": max(t["peak_private_gib"] for r in runs for t in r["trials"]),
                   "trial_peak_rss_gib": max(t["peak_rss_gib"] for r in runs for t in r["trials"]),
                   "wall_s": statistics.median(r["wall_s"] for r in runs)}
            for name, runs in results["runs"].items() if runs and all(r["trials"] for r in runs)}
        text = json.dumps(results, indent=2)
        print(text)
        if args.json:
            args.json.write_text(text)
    finally:
        if args.keep:
            log.info("kept %s", workdir)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
