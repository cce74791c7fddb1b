"""Hostile input to tracking, registry and promotion: each test reproduces one failure class.

1. tracking URIs that cannot really be opened, or stores that vanish with the command;
2. two processes on one store at once (same search name; a fresh SQLite store);
3. promotion judged on data the search did not record;
4. candidate and production of different geometries under one registered name;
5. production (or a rollback target) whose artifacts are gone;
6. store failures the user can fix surface as one ``error:`` line, exit 2.

Everything is real: SQLite stores in temporary folders, models saved with
``calotune.artifacts.save_model``, concurrent work in separate processes released together
by a barrier. No test starts Ray.
"""

from __future__ import annotations

import importlib.util
import multiprocessing as mp
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import uuid
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import pytest
import torch

from calotune.artifacts import WEIGHTS, save_model
from calotune.data.splits import split
from calotune.detectors import get_detector
from calotune.errors import UserError
from calotune.models.registry import build_model
from calotune.promote import main as promote_main
from calotune.sampling import score_model
from calotune.tracking.mlflow_tracker import Tracker, check_tracking_uri, resolve_tracking_uri
from calotune.tracking.registry import file_hash, registered_model_name
from tests.helpers import mlflow_client

GEOMETRY = {"ecal_nx": 4, "ecal_ny": 4, "hcal_nx": 4, "hcal_ny": 4, "hcal_nz": 6}
# Same cell counts as GEOMETRY (16 ECAL, 96 HCAL), another layout: the silent-comparison case.
SAME_COUNTS = {"ecal_nx": 2, "ecal_ny": 8, "hcal_nx": 8, "hcal_ny": 2, "hcal_nz": 6}
# Other cell counts: the crash case.
OTHER_COUNTS = {"ecal_nx": 3, "ecal_ny": 3, "hcal_nx": 3, "hcal_ny": 3, "hcal_nz": 4}
PARAMS = {"hidden_width": 16}
SPAWN = mp.get_context("spawn")


# --- fixtures and helpers ------------------------------------------------------------
def _model(root: Path, name: str, geometry: dict, seed: int) -> Path:
    detector = get_detector("zdc", **geometry)
    torch.manual_seed(seed)
    return save_model(root / name, build_model("zdc_swiglu", PARAMS, detector), family="zdc_swiglu",
                      detector=detector, params=PARAMS)


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Untrained models (enough to be scored) and two different data files of GEOMETRY."""
    root = tmp_path_factory.mktemp("assets")
    detector = get_detector("zdc", **GEOMETRY)
    data, other = root / "data.h5", root / "other.h5"
    detector.write(data, detector.synthesize(200, seed=5))
    detector.write(other, detector.synthesize(200, seed=6))
    return {"a": _model(root, "a", GEOMETRY, 0), "b": _model(root, "b", GEOMETRY, 1),
            "same_counts": _model(root, "same_counts", SAME_COUNTS, 2),
            "other_counts": _model(root, "other_counts", OTHER_COUNTS, 3),
            "data": data, "other": other}


def _uri(home: Path) -> str:
    return f"sqlite:///{home / 'mlflow.db'}"


def _register(home: Path, model: Path, data: Path | None, name: str = "zdc", **tags) -> str:
    """Register ``model`` as a new version of ``name`` (alias candidate), as a search does."""
    home.mkdir(parents=True, exist_ok=True)
    tracker = Tracker(_uri(home), "hostile", home / "artifacts")
    tracker.create_search(f"search-{uuid.uuid4().hex[:8]}", {}, {})
    run = tracker.trial_run("t0", {})
    tracker.log_artifacts(run, model, "model")
    recorded = {"objective": "mean_separation", "mode": "min", "split_seed": 0, "search": "test"}
    if data is not None:
        recorded.update(data_path=str(data), data_hash=file_hash(data))
    return tracker.register(run, "model", name, "candidate", {**recorded, **tags})


def _aliases(home: Path, name: str = "zdc") -> dict[str, str]:
    return {k: str(v) for k, v in mlflow_client(home).get_registered_model(name).aliases.items()}


def _tags(home: Path, version: str, name: str = "zdc") -> dict[str, str]:
    return dict(mlflow_client(home).get_model_version(name, version).tags)


def _delete_artifacts(home: Path, version: str, what: str = "all", name: str = "zdc") -> None:
    """Remove a version's run artifacts on disk, as a careless clean-up would."""
    client = mlflow_client(home)
    run_id = client.get_model_version(name, version).run_id
    folder = Path(url2pathname(urlparse(client.get_run(run_id).info.artifact_uri).path))
    if what == "all":
        shutil.rmtree(folder)
    else:
        (folder / "model" / what).unlink()


