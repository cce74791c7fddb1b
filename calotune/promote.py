"""``python -m calotune.promote NAME``: move alias ``production`` only to a better model.

Candidate and current production are scored on the same held-out sample, with the
objective the candidate was selected on. That sample is the test split of the candidate's
search data, re-derived only after the file's hash matches the one the search recorded
(tag ``data_hash``): a file that changed since, or another file passed as ``--data``, could
hold the candidate's training events. A file that no search trained on is accepted with
``--data FILE --independent-data``. Versions of different detectors or geometries are
never compared. The first promotion always succeeds; ``--force`` overrides the comparison
(and moves past a production whose files are gone); ``--to-version V`` rolls back. Every
promotion is recorded as tags on the version, including the data it was judged on.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from calotune.cli import cli_main
from calotune.errors import UserError

log = logging.getLogger("calotune.promote")

# Tags a promotion writes on the version it promotes; a later promotion of the same version
# replaces the whole set, so the tags always describe one promotion, never a mix of two.
PROMOTION_TAGS = (
    "promoted_at", "promoted_by", "promotion", "promotion_objective", "candidate_score",
    "production_score", "replaced_version", "replaced_version_artifacts", "search",
    "promotion_data", "promotion_data_hash", "promotion_data_split", "artifacts_missing",
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m calotune.promote", description=__doc__.splitlines()[0])
    p.add_argument("detector", help="registered model name (the detector, e.g. zdc; a non-default "
                   "geometry has its own name, e.g. zdc-g1a2b3c4d)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: SQLite in ./.calotune)")
    p.add_argument("--data", type=Path, help="reference HDF5: the candidate search's own file "
                   "(judged on its held-out test split, the default), or, with --independent-data, "
                   "a held-out file no search trained on")
    p.add_argument("--independent-data", action="store_true", help="--data is a held-out file that "
                   "no search trained on: judge on all of it")
    p.add_argument("--force", action="store_true", help="promote even if the candidate is not better, "
                   "or production's files are gone; with --to-version, even if that version's are")
    p.add_argument("--to-version", help="point production at this version (roll back)")
    p.add_argument("--candidate-version", help="judge this version instead of alias 'candidate'")
    p.add_argument("--home", type=Path, default=Path(".calotune"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-v", "--verbose", action="store_true")
    return p


@dataclass(frozen=True)
class Reference:
    """The sample both models are judged on, and what it is (recorded on the promotion)."""

    showers: Any
    path: Path
    hash: str
    split: tuple[int, float, float] | None  # (seed, validation, test) of a search's split; None: whole file

    def describe(self) -> str:
        if self.split is None:
            return "whole file (independent held-out data)"
        seed, val, test = self.split
        return f"test split (seed {seed}, validation {val:g}, test {test:g})"


def _hash(path: Path, what: str) -> str:
    from calotune.tracking.registry import file_hash

    try:
        return file_hash(path)
    except OSError as exc:
        raise UserError(f"{what} {path}: cannot be read ({exc.strerror})") from None


def _split_of(ref) -> tuple[int, float, float]:
    """The split the search recorded on a version; UserError if the tags are unusable."""
    try:
        return (int(ref.tags.get("split_seed", 0)), float(ref.tags.get("validation_fraction", 0.15)),
                float(ref.tags.get("test_fraction", 0.15)))
    except ValueError:
        raise UserError(f"version {ref.version}: split tags (split_seed, validation_fraction, "
                        f"test_fraction) are not numbers; fix them in MLflow, or judge on "
                        f"independent data (--data FILE --independent-data)") from None


def held_out(ref, detector, data: Path | None, independent: bool = False) -> Reference:
    """The reference sample both models are judged on, never one that holds training events.

    Without ``data``: the test split of the file the candidate's search used, after checking
    that the file is byte-identical to what the search recorded. With ``data`` whose hash is
    the recorded one: the same test split (never the whole file: most of it trained the
    candidate). With another file: only if the user states it is independent.
    """
    from calotune.data.splits import detach, split

    recorded = ref.tags.get("data_hash")
    who = f"candidate v{ref.version}"
    independent_hint = "pass --data FILE --independent-data with a held-out file that no search trained on"
    if independent and data is None:
        raise UserError("--independent-data needs --data FILE: the held-out file to judge on")
    if data is not None:
        if not data.is_file():
            raise UserError(f"--data {data}: file does not exist")
        digest = _hash(data, "--data")
        if independent:
            if recorded and digest == recorded:
                raise UserError(f"--data {data} is the file {who}'s search trained on (data_hash "
                                f"{digest}), not independent data; drop --independent-data to judge "
                                f"on its held-out test split")
            return Reference(detector.read(data), data.resolve(), digest, None)
        if not recorded:
            raise UserError(f"{who} has no recorded data_hash, so --data {data} cannot be matched to "
                            f"its search's data; if no search trained on {data}, add --independent-data")
        if digest != recorded:
            raise UserError(f"--data {data} (sha256 {digest}) is not the file {who}'s search used "
                            f"(data_hash {recorded}), so it may hold the candidate's training events; "
                            f"if no search trained on it, add --independent-data, or pass the search's file")
        path = data.resolve()
    else:
        recorded_path = ref.tags.get("data_path")
        if not recorded_path or not Path(recorded_path).is_file():
            raise UserError(f"{who}'s search data {recorded_path!r} is not on this machine; pass "
                            f"--data with that file (same data_hash {recorded or '?'}), or "
                            f"{independent_hint}")
        path = Path(recorded_path)
        if not recorded:
            raise UserError(f"{who} has no recorded data_hash, so {path} cannot be verified to be the "
                            f"file its search used; {independent_hint}")
        digest = _hash(path, f"{who}'s search data")
        if digest != recorded:
            raise UserError(f"{who}'s search data {path} changed since the search (sha256 now {digest}, "
                            f"recorded {recorded}), so its test split is no longer held out; restore "
                            f"the file, or {independent_hint}")
    seed, val, test = _split_of(ref)
    try:
        # in place, then a copy of the test rows: one copy of the file in memory, not two
        sample = detach(split(detector.read(path), val, test, seed=seed, in_place=True).test)
    except ValueError as exc:
        raise UserError(f"{path}: {exc}") from None
    return Reference(sample, path, digest, (seed, val, test))


def _check_fair_for_production(production, reference: Reference) -> None:
    """Production must not have trained on the reference either (same file, other split)."""
    if production is None or production.tags.get("data_hash") != reference.hash:
        return
    where = f"production v{production.version} was trained on {reference.path} (data_hash {reference.hash})"
    if reference.split is None:
        raise UserError(f"--data {reference.path} is not independent: {where}; pass a file no search "
                        f"trained on")
    if _split_of(production) != reference.split:
        raise UserError(f"{where} with another split (seed, validation, test = {_split_of(production)}, "
                        f"not {reference.split}), so the candidate's test split holds production's "
                        f"training events; judge both on independent data: --data FILE --independent-data")


def main(argv: list[str] | None = None) -> int:
    return cli_main(build_parser(), promote, argv)


def promote(args: argparse.Namespace) -> int:
    from calotune.tracking import registry
    from calotune.tracking.mlflow_tracker import resolve_tracking_uri

    if args.to_version and args.candidate_version:
        raise UserError("--to-version and --candidate-version exclude each other: --to-version rolls "
                        "back without judging, --candidate-version judges that version")
    if args.to_version and (args.data is not None or args.independent_data):
        raise UserError("--to-version rolls back without scoring, so --data/--independent-data would "
                        "be ignored; drop them, or promote with --candidate-version to judge")
    if args.independent_data and args.data is None:
        raise UserError("--independent-data needs --data FILE: the held-out file to judge on")
    uri = resolve_tracking_uri(args.tracking_uri, args.home.resolve(), must_exist=True)
    name = args.detector
    registry.resolve(uri, name, alias="candidate" if not (args.to_version or args.candidate_version) else None,
                     version=args.to_version or args.candidate_version)  # unknown model/alias: exit 2 now
    with registry.promotion_lock(uri, name), tempfile.TemporaryDirectory(prefix="calotune-promote-") as tmp:
        return _promote_locked(args, uri, name, Path(tmp))


def _fetch(uri: str, ref, dst: Path) -> tuple[Path | None, dict | None]:
    """(folder, model.json) of a version, or (None, None) if its artifacts are gone."""
    from calotune.artifacts import read_description
    from calotune.tracking.registry import ArtifactsMissing, download

    try:
        folder = download(uri, ref, dst)
    except ArtifactsMissing as exc:
        log.warning("%s", exc)
        return None, None
    return folder, read_description(folder)


def _same_model_space(name: str, a_label: str, a: dict, b_label: str, b: dict) -> None:
    """Refuse to compare or swap models of different detectors or geometries."""
    from calotune.tracking.registry import geometry_differences

    if a.get("detector") != b.get("detector"):
        raise UserError(f"registered model {name!r}: {a_label} is for detector {a.get('detector')!r} but "
                        f"{b_label} for {b.get('detector')!r}; they cannot be compared or replace each "
                        f"other: register them under separate names")
    diff = geometry_differences(a.get("geometry", {}), b.get("geometry", {}))
    if diff:
        raise UserError(f"registered model {name!r}: {a_label} and {b_label} have different "
                        f"{a.get('detector')} geometries ({'; '.join(diff)}); they cannot be compared "
                        f"or replace each other: each geometry needs its own registered name "
                        f"(calotune.tracking.registry.registered_model_name)")


def _promote_locked(args: argparse.Namespace, uri: str, name: str, tmp: Path) -> int:
    """Everything from reading ``production`` to moving it happens under the lock, so two
    promotions at once are serialised and the second compares against the first's result."""
    from calotune.detectors import get_detector
    from calotune.sampling import score_model_streamed
    from calotune.tracking import registry
    from calotune.tracking.mlflow_tracker import user

    production = registry.resolve(uri, name, alias="production", required=False)
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    prod_dir = prod_desc = None
    if args.to_version:
        target = registry.resolve(uri, name, version=args.to_version)
        if production is not None and production.version == target.version:
            log.info("version %s already is production; nothing to do", target.version)
            return 0
        target_dir, target_desc = _fetch(uri, target, tmp / "target")
        if target_dir is None and not args.force:
            raise UserError(f"--to-version {target.version}: the artifacts of {name!r} v{target.version} "
                            f"are missing, so production could not be loaded from it; pass --force to "
                            f"move production there anyway")
        if production is not None:
            prod_dir, prod_desc = _fetch(uri, production, tmp / "production")
        if target_desc is not None and prod_desc is not None:
            _same_model_space(name, f"v{target.version}", target_desc,
                              f"production v{production.version}", prod_desc)
        _move(name, uri, target, {
            "promoted_at": now, "promoted_by": user(), "promotion": "rollback",
            "replaced_version": production.version if production else "none",
            **({"replaced_version_artifacts": "missing"} if production and prod_dir is None else {}),
            **({"artifacts_missing": "true (moved with --force)"} if target_dir is None else {}),
        })
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
    cand_dir, cand_desc = _fetch(uri, candidate, tmp / "candidate")
    if cand_dir is None:
        raise UserError(f"candidate {name!r} v{candidate.version}: its artifacts are missing, so it can "
                        f"be neither scored nor served; register a new candidate (run a search)")
    if production is not None:
        prod_dir, prod_desc = _fetch(uri, production, tmp / "production")
        if prod_dir is None and not args.force:
            raise UserError(f"production v{production.version}'s artifacts are missing, so it cannot be "
                            f"scored against candidate v{candidate.version}; use --force to promote the "
                            f"candidate without scoring production (or --to-version V to roll back)")
        if prod_desc is not None:
            _same_model_space(name, f"candidate v{candidate.version}", cand_desc,
                              f"production v{production.version}", prod_desc)
    detector = get_detector(cand_desc["detector"], **cand_desc["geometry"])
    reference = held_out(candidate, detector, args.data, args.independent_data)
    if prod_dir is not None:
        _check_fair_for_production(production, reference)
    # Streamed: generated batches are reduced to per-event summaries at once, and the held-out
    # reference is summarised once for both models and both model-card plots.
    ref_summary = detector.summarise(reference.showers)
    cand_scores, cand_gen = score_model_streamed(cand_dir, reference.showers, args.seed,
                                                 reference_summary=ref_summary)
    prod_scores, prod_gen = (score_model_streamed(prod_dir, reference.showers, args.seed,
                                                  reference_summary=ref_summary) if prod_dir else (None, None))
    ref_summary = ref_summary.for_plots()  # the cell-sized score inputs are no longer needed
    cand_score = cand_scores[objective]
    prod_score = prod_scores[objective] if prod_scores is not None else None
    if production is None:
        better, kind = True, "first"
    elif prod_score is None:
        better, kind = False, "forced"  # only reachable with --force
    else:
        better = cand_score < prod_score if mode == "min" else cand_score > prod_score
        kind = "better" if better else "forced"
    log.info("held-out %s (%s, %d events of %s, %s): candidate v%s = %.5f, production %s = %s",
             objective, mode, len(reference.showers), reference.path, reference.describe(),
             candidate.version, cand_score, f"v{production.version}" if production else "(none)",
             f"{prod_score:.5f}" if prod_score is not None else
             ("not scored (artifacts missing)" if production else "n/a"))
    promoted = better or args.force
    card = _card(args, name, detector, candidate, production, reference, objective, mode, kind, promoted,
                 (cand_scores, cand_gen), (prod_scores, prod_gen), prod_dir is not None, tmp / "card",
                 ref_summary)
    if not promoted:
        log.info("not promoted: the candidate is not better (use --force to override)")
        _publish_card(uri, name, candidate.version, card)
        return 0
    _move(name, uri, candidate, {
        "promoted_at": now, "promoted_by": user(), "promotion": kind,
        "promotion_objective": objective, "candidate_score": f"{cand_score:.6g}",
        "production_score": (f"{prod_score:.6g}" if prod_score is not None else
                             "not scored: artifacts missing" if production else "none"),
        "replaced_version": production.version if production else "none",
        **({"replaced_version_artifacts": "missing"} if production and prod_dir is None else {}),
        "search": candidate.tags.get("search", ""),
        "promotion_data": str(reference.path), "promotion_data_hash": reference.hash,
        "promotion_data_split": reference.describe(),
    })
    log.info("promoted %r version %s to production", name, candidate.version)
    _publish_card(uri, name, candidate.version, card)
    return 0


