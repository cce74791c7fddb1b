"""``python -m calotune.data``: make synthetic shower files and check shower files.

    python -m calotune.data synth zdc --events 10000 --seed 1 --out zdc.h5 --particle photon
    python -m calotune.data check zdc.h5 --detector zdc

Both work for any registered detector. ``check`` runs the same reader training uses, so a
file that passes here will not fail forty minutes into a search.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from calotune.data.cache import synth_limits
from calotune.data.hdf5 import check_output
from calotune.detectors import detector_names, get_detector
from calotune.errors import UserError

log = logging.getLogger("calotune.data")


def _geometry_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``--set KEY=VALUE`` pairs; values parse as JSON (numbers) or stay strings."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. --set hcal_nz=10")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m calotune.data", description="Make and check shower files.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    geometry_help = "override a geometry field, e.g. --set hcal_nz=10 (repeatable)"

    synth = sub.add_parser("synth", help="write parametrised reference showers to an HDF5 file")
    synth.add_argument("detector", help=f"one of: {', '.join(detector_names())}")
    synth.add_argument("--events", type=int, required=True, help="number of showers")
    synth.add_argument("--seed", type=int, required=True, help="random seed (same seed, same file)")
    synth.add_argument("--out", type=Path, required=True, help="output .h5 file")
    synth.add_argument("--particle", help="detector-specific, e.g. neutron or photon for zdc")
    synth.add_argument("--mode", help="detector-specific, e.g. full or pencil for zdc")
    synth.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=geometry_help)

    check = sub.add_parser("check", help="validate a shower file and print a one-line summary")
    check.add_argument("file", type=Path)
    check.add_argument("--detector", required=True, help=f"one of: {', '.join(detector_names())}")
    check.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=geometry_help)
    return parser


def _synth(args: argparse.Namespace) -> None:
    detector = get_detector(args.detector, **_geometry_overrides(args.set))
    if args.events < 1:
        raise UserError(f"--events must be >= 1, got {args.events}")
    check_output(args.out, "--out")
    synth_limits(detector, args.events, args.out)
    # only the options the user gave: other detectors may not know "particle" or "mode"
    options = {k: v for k in ("particle", "mode") if (v := getattr(args, k)) is not None}
    start = time.perf_counter()
    showers = detector.synthesize(args.events, args.seed, **options)
    detector.write(args.out, showers)
    log.info(
        "wrote %d %s showers (%s) to %s in %.1f s",
        len(showers),
        detector.name,
        ", ".join(f"{k}={v}" for k, v in {**options, "seed": args.seed}.items()),
        args.out,
        time.perf_counter() - start,
    )


def _check(args: argparse.Namespace) -> None:
    detector = get_detector(args.detector, **_geometry_overrides(args.set))
    showers = detector.read(args.file)
    energy_gev = showers.conditions["energy"] / 1e3
    parts = ", ".join(
        f"{name} {cells.shape[1]} cells (mean sum {cells.sum(axis=1).mean() / 1e3:.3g} GeV)"
        for name, cells in showers.cells.items()
    )
    log.info(
        "%s: ok, %s, %d events, incident energy %.3g-%.3g GeV, %s",
        args.file,
        detector.name,
        len(showers),
        energy_gev.min(),
        energy_gev.max(),
        parts,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for anything the user can fix)."""
    from calotune.cli import cli_main

    def body(args: argparse.Namespace) -> int:
        (_synth if args.command == "synth" else _check)(args)
        return 0

    return cli_main(_parser(), body, argv)


if __name__ == "__main__":
    sys.exit(main())