def _promote(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str]:
    code = promote_main(list(args))
    return code, capsys.readouterr().err


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# --- 1. tracking URIs ----------------------------------------------------------------
def _bad_uris(tmp: Path) -> dict[str, tuple[str, str]]:
    """case -> (URI, text the message must contain); the files they point at are made here."""
    text = tmp / "notes.txt"
    text.write_text("not a database\n")
    other_app = tmp / "other-app.db"
    con = sqlite3.connect(other_app)
    con.execute("CREATE TABLE accounts (id INTEGER)")
    con.commit()
    con.close()
    (tmp / "folder.db").mkdir()
    return {
        "in-memory sqlite://": ("sqlite://", "in-memory"),
        "in-memory :memory:": ("sqlite:///:memory:", "in-memory"),
        "in-memory uri mode": (f"sqlite:///file:{tmp}/x.db?mode=memory&uri=true", "in-memory"),
        "relative sqlite": ("sqlite:///rel/mlflow.db", "relative"),
        "relative sqlite bare": ("sqlite:///mlflow.db", "relative"),
        "file:relative": ("file:relative", "file store"),
        "./mlruns": ("./mlruns", "file store"),
        "absolute file:": (f"file://{tmp}/mlruns", "file store"),
        "not sqlite (text)": (f"sqlite:///{text}", "is not a SQLite database"),
        "not sqlite (hdf5)": (f"sqlite:///{tmp / 'data.h5'}", "is not a SQLite database"),
        "other app's sqlite": (f"sqlite:///{other_app}", "not an MLflow store"),
        "a directory": (f"sqlite:///{tmp / 'folder.db'}", "is a folder"),
        "missing folder": (f"sqlite:///{tmp / 'nope' / 'mlflow.db'}", "does not exist"),
        "unwritable folder": ("sqlite:////proc/self/mlflow.db", "not writable"),
        "unknown scheme ftp": ("ftp://host/x", "unsupported scheme 'ftp'; use sqlite:////"),
        "unknown scheme s3": ("s3://bucket/mlflow", "unsupported scheme 's3'; use sqlite:////"),
        "postgres:// alias": ("postgres://u@127.0.0.1:9/db", "postgresql://"),
        "empty": ("   ", "empty"),
        "dead database": ("postgresql+psycopg2://u:hunter2@127.0.0.1:9/db", "cannot connect"),
        "unknown driver": ("postgresql+nosuchdriver://u@127.0.0.1:9/db", "no driver"),
    }


@pytest.fixture
def bad_uris(tmp_path: Path, assets) -> dict[str, tuple[str, str]]:
    shutil.copy(assets["data"], tmp_path / "data.h5")
    return _bad_uris(tmp_path)


