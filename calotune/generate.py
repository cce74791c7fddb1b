"""``python -m calotune.generate models:/zdc@production --events N --out FILE``.

Writes showers in the detector's own HDF5 layout, so generated files go through the same
reader, metrics and evaluation as reference files. Conditions come from ``--conditions``
(a reference file whose incident energies and angles are reused) or from the detector's
synthetic condition distribution.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

from calotune.cli import configure_logging, run_cli
from calotune.errors import UserError

log = logging.getLogger("calotune.generate")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m calotune.generate", description=__doc__.splitlines()[0])
    p.add_argument("model", help="models:/NAME@ALIAS, models:/NAME/VERSION, or a local model folder")
    p.add_argument("--events", type=int, default=1000, help="number of showers")
    p.add_argument("--out", type=Path, required=True, help="output HDF5 file")
    p.add_argument("--conditions", type=Path, help="take conditions from this reference file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: SQLite in ./.calotune)")
    p.add_argument("--home", type=Path, default=Path(".calotune"))
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    return run_cli(lambda: generate_cli(args))


def generate_cli(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="calotune-generate-") as tmp:
        return _generate(args, Path(tmp))


def _generate(args: argparse.Namespace, tmp: Path) -> int:
    from calotune.artifacts import load_model
    from calotune.sampling import generate
    from calotune.tracking import registry
    from calotune.tracking.mlflow_tracker import resolve_tracking_uri

    if args.events <= 0:
        raise UserError(f"--events must be > 0, but got {args.events}")
    if not args.out.parent.resolve().is_dir():
        raise UserError(f"--out {args.out}: folder {args.out.parent} does not exist")
    if args.model.startswith("models:/"):
        name, alias, version = registry.parse_model_uri(args.model)
        uri = resolve_tracking_uri(args.tracking_uri, args.home.resolve(), must_exist=True)
        ref = registry.resolve(uri, name, alias=alias, version=version)
        model_dir = registry.download(uri, ref, tmp)
        label = f"{name} v{ref.version}"
    else:
        model_dir = Path(args.model)
        if not model_dir.is_dir():
            raise UserError(f"model {args.model!r}: not a models:/ URI nor a folder")
        label = str(model_dir)
    model, detector, _ = load_model(model_dir)
    if args.conditions is not None:
        if not args.conditions.is_file():
            raise UserError(f"--conditions {args.conditions}: file does not exist")
        source = detector.read(args.conditions)
        if len(source) < args.events:
            raise UserError(f"--conditions {args.conditions} holds {len(source)} events, "
                            f"fewer than --events {args.events}")
        conditions = source.subset(slice(0, args.events)).conditions
    else:
        conditions = detector.synthesize(args.events, seed=args.seed + 7919).conditions
    showers, ms = generate(model, conditions, batch_size=args.batch_size, seed=args.seed)
    showers.attrs.update({"generator": label, "seed": args.seed})
    detector.write(args.out, showers)
    log.info("wrote %d showers from %s to %s (%.3f ms per shower at batch %d)",
             len(showers), label, args.out, ms, args.batch_size)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