def _card(args: argparse.Namespace, name: str, detector, candidate, production, reference: Reference,
          objective: str, mode: str, kind: str, promoted: bool, cand: tuple, prod: tuple, prod_scored: bool,
          out: Path, ref_summary: Any = None) -> Path | None:
    """Write the model card of this decision into ``out``; None (and a warning) if it fails:
    the card documents a decision, it must never block or undo one."""
    from calotune import modelcard
    from calotune.tracking.mlflow_tracker import user

    try:
        floor, halves = modelcard.reference_floor(detector, reference.showers, args.seed)
        # the plots take the reference's summary (made once for the scores) or the sample
        plot_ref = ref_summary if ref_summary is not None else reference.showers
        (cand_scores, cand_gen), (prod_scores, prod_gen) = cand, prod
        cs, ps = f"{cand_scores[objective]:.5g}", (f"{prod_scores[objective]:.5g}" if prod_scores else "")
        floor_text = f"; the reference-vs-reference floor is {floor[objective]:.5g}" if objective in floor else ""
        word = "lower" if mode == "min" else "higher"
        reason = {
            "first": f"First promotion: there was no production model. Candidate v{candidate.version} scored "
                     f"{objective} = {cs} on the held-out data{floor_text}.",
            "better": f"Candidate v{candidate.version} is better than production v{getattr(production, 'version', '')}"
                      f" on {objective} ({word} is better): {cs} against {ps}{floor_text}.",
        }.get(kind, "")
        if not promoted:
            kind = "refused"
            reason = (f"Not promoted: candidate v{candidate.version} scored {objective} = {cs}, not {word} than "
                      f"production v{production.version}'s {ps}{floor_text}. `--force` would override this.")
        elif kind == "forced":
            reason = (f"Promoted with --force without scoring production v{production.version}: its files are "
                      f"missing. Candidate v{candidate.version} scored {objective} = {cs}{floor_text}."
                      if not prod_scored else
                      f"Promoted with --force although candidate v{candidate.version} ({objective} = {cs}) is not "
                      f"{word} than production v{production.version} ({ps}){floor_text}.")
        command = " ".join(["python -m calotune.promote", name,
                            *([f"--candidate-version {args.candidate_version}"] if args.candidate_version else []),
                            *([f"--data {args.data}"] if args.data else []),
                            *(["--independent-data"] if args.independent_data else []),
                            *(["--force"] if args.force else [])])
        n = len(reference.showers)
        card = modelcard.ModelCard(
            model=name, detector=detector.name, objective=objective, mode=mode,
            decision="promoted" if promoted else "not promoted", kind=kind, reason=reason,
            candidate=modelcard.Side("candidate", candidate.version, dict(candidate.tags), cand_scores, n,
                                     modelcard.plot_side(detector, plot_ref, cand_gen, out / "plots-c")),
            production=modelcard.Side(
                "production", production.version if production else None,
                dict(production.tags) if production else {}, prod_scores, n if prod_scores else 0,
                modelcard.plot_side(detector, plot_ref, prod_gen, out / "plots-p") if prod_scores else {},
                note="" if production is None or prod_scored else "not scored: its artifacts are missing"),
            floor=floor, objectives={**detector.objectives(), "gen_time_ms": "min"},  # score_model adds it
            reference_path=str(reference.path),
            reference_hash=reference.hash, reference_split=reference.describe(), n_reference=n,
            floor_sizes=halves, promoted_by=user(), command=command,
            notes=["The floor compares two disjoint random halves of the same held-out reference: what a "
                   "perfect generator could reach with this many events. Every score here has a finite-sample "
                   "bias that shrinks with N (arXiv 2211.10295), so judge both models against the floor at "
                   "this N, not against published values from ~100k events."])
        folder = out / "files"
        modelcard.write_card(card, folder)
        return folder
    except Exception as exc:  # plots or rendering: never let the record block the decision
        log.warning("model card not written: %s: %s", type(exc).__name__, exc)
        return None