def _snapshot(folder: Path) -> dict[str, bytes | None]:
    return {str(p): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


URI_CASES = ["in-memory sqlite://", "in-memory :memory:", "in-memory uri mode", "relative sqlite",
             "relative sqlite bare", "file:relative", "./mlruns", "absolute file:", "not sqlite (text)",
             "not sqlite (hdf5)", "other app's sqlite", "a directory", "missing folder",
             "unwritable folder", "unknown scheme ftp", "unknown scheme s3", "postgres:// alias",
             "empty", "dead database", "unknown driver"]


@pytest.mark.parametrize("case", URI_CASES)
def test_bad_tracking_uri_is_refused_before_anything_is_written(
        case: str, bad_uris, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    uri, expected = bad_uris[case]
    if case == "dead database" and not importlib.util.find_spec("psycopg2"):
        pytest.skip("psycopg2 is not installed (the driver check covers this case)")
    monkeypatch.chdir(tmp_path)
    before = _snapshot(tmp_path)
    with pytest.raises(UserError) as err:
        check_tracking_uri(uri)
    message = str(err.value)
    assert message.startswith("--tracking-uri") and expected in message, message
    assert "hunter2" not in message, "a password must never be echoed"
    with pytest.raises(UserError):
        resolve_tracking_uri(uri, tmp_path / "home", must_exist=False)
    assert _snapshot(tmp_path) == before, "a refused URI must leave every file as it was"


@pytest.mark.parametrize("uri", ["sqlite://", "sqlite:///:memory:", "sqlite:///rel.db"])
def test_environment_uri_is_named_as_such(uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(UserError, match=r"^MLFLOW_TRACKING_URI=.*\(from the environment\).*unset MLFLOW_TRACKING_URI"):
        resolve_tracking_uri(None, tmp_path, must_exist=False)


@pytest.mark.parametrize("scheme", ["postgresql", "postgresql+pg8000", "postgresql+asyncpg", "mysql",
                                    "mysql+pymysql", "mysql+mysqlconnector"])
def test_database_uri_without_its_driver_is_refused(scheme: str) -> None:
    from sqlalchemy.engine import make_url

    dialect = make_url(f"{scheme}://u@127.0.0.1:9/db").get_dialect()
    try:
        dialect.import_dbapi()
    except ImportError as exc:
        module = exc.name.split(".")[0]
    else:
        pytest.skip(f"the driver of {scheme}:// is installed here")
    with pytest.raises(UserError, match=rf"^--tracking-uri {re.escape(scheme)}://.*driver '{module}'.*pip install"):
        check_tracking_uri(f"{scheme}://u@127.0.0.1:9/db")


def test_unwritable_folder_by_permissions(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root writes through permission bits (the /proc case covers a real refusal)")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        with pytest.raises(UserError, match="not writable"):
            check_tracking_uri(f"sqlite:///{locked / 'mlflow.db'}")
    finally:
        locked.chmod(0o755)


def test_good_sqlite_uris_are_accepted(tmp_path: Path) -> None:
    fresh = tmp_path / "fresh.db"
    check_tracking_uri(f"sqlite:///{fresh}")
    assert not fresh.exists(), "checking must not create the store"
    (tmp_path / "empty.db").touch()  # SQLite treats an empty file as an empty database
    check_tracking_uri(f"sqlite:///{tmp_path / 'empty.db'}")
    Tracker(f"sqlite:///{fresh}", "ok")
    check_tracking_uri(f"sqlite:///{fresh}", must_exist=True)


def test_reading_commands_refuse_a_store_that_does_not_exist(tmp_path: Path, capsys) -> None:
    missing = tmp_path / "typo.db"
    code, err = _promote(capsys, "zdc", "--tracking-uri", f"sqlite:///{missing}")
    assert code == 2 and "no MLflow store" in _one_error_line(err)
    assert not missing.exists(), "promote must not create an empty store"


@pytest.mark.parametrize("uri", ["sqlite://", "sqlite:///:memory:", "sqlite:///mlflow.db", "./mlruns"])
def test_search_refuses_a_vanishing_store_before_writing(uri: str, tmp_path: Path, monkeypatch, capsys) -> None:
    """The reported case: the search printed a registered version, exited 0, and it all vanished."""
    from calotune.search import main as search_main

    monkeypatch.chdir(tmp_path)
    code = search_main(["zdc_swiglu_tiny", "--home", str(tmp_path / "home"), "--tracking-uri", uri])
    assert code == 2 and "--tracking-uri" in _one_error_line(capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == [], "nothing may be written"


# --- 2. concurrency -------------------------------------------------------------------
def _open_and_create(uri: str, search: str, barrier, results) -> None:
    """Child process: open the store and create a search, released together with the others."""
    from calotune.errors import UserError
    from calotune.tracking.mlflow_tracker import Tracker

    barrier.wait(timeout=120)
    try:
        Tracker(uri, "race").create_search(search, {"pid": os.getpid()}, {})
        results.put("created")
    except UserError as exc:
        results.put(f"UserError: {exc}")
    except BaseException as exc:  # the failure under test: report it, do not hang the parent
        results.put(f"CRASH {type(exc).__name__}: {exc}")


def _race(uri: str, names: list[str]) -> list[str]:
    barrier, results = SPAWN.Barrier(len(names)), SPAWN.Queue()
    procs = [SPAWN.Process(target=_open_and_create, args=(uri, name, barrier, results)) for name in names]
    for p in procs:
        p.start()
    out = [results.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    return out


def _search_runs(uri: str, name: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("race")
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`calotune.search` = '{name}'")


def test_fresh_sqlite_store_opened_by_three_processes_at_once(tmp_path: Path) -> None:
    uri = _uri(tmp_path)
    out = _race(uri, ["s1", "s2", "s3"])
    assert out == ["created"] * 3, out
    for name in ("s1", "s2", "s3"):
        assert len(_search_runs(uri, name)) == 1


def test_same_search_name_at_once_never_merges(tmp_path: Path) -> None:
    uri = _uri(tmp_path)
    Tracker(uri, "race")  # the store exists: this test is about the run name only
    out = _race(uri, ["zdc_swiglu-20260101-120000"] * 3)
    assert out.count("created") == 1, out
    assert all("UserError" in o and "zdc_swiglu-20260101-120000" in o for o in out if o != "created"), out
    runs = _search_runs(uri, "zdc_swiglu-20260101-120000")
    assert len(runs) == 1 and len(runs[0].data.params) == 1, "one run, written by one process"
    names = {m.name for m in mlflow_client(tmp_path).search_registered_models()}
    assert names == set(), "the creation lock must be released"


def test_create_refuses_an_existing_name_and_attach_needs_one(tmp_path: Path) -> None:
    tracker = Tracker(_uri(tmp_path), "race")
    run_id = tracker.create_search("s", {"a": 1}, {})
    with pytest.raises(UserError, match=r"search named 's' already exists.*--resume"):
        Tracker(_uri(tmp_path), "race").create_search("s", {"a": 2}, {})
    with pytest.raises(UserError, match=r"no search named 'other'.*without --resume"):
        Tracker(_uri(tmp_path), "race").attach_search("other")
    other = Tracker(_uri(tmp_path), "race")
    tracker.end_search("KILLED")
    assert other.attach_search("s", reopen=True) == run_id
    assert mlflow_client(tmp_path).get_run(run_id).info.status == "RUNNING"
    assert mlflow_client(tmp_path).get_run(run_id).data.params == {"a": "1"}


def test_deleted_experiment_is_a_user_error(tmp_path: Path) -> None:
    tracker = Tracker(_uri(tmp_path), "gone")
    mlflow_client(tmp_path).delete_experiment(tracker.experiment_id)
    with pytest.raises(UserError, match=r"experiment 'gone'.*deleted.*restore"):
        Tracker(_uri(tmp_path), "gone")


# --- 3. data the search recorded ---------------------------------------------------------
def test_changed_search_data_is_refused(tmp_path: Path, assets, capsys) -> None:
    home, data = tmp_path / "home", tmp_path / "data.h5"
    shutil.copy(assets["data"], data)
    _register(home, assets["a"], data)
    shutil.copy(assets["other"], data)  # same path, other events (a regenerated file)
    code, err = _promote(capsys, "zdc", "--home", str(home))
    line = _one_error_line(err)
    assert code == 2 and "changed since the search" in line and "--independent-data" in line
    assert "production" not in _aliases(home)


def test_other_file_needs_independent_flag(tmp_path: Path, assets, capsys) -> None:
    home = tmp_path / "home"
    version = _register(home, assets["a"], assets["data"])
    code, err = _promote(capsys, "zdc", "--home", str(home), "--data", str(assets["other"]))
    assert code == 2 and "--independent-data" in _one_error_line(err)
    assert "production" not in _aliases(home)
    code, err = _promote(capsys, "zdc", "--home", str(home), "--independent-data")
    assert code == 2 and "needs --data" in _one_error_line(err)
    code, err = _promote(capsys, "zdc", "--home", str(home), "--data", str(assets["data"]),
                         "--independent-data")
    assert code == 2 and "not independent data" in _one_error_line(err)

    assert _promote(capsys, "zdc", "--home", str(home), "--data", str(assets["other"]),
                    "--independent-data")[0] == 0
    tags = _tags(home, version)
    assert tags["promotion_data_hash"] == file_hash(assets["other"]) != tags["data_hash"]
    assert tags["promotion_data_split"].startswith("whole file")


def test_same_file_elsewhere_is_judged_on_the_held_out_split(tmp_path: Path, assets, capsys) -> None:
    home, copy = tmp_path / "home", tmp_path / "copy.h5"
    version = _register(home, assets["a"], assets["data"])
    shutil.copy(assets["data"], copy)
    assert _promote(capsys, "zdc", "--home", str(home), "--data", str(copy))[0] == 0
    tags = _tags(home, version)
    detector = get_detector("zdc", **GEOMETRY)
    test_split = split(detector.read(copy), seed=0).test
    expected = score_model(assets["a"], test_split, 0)[0]["mean_separation"]
    assert float(tags["candidate_score"]) == pytest.approx(expected, rel=1e-5), \
        "judged on the whole file (training events included) instead of the test split"
    assert tags["promotion_data_hash"] == tags["data_hash"] and tags["promotion_data_split"].startswith("test split")


def test_unrecorded_hash_or_other_split_is_refused(tmp_path: Path, assets, capsys) -> None:
    home = tmp_path / "home"
    _register(home, assets["a"], None, data_path=str(assets["data"]))  # an old version: no data_hash
    code, err = _promote(capsys, "zdc", "--home", str(home))
    assert code == 2 and "no recorded data_hash" in _one_error_line(err)

    home2 = tmp_path / "home2"
    _register(home2, assets["a"], assets["data"], split_seed=7)
    assert _promote(capsys, "zdc", "--home", str(home2))[0] == 0
    _register(home2, assets["b"], assets["data"])  # same file, split seed 0: overlaps v1's training
    code, err = _promote(capsys, "zdc", "--home", str(home2))
    assert code == 2 and "holds production's training events" in _one_error_line(err)
    assert _aliases(home2)["production"] == "1"


# --- 4. geometries under one name ------------------------------------------------------
def test_registered_model_name_separates_geometries() -> None:
    default = get_detector("zdc").geometry_dict()
    tiny = get_detector("zdc", **GEOMETRY).geometry_dict()
    assert registered_model_name("zdc", default, default) == "zdc"
    assert registered_model_name("zdc", dict(reversed(default.items())), default) == "zdc"
    name = registered_model_name("zdc", tiny, default)
    assert name.startswith("zdc-g") and len(name) == len("zdc-g") + 8
    assert name == registered_model_name("zdc", dict(reversed(tiny.items())), default), "stable"
    same_counts = get_detector("zdc", **SAME_COUNTS).geometry_dict()
    assert registered_model_name("zdc", same_counts, default) not in {"zdc", name}
    cc = get_detector("calochallenge-2").geometry_dict()
    assert registered_model_name("calochallenge-2", cc, cc) == "calochallenge-2"


@pytest.mark.parametrize("other", ["same_counts", "other_counts"])
def test_different_geometries_are_never_compared(other: str, tmp_path: Path, assets, capsys) -> None:
    home = tmp_path / "home"
    detector = get_detector("zdc", **(SAME_COUNTS if other == "same_counts" else OTHER_COUNTS))
    data = tmp_path / "other-geometry.h5"
    detector.write(data, detector.synthesize(120, seed=3))
    v1 = _register(home, assets["a"], assets["data"])
    assert _promote(capsys, "zdc", "--home", str(home))[0] == 0
    v2 = _register(home, assets[other], data)
    for extra in ([], ["--force"]):
        code, err = _promote(capsys, "zdc", "--home", str(home), *extra)
        line = _one_error_line(err)
        assert code == 2 and f"candidate v{v2}" in line and f"production v{v1}" in line
        assert "ecal_nx" in line and "geometr" in line
    assert _aliases(home)["production"] == v1
    code, err = _promote(capsys, "zdc", "--home", str(home), "--to-version", v2)
    assert code == 2 and "geometr" in _one_error_line(err)
    assert _aliases(home)["production"] == v1 and "promotion" not in _tags(home, v2)


# --- 5. artifacts that are gone ----------------------------------------------------------
@pytest.mark.parametrize("gone", ["all", WEIGHTS])
def test_missing_production_artifacts(gone: str, tmp_path: Path, assets, capsys) -> None:
    home = tmp_path / "home"
    v1 = _register(home, assets["a"], assets["data"])
    assert _promote(capsys, "zdc", "--home", str(home))[0] == 0
    v2 = _register(home, assets["b"], assets["data"])
    _delete_artifacts(home, v1, gone)
    code, err = _promote(capsys, "zdc", "--home", str(home))
    line = _one_error_line(err)
    assert code == 2 and f"production v{v1}'s artifacts are missing" in line and "--force" in line
    assert _aliases(home)["production"] == v1

    assert _promote(capsys, "zdc", "--home", str(home), "--force")[0] == 0
    assert _aliases(home)["production"] == v2
    tags = _tags(home, v2)
    assert tags["promotion"] == "forced" and tags["replaced_version"] == v1
    assert tags["production_score"].startswith("not scored") and tags["replaced_version_artifacts"] == "missing"


def test_rollback_to_a_version_without_artifacts(tmp_path: Path, assets, capsys) -> None:
    home = tmp_path / "home"
    v1 = _register(home, assets["a"], assets["data"])
    assert _promote(capsys, "zdc", "--home", str(home))[0] == 0
    v2 = _register(home, assets["b"], assets["data"])
    assert _promote(capsys, "zdc", "--home", str(home), "--force")[0] == 0
    _delete_artifacts(home, v1)
    code, err = _promote(capsys, "zdc", "--home", str(home), "--to-version", v1)
    line = _one_error_line(err)
    assert code == 2 and f"v{v1}" in line and "missing" in line and "--force" in line
    assert _aliases(home)["production"] == v2
    assert _promote(capsys, "zdc", "--home", str(home), "--to-version", v1, "--force")[0] == 0
    assert _aliases(home)["production"] == v1
    tags = _tags(home, v1)
    assert tags["promotion"] == "rollback" and tags["artifacts_missing"].startswith("true")
    assert "candidate_score" not in tags, "tags of v1's earlier promotion must not linger"


def test_missing_candidate_artifacts_cannot_be_forced(tmp_path: Path, assets, capsys) -> None:
    home = tmp_path / "home"
    v1 = _register(home, assets["a"], assets["data"])
    _delete_artifacts(home, v1)
    code, err = _promote(capsys, "zdc", "--home", str(home), "--force")
    assert code == 2 and "artifacts are missing" in _one_error_line(err)
    assert "production" not in _aliases(home)


# --- 6. store failures are one line --------------------------------------------------------
def test_store_of_unknown_schema_is_one_line(tmp_path: Path, assets) -> None:
    home = tmp_path / "home"
    _register(home, assets["a"], assets["data"])
    con = sqlite3.connect(home / "mlflow.db")
    con.execute("UPDATE alembic_version SET version_num = 'ffffffffffff'")  # a newer MLflow's store
    con.commit()
    con.close()
    proc = subprocess.run([sys.executable, "-m", "calotune.promote", "zdc", "--home", str(home)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and _one_error_line(proc.stderr).startswith("error: tracking store")
