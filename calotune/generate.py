"""``python -m calotune.generate models:/zdc@production --events N --out FILE``.

Writes showers in the detector's own HDF5 layout, so generated files go through the same
reader, metrics and evaluation as reference files. Showers are generated and appended to
the file one ``--batch-size`` batch at a time, so memory does not grow with ``--events``;
a run whose output cannot fit the free disk space is refused before any work, and the
file appears only when complete. Conditions come from ``--conditions``
(a reference file whose incident energies and angles are reused) or from the detector's
synthetic condition distribution.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from calotune.cli import cli_main
from calotune.errors import UserError

if TYPE_CHECKING:
    from calotune.detectors.base import Detector
    from calotune.sampling import Sample

log = logging.getLogger("calotune.generate")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m calotune.generate", description=__doc__.splitlines()[0])
    p.add_argument("model", help="models:/NAME@ALIAS, models:/NAME/VERSION, or a local model folder")
    p.add_argument("--events", type=int, default=1000, help="number of showers")
    p.add_argument("--out", type=Path, required=True, help="output HDF5 file")
    p.add_argument("--conditions", type=Path, help="take conditions from this reference file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=1000,
                   help="showers generated and written at a time; bounds memory")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: SQLite in ./.calotune)")
    p.add_argument("--home", type=Path, default=Path(".calotune"))
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    return cli_main(build_parser(), generate_cli, argv)


def generate_cli(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="calotune-generate-") as tmp:
        return _generate(args, Path(tmp))


def _output_inputs(args: argparse.Namespace, uri: str | None) -> dict[str, Path | None]:
    """Every file this run reads that ``--out`` must not be: writing there would destroy it."""
    inputs: dict[str, Path | None] = {"--conditions": args.conditions}
    if not args.model.startswith("models:/"):
        from calotune.artifacts import MODEL_JSON, WEIGHTS

        inputs["the model's"] = Path(args.model) / MODEL_JSON
        inputs["the model's weights"] = Path(args.model) / WEIGHTS
    if uri is not None and uri.startswith("sqlite:///"):
        inputs["the MLflow store"] = Path(uri[len("sqlite:///") :])
    return inputs


def _condition_batches(
    args: argparse.Namespace, detector: Detector
) -> Iterator[dict[str, np.ndarray]]:
    """Conditions in batches of --batch-size: a reference's (read once, conditions only) or
    synthetic ones drawn batch by batch, so memory never holds all --events showers."""
    n, size = args.events, args.batch_size
    if args.conditions is not None:
        conditions = detector.read_conditions(args.conditions, max_events=n)
        have = len(conditions["energy"])
        if have < n:
            raise UserError(f"--conditions {args.conditions} holds {have} events, fewer than --events {n}; "
                            f"lower --events to {have} or pass a larger reference")
        for lo in range(0, n, size):
            yield {k: v[lo : lo + size] for k, v in conditions.items()}
        return
    for i, lo in enumerate(range(0, n, size)):
        # batch 0 keeps the historical seed, so small runs reproduce earlier files
        seed = args.seed + 7919 if i == 0 else int(np.random.SeedSequence((args.seed, 7919, i)).generate_state(1)[0])
        yield detector.synthesize(min(size, n - lo), seed=seed).conditions


def _generate(args: argparse.Namespace, tmp: Path) -> int:
    from calotune.artifacts import load_model
    from calotune.data.hdf5 import check_free_space, check_memory, check_output
    from calotune.sampling import generate_batches
    from calotune.tracking import registry
    from calotune.tracking.mlflow_tracker import resolve_tracking_uri

    if args.events <= 0:
        raise UserError(f"--events must be > 0, but got {args.events}")
    if args.batch_size <= 0:
        raise UserError(f"--batch-size must be > 0, but got {args.batch_size}")
    uri = None
    if args.model.startswith("models:/"):
        name, alias, version = registry.parse_model_uri(args.model)
        uri = resolve_tracking_uri(args.tracking_uri, args.home.resolve(), must_exist=True)
    check_output(args.out, "--out", _output_inputs(args, uri))
    if args.conditions is not None and not args.conditions.is_file():
        raise UserError(f"--conditions {args.conditions}: file does not exist")
    if uri is not None:
        ref = registry.resolve(uri, name, alias=alias, version=version)
        model_dir = registry.download(uri, ref, tmp)
        label = f"{name} v{ref.version}"
    else:
        model_dir = Path(args.model)
        if not model_dir.is_dir():
            raise UserError(f"model {args.model!r}: not a models:/ URI nor a folder")
        label = str(model_dir)
    model, detector, _ = load_model(model_dir)
    # at most float64 per value (CaloChallenge files): every condition and every cell
    row_bytes = 8 * (len(detector.conditions) + sum(detector.part_sizes.values()))
    check_free_space(args.out, args.events * row_bytes + (1 << 20), f"--events {args.events}",
                     "lower --events (or split the run over several files) or choose --out on a larger disk")
    # the batch's conditions, showers, the float32 copy and the model's activations
    check_memory(4 * args.batch_size * row_bytes, f"--batch-size {args.batch_size}", "lower --batch-size")
    elapsed = 0.0

    def timed(stream: Iterable[tuple[Sample, float]]) -> Iterator[Sample]:
        nonlocal elapsed
        for showers, seconds in stream:
            elapsed += seconds
            yield showers

    stream = timed(generate_batches(model, _condition_batches(args, detector), seed=args.seed))
    attrs = {"generator": label, "seed": args.seed}
    n = detector.write_stream(args.out, stream, attrs)
    log.info("wrote %d showers from %s to %s (%.3f ms per shower at batch %d)",
             n, label, args.out, 1e3 * elapsed / max(n, 1), args.batch_size)
    return 0


if __name__ == "__main__":
    from calotune.cli import exit_now

    exit_now(main())  # without the interpreter's module teardown (calotune.cli.exit_now)