def _publish_card(uri: str, name: str, version: str, folder: Path | None) -> None:
    """Log the card on the candidate's run and link it from the version (warning on failure)."""
    from calotune import modelcard

    if folder is None:
        return
    try:
        card_uri = modelcard.publish(uri, name, version, folder)
    except UserError as exc:
        log.warning("model card of %r v%s not logged: %s", name, version, exc)
        return
    log.info("model card: %s (version tag %s)", card_uri, modelcard.TAG_MODEL_CARD)


def _move(name: str, uri: str, ref, tags: dict[str, Any]) -> None:
    """Record the promotion on the version, then move the alias; undo the record if the move
    fails, so the tags never claim a promotion that did not happen."""
    from mlflow.exceptions import MlflowException

    from calotune.tracking.mlflow_tracker import _client, redact, store_errors

    client = _client(uri)
    before = {k: ref.tags[k] for k in PROMOTION_TAGS if k in ref.tags}
    try:
        with store_errors(f"promoting {name!r} v{ref.version} in {redact(uri)}"):
            for key in PROMOTION_TAGS:
                if key in tags:
                    client.set_model_version_tag(name, ref.version, key, str(tags[key]))
                elif key in before:
                    client.delete_model_version_tag(name, ref.version, key)
            client.set_registered_model_alias(name, "production", ref.version)
    except UserError:
        for key in PROMOTION_TAGS:
            try:
                if key in before:
                    client.set_model_version_tag(name, ref.version, key, before[key])
                elif key in tags:
                    client.delete_model_version_tag(name, ref.version, key)
            except MlflowException as exc:
                log.warning("could not restore tag %s of %r v%s: %s", key, name, ref.version, exc)
        raise


if __name__ == "__main__":
    from calotune.cli import exit_now

    exit_now(main())  # without the interpreter's module teardown (calotune.cli.exit_now)
