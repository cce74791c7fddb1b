"""``python -m calotune.promote DETECTOR``: move alias ``production`` only to a better model.

Candidate and current production are scored on the same held-out sample (the test split
of the candidate's search data, or ``--data``), with the objective the candidate was
selected on. The first promotion always succeeds; ``--force`` overrides the comparison;
``--to-version V`` rolls back. Every promotion is recorded as tags on the version.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

from calotune.cli import configure_logging, run_cli
from calotune.errors import UserError

log = logging.getLogger("calotune.promote")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m calotune.promote", description=__doc__.splitlines()[0])
    p.add_argument("detector", help="registered model name (the detector, e.g. zdc)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: SQLite in ./.calotune)")
    p.add_argument("--data", type=Path, help="held-out reference HDF5 (default: the candidate "
                   "search's test split)")
    p.add_argument("--force", action="store_true", help="promote even if the candidate is not better")
    p.add_argument("--to-version", help="point production at this version (roll back)")
    p.add_argument("--candidate-version", help="judge this version instead of alias 'candidate'")
    p.add_argument("--home", type=Path, default=Path(".calotune"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def held_out(ref, detector, data: Path | None):
    """The reference sample both models are judged on."""
    from calotune.data.splits import split

    if data is not None:
        if not data.is_file():
            raise UserError(f"--data {data}: file does not exist")
        return detector.read(data)
    path = ref.tags.get("data_path")
    if not path or not Path(path).is_file():
        raise UserError(f"the candidate's search data {path!r} is not on this machine; pass "
                        f"--data with a held-out reference file")
    showers = detector.read(Path(path))
    return split(showers, float(ref.tags.get("validation_fraction", 0.15)),
                 float(ref.tags.get("test_fraction", 0.15)), seed=int(ref.tags.get("split_seed", 0))).test


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    return run_cli(lambda: promote(args))


def promote(args: argparse.Namespace) -> int:
    from calotune.tracking import registry
    from calotune.tracking.mlflow_tracker import resolve_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri, args.home.resolve(), must_exist=True)
    name = args.detector
    registry.resolve(uri, name, alias="candidate" if not (args.to_version or args.candidate_version) else None,
                     version=args.to_version or args.candidate_version)  # unknown model/alias: exit 2 now
    with registry.promotion_lock(uri, name), tempfile.TemporaryDirectory(prefix="calotune-promote-") as tmp:
        return _promote_locked(args, uri, name, Path(tmp))


def _promote_locked(args: argparse.Namespace, uri: str, name: str, tmp: Path) -> int:
    """Everything from reading ``production`` to moving it happens under the lock, so two
    promotions at once are serialised and the second compares against the first's result."""
    from calotune.artifacts import read_description
    from calotune.detectors import get_detector
    from calotune.sampling import score_model
    from calotune.tracking import registry
    from calotune.tracking.mlflow_tracker import _client, user

    client = _client(uri)
    production = registry.resolve(uri, name, alias="production", required=False)
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    if args.to_version:
        target = registry.resolve(uri, name, version=args.to_version)
        _record(client, name, target.version, {"promoted_at": now, "promoted_by": user(),
                "promotion": "rollback", "replaced_version": production.version if production else "none"})
        client.set_registered_model_alias(name, "production", target.version)
        log.info("production of %r -> version %s (rollback; was %s)", name, target.version,
                 production.version if production else "none")
        return 0

    candidate = (registry.resolve(uri, name, version=args.candidate_version) if args.candidate_version
                 else registry.resolve(uri, name, alias="candidate"))
    if production is not None and production.version == candidate.version:
        log.info("candidate v%s already is production; nothing to do", candidate.version)
        return 0
    objective = candidate.tags.get("objective", "mean_separation")
    mode = candidate.tags.get("mode", "min")
    cand_dir = registry.download(uri, candidate, tmp / "candidate")
    description = read_description(cand_dir)
    reference = held_out(candidate, get_detector(description["detector"], **description["geometry"]),
                         args.data)
    cand_score = score_model(cand_dir, reference, args.seed)[0][objective]
    prod_score = None
    if production is not None:
        prod_dir = registry.download(uri, production, tmp / "production")
        prod_score = score_model(prod_dir, reference, args.seed)[0][objective]
    better = prod_score is None or (cand_score < prod_score if mode == "min" else cand_score > prod_score)
    log.info("held-out %s (%s, %d events): candidate v%s = %.5f, production %s = %s",
             objective, mode, len(reference), candidate.version, cand_score,
             f"v{production.version}" if production else "(none)",
             f"{prod_score:.5f}" if prod_score is not None else "n/a")
    if not better and not args.force:
        log.info("not promoted: the candidate is not better (use --force to override)")
        return 0
    _record(client, name, candidate.version, {
        "promoted_at": now, "promoted_by": user(),
        "promotion": "forced" if not better else ("first" if production is None else "better"),
        "promotion_objective": objective, "candidate_score": f"{cand_score:.6g}",
        "production_score": f"{prod_score:.6g}" if prod_score is not None else "none",
        "replaced_version": production.version if production else "none",
        "search": candidate.tags.get("search", ""),
    })
    client.set_registered_model_alias(name, "production", candidate.version)
    log.info("promoted %r version %s to production", name, candidate.version)
    return 0


def _record(client, name: str, version: str, tags: dict[str, str]) -> None:
    for k, v in tags.items():
        client.set_model_version_tag(name, version, k, str(v))


if __name__ == "__main__":
    raise SystemExit(main())
