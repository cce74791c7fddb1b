"""Every recipe in jobs/ parses, is wired to the real calotune CLI, and is consistent.

These recipes run on machines CI does not have (Kubernetes, AWS, Slurm, Docker), so what
can be checked here is checked hard: YAML against its own schema or structure, shell
scripts with ``bash -n`` and, where they can run without the remote system, for real with
a stand-in for the remote tool (``ray``, ``mlflow``) that records its arguments. Every
``python -m calotune.search`` invocation is parsed with the flags that
``python -m calotune.search --help`` lists, so a renamed flag breaks this test, not a
200-GPU job at 3 a.m.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import (
    REPO,
    free_port,
    kill_pids,
    pids_mentioning,
    ray_job_cli_available,
    require,
    tool_env,
)

JOBS = REPO / "jobs"
SHELL_SCRIPTS = [JOBS / "submit.sh", JOBS / "slurm.sbatch", JOBS / "mlflow-server" / "serve.sh"]
SHARED_MOUNT = "/shared"


# --- the CLI the recipes call --------------------------------------------------------
@pytest.fixture(scope="module")
def search_flags() -> set[str]:
    """Long options of ``python -m calotune.search --help``, read from the real help text."""
    proc = subprocess.run([sys.executable, "-m", "calotune.search", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    flags = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", proc.stdout))
    assert {"--address", "--storage-path", "--tracking-uri", "--trials"} <= flags, flags
    return flags


def search_invocations(text: str) -> list[list[str]]:
    """The argument lists after each ``-m calotune.search`` in a shell script or command."""
    joined = re.sub(r"\\\n\s*", " ", text)  # shell line continuations
    found = []
    for line in joined.splitlines():
        words = line.split()
        if not words or words[0].startswith("#") or words[0] in {"echo", "printf"}:
            continue  # comments and messages mention the command; they do not run it
        if "-m calotune.search" not in line:
            continue
        rest = line.split("-m calotune.search", 1)[1]
        rest = re.split(r"\|\||&&|;|\|", rest)[0]  # up to the end of the command
        found.append(shlex.split(rest))
    return found


def check_flags(args: list[str], flags: set[str], where: str) -> list[str]:
    """Assert every ``--flag`` exists; return the flags used (``--x=y`` counts as ``--x``)."""
    used = [a.split("=", 1)[0] for a in args if a.startswith("--")]
    unknown = sorted(set(used) - flags)
    assert not unknown, f"{where}: calotune.search has no {unknown}; it has {sorted(flags)}"
    return used


def parse_search_args(args: list[str]):
    """The recipe's arguments through calotune's own parser (types and choices checked)."""
    from calotune.search import build_parser

    return build_parser().parse_args(args)


def fake_tool(tmp_path: Path, name: str) -> tuple[dict[str, str], Path]:
    """A stand-in ``name`` on PATH that writes its arguments, one per line, to a file."""
    bindir = tmp_path / "fakebin"
    bindir.mkdir(exist_ok=True)
    record = tmp_path / f"{name}.args"
    script = bindir / name
    script.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "{record}"\n')
    script.chmod(0o755)
    env = tool_env()
    env["PATH"] = f"{bindir}{os.pathsep}{env['PATH']}"
    return env, record


def load_all(path: Path) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path} is empty"
    return docs


# --- every script ------------------------------------------------------------------
@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_shell_scripts_parse_and_are_executable(script: Path) -> None:
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, f"{script}: {proc.stderr}"
    assert script.stat().st_mode & stat.S_IXUSR, f"{script} must be executable (chmod +x)"
    assert script.read_text().startswith("#!"), f"{script} needs a shebang line"


def test_every_recipe_is_documented() -> None:
    readme = (JOBS / "README.md").read_text()
    files = [p for p in JOBS.rglob("*") if p.is_file() and p.name != "README.md"
             and "__pycache__" not in p.parts]
    assert len(files) >= 8
    missing = [str(p.relative_to(JOBS)) for p in files if str(p.relative_to(JOBS)) not in readme]
    assert not missing, f"jobs/README.md does not mention {missing}"


def _code_blocks(markdown: str) -> str:
    return "\n".join(re.findall(r"```(?:bash|sh)?\n(.*?)```", markdown, re.S))


def test_every_search_invocation_uses_existing_flags(search_flags: set[str]) -> None:
    sources = {str(p.relative_to(REPO)): p.read_text() for p in SHELL_SCRIPTS}
    sources["jobs/README.md (code blocks)"] = _code_blocks((JOBS / "README.md").read_text())
    rayjob = next(d for d in load_all(JOBS / "kuberay-rayjob.yaml") if d["kind"] == "RayJob")
    sources["jobs/kuberay-rayjob.yaml (entrypoint)"] = rayjob["spec"]["entrypoint"]
    counts = {}
    for where, text in sources.items():
        invocations = search_invocations(text)
        for args in invocations:
            check_flags(args, search_flags, where)
        counts[where] = len(invocations)
    assert counts["jobs/submit.sh"] == counts["jobs/slurm.sbatch"] == 1, counts
    assert counts["jobs/kuberay-rayjob.yaml (entrypoint)"] == 1, counts
    assert counts["jobs/README.md (code blocks)"] >= 1, counts


# --- (a) ray job submit ---------------------------------------------------------------
def test_submit_sh_builds_the_job_submission(tmp_path: Path, search_flags: set[str]) -> None:
    env, record = fake_tool(tmp_path, "ray")
    env.update(RAY_API_SERVER_ADDRESS="http://head.example:8265",
               CALOTUNE_TRACKING_URI="http://mlflow.example:5000",
               CALOTUNE_SHARED="/mnt/team/calotune", RAY_JOB_FLAGS="--no-wait --submission-id s1")
    proc = subprocess.run(["bash", str(JOBS / "submit.sh"), "zdc_swiglu", "--trials", "7"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    argv = record.read_text().splitlines()
    assert argv[:2] == ["job", "submit"]
    sep = argv.index("--")
    job = argv[2:sep]
    assert job[job.index("--address") + 1] == "http://head.example:8265"
    assert Path(job[job.index("--working-dir") + 1]) == REPO
    assert {"--no-wait", "--submission-id", "s1"} <= set(job)
    runtime_env = json.loads(job[job.index("--runtime-env-json") + 1])
    assert runtime_env["env_vars"]["MLFLOW_TRACKING_URI"] == "http://mlflow.example:5000"
    command = argv[sep + 1:]
    assert command[:3] == ["python", "-m", "calotune.search"]
    check_flags(command[3:], search_flags, "jobs/submit.sh")
    args = parse_search_args(command[3:])
    assert args.space == "zdc_swiglu" and args.trials == 7
    assert args.tracking_uri == "http://mlflow.example:5000"
    assert str(args.storage_path) == "/mnt/team/calotune/ray_results"
    assert str(args.home) == "/mnt/team/calotune/home"


def test_submit_sh_without_a_space_prints_usage(tmp_path: Path) -> None:
    env, record = fake_tool(tmp_path, "ray")
    proc = subprocess.run(["bash", str(JOBS / "submit.sh")], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2
    assert "usage:" in proc.stderr
    assert not record.exists(), "nothing may be submitted without a search space"


# --- (b) KubeRay RayJob ---------------------------------------------------------------
def _containers(pod_template: dict[str, Any]) -> list[dict[str, Any]]:
    return pod_template["spec"]["containers"]


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def test_kuberay_rayjob_manifest(search_flags: set[str]) -> None:
    import ray

    docs = load_all(JOBS / "kuberay-rayjob.yaml")
    by_kind = {d["kind"]: d for d in docs}
    assert set(by_kind) == {"PersistentVolumeClaim", "RayJob"}
    pvc, job = by_kind["PersistentVolumeClaim"], by_kind["RayJob"]
    assert pvc["apiVersion"] == "v1" and "ReadWriteMany" in pvc["spec"]["accessModes"], \
        "every pod writes checkpoints to the shared volume: it must be ReadWriteMany"
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True, "an idle GPU cluster must not outlive its search"

    entry = shlex.split(spec["entrypoint"])
    assert entry[:4] == ["python", "-m", "calotune.search", "zdc_swiglu"]
    check_flags(entry[3:], search_flags, "kuberay entrypoint")
    args = parse_search_args(entry[3:])
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["env_vars"]["MLFLOW_TRACKING_URI"] == args.tracking_uri
    assert args.tracking_uri.startswith("http")

    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__, "Ray in the pods must match the pinned Ray"
    head = cluster["headGroupSpec"]["template"]
    groups = cluster["workerGroupSpecs"]
    gpu_groups = [g for g in groups
                  if "nvidia.com/gpu" in _containers(g["template"])[0]["resources"]["limits"]]
    assert gpu_groups, "the worker group must request GPUs"
    for group in groups:
        assert group["replicas"] == group["minReplicas"] == group["maxReplicas"], \
            "the search sizes its concurrency from the cluster it finds when it starts"
    images = set()
    for template in [head, *(g["template"] for g in groups)]:
        container = _containers(template)[0]
        images.add(container["image"])
        env = _env(container)
        assert env.get("RAY_AUTH_MODE") == "token" and "RAY_AUTH_TOKEN" in env
        assert env.get("MLFLOW_TRACKING_URI") == args.tracking_uri
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        shared = [name for name, path in mounts.items() if path == SHARED_MOUNT]
        assert shared, f"{container['name']} must mount the shared volume at {SHARED_MOUNT}"
        claim = volumes[shared[0]]["persistentVolumeClaim"]["claimName"]
        assert claim == pvc["metadata"]["name"]
    submitter = _containers(spec["submitterPodTemplate"])[0]
    images.add(submitter["image"])
    assert _env(submitter).get("RAY_AUTH_MODE") == "token", "the submitter must be let in too"
    assert len(images) == 1, f"head, workers and submitter must run one image, got {images}"
    for path in (args.storage_path, args.home):
        assert str(path).startswith(SHARED_MOUNT + "/"), f"{path} is not on the shared volume"


def test_dockerfile_matches_the_pinned_ray() -> None:
    import ray

    text = (JOBS / "Dockerfile").read_text()
    base = re.search(r"^FROM\s+(\S+)", text, re.M)
    assert base and base.group(1).startswith(f"rayproject/ray:{ray.__version__}-"), base
    assert re.search(r"pip install .*torch==2\.13\.0 -e '\.\[team\]'", text)


# --- (c) Ray cluster launcher ---------------------------------------------------------
def test_cluster_launcher_yaml_is_valid_for_ray_up() -> None:
    import jsonschema
    import ray.autoscaler

    config = yaml.safe_load((JOBS / "cluster.yaml").read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)  # the schema `ray up` validates against
    # ...and what `ray up` does with it before launching anything: fill defaults, validate.
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(config))

    types = config["available_node_types"]
    assert config["head_node_type"] in types
    workers = {k: v for k, v in types.items() if k != config["head_node_type"]}
    gpu = [v for v in workers.values() if re.match(r"(g|p)\d", v["node_config"]["InstanceType"])]
    assert gpu, "a GPU worker type (g*/p* instances) is expected"
    assert all(w["min_workers"] == w["max_workers"] for w in workers.values())
    assert types[config["head_node_type"]]["resources"].get("CPU") == 0, "no trials on the head"
    setup = " ".join(config["setup_commands"])
    assert "pip install" in setup and "torch==2.13.0 -e" in setup
    assert SHARED_MOUNT in setup, "every node must mount the shared storage"
    assert config["file_mounts"].get("~/calotune") == "."
    assert "~/.ray/auth_token" in config["file_mounts"], "every node needs the cluster token"
    head_start = " ".join(config["head_start_ray_commands"])
    worker_start = " ".join(config["worker_start_ray_commands"])
    assert "ray start --head" in head_start and "RAY_AUTH_MODE=token" in head_start
    assert "--address=$RAY_HEAD_IP:6379" in worker_start and "RAY_AUTH_MODE=token" in worker_start


# --- (d) Slurm --------------------------------------------------------------------------
SBATCH_OPTIONS = {
    "job-name", "nodes", "ntasks", "ntasks-per-node", "cpus-per-task", "gpus-per-task",
    "gpus-per-node", "gres", "mem", "mem-per-cpu", "exclusive", "time", "output", "error",
    "partition", "account", "qos", "constraint", "mail-type", "mail-user",
}


def test_slurm_batch_script(search_flags: set[str]) -> None:
    text = (JOBS / "slurm.sbatch").read_text()
    lines = text.splitlines()
    directives = [i for i, ln in enumerate(lines) if ln.startswith("#SBATCH")]
    first_command = next(i for i, ln in enumerate(lines)
                         if ln.strip() and not ln.startswith("#"))
    assert directives and max(directives) < first_command, \
        "sbatch ignores #SBATCH lines after the first command"
    options = {}
    for i in directives:
        match = re.fullmatch(r"#SBATCH --([a-z-]+)(?:=(\S+))?(\s+#.*)?", lines[i].strip())
        assert match, f"line {i + 1}: not a --long-option: {lines[i]!r}"
        assert match.group(1) in SBATCH_OPTIONS, f"line {i + 1}: unknown option {match.group(1)}"
        options[match.group(1)] = match.group(2)
    assert int(options["nodes"]) >= 2, "a cluster recipe needs at least a head and a worker"
    assert options.get("ntasks-per-node") == "1", "one Ray node (one srun task) per host"

    body = re.sub(r"\\\n\s*", " ", text)
    assert re.search(r"srun .*-w \"\$\{head_node\}\" .*ray start --head --block", body)
    assert re.search(r"srun .*--exclude=\"\$\{head_node\}\" .*ray start --block\s+--address=", body)
    assert "RAY_AUTH_TOKEN" in body and "RAY_AUTH_MODE=token" in body
    assert re.search(r"trap cleanup EXIT", body), "the Ray cluster must be stopped on every exit"
    [invocation] = search_invocations(text)
    used = check_flags(invocation, search_flags, "jobs/slurm.sbatch")
    assert {"--address", "--storage-path", "--home"} <= set(used)


# --- (e) MLflow server ----------------------------------------------------------------
def test_serve_sh_runs_mlflow_with_postgres_and_served_artifacts(tmp_path: Path) -> None:
    env, record = fake_tool(tmp_path, "mlflow")
    env.update(MLFLOW_BACKEND_STORE_URI="postgresql://mlflow:s3cret@db.example:5432/mlflow",
               MLFLOW_ARTIFACTS_DESTINATION=str(tmp_path / "artifacts"),
               MLFLOW_SERVER_ALLOWED_HOSTS="mlflow.internal,mlflow.internal:5000", MLFLOW_PORT="5055")
    proc = subprocess.run(["bash", str(JOBS / "mlflow-server" / "serve.sh")], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "s3cret" not in proc.stdout + proc.stderr, "the database password must never be printed"
    argv = record.read_text().splitlines()
    assert argv[0] == "server"

    def opt(name: str) -> str:
        return argv[argv.index(name) + 1]

    # SQLAlchemy 2.1 maps bare postgresql:// to psycopg 3; the team extra ships psycopg2.
    assert opt("--backend-store-uri") == "postgresql+psycopg2://mlflow:s3cret@db.example:5432/mlflow"
    assert opt("--artifacts-destination") == str(tmp_path / "artifacts")
    assert (tmp_path / "artifacts").is_dir()
    assert "--serve-artifacts" in argv
    assert opt("--port") == "5055" and opt("--host") == "0.0.0.0"
    assert opt("--allowed-hosts") == "mlflow.internal,mlflow.internal:5000"


@pytest.mark.parametrize("uri", [None, "sqlite:///mlflow.db", "mysql://u:p@h/db"])
def test_serve_sh_refuses_anything_but_postgres(tmp_path: Path, uri: str | None) -> None:
    env, record = fake_tool(tmp_path, "mlflow")
    env.pop("MLFLOW_BACKEND_STORE_URI", None)
    if uri:
        env["MLFLOW_BACKEND_STORE_URI"] = uri
    proc = subprocess.run(["bash", str(JOBS / "mlflow-server" / "serve.sh")], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "MLFLOW_BACKEND_STORE_URI" in proc.stderr
    assert not record.exists(), "no server may start on a store the recipe does not support"


def test_init_db_needs_a_password() -> None:
    env = tool_env()
    env.pop("MLFLOW_DB_PASSWORD", None)
    proc = subprocess.run([sys.executable, str(JOBS / "mlflow-server" / "init_db.py")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "MLFLOW_DB_PASSWORD" in proc.stderr


def test_docker_compose_wires_mlflow_to_postgres() -> None:
    import mlflow

    compose = yaml.safe_load((JOBS / "mlflow-server" / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"db", "mlflow"}
    db, server = services["db"], services["mlflow"]
    assert db["image"].startswith("postgres:") and "healthcheck" in db
    assert server["depends_on"]["db"]["condition"] == "service_healthy"
    env = server["environment"]
    uri = env["MLFLOW_BACKEND_STORE_URI"]
    match = re.fullmatch(r"postgresql://(\w+):\$\{MLFLOW_DB_PASSWORD\}@db:5432/(\w+)", uri)
    assert match, uri
    assert match.groups() == (db["environment"]["POSTGRES_USER"], db["environment"]["POSTGRES_DB"])
    assert "MLFLOW_DB_PASSWORD" in db["environment"]["POSTGRES_PASSWORD"]
    inline = server["build"]["dockerfile_inline"]
    version = re.search(r"FROM ghcr\.io/mlflow/mlflow:v(\S+)", inline)
    assert version and version.group(1) == mlflow.__version__, "server and clients: one MLflow"
    assert "psycopg2" in inline and "COPY serve.sh" in inline
    assert server["command"][-1].endswith("serve-mlflow"), "the container runs serve.sh"
    artifacts_mount = [v for v in server["volumes"] if v.endswith(":" + env["MLFLOW_ARTIFACTS_DESTINATION"])]
    assert artifacts_mount, "the artifact store must be a volume, not the container's disk"
    assert "db" in compose["volumes"]
    example = (JOBS / "mlflow-server" / "env.example").read_text()
    assert re.search(r"^MLFLOW_DB_PASSWORD=", example, re.M)


# --- (d, for real) the Slurm script on this machine, with stand-ins for srun/scontrol ------
FAKE_SRUN = r"""#!/usr/bin/env bash
# srun on one machine: run the command once per task, in the background, with SLURM_NODEID
# 0 for the head step (-w) and 1.. for the step that excludes the head; SIGTERM is passed
# on to the tasks, as srun does.
ntasks=1
first=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --ntasks=*) ntasks="${1#*=}"; shift ;;
        --exclude=*) first=1; shift ;;
        -w) shift 2 ;;
        --*) shift ;;
        *) break ;;
    esac
done
pids=()
for ((i = 0; i < ntasks; i++)); do
    SLURM_NODEID=$((first + i)) "$@" &
    pids+=($!)
done
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM INT
for pid in "${pids[@]}"; do
    while kill -0 "$pid" 2>/dev/null; do wait "$pid" || true; done
done
"""

FAKE_SCONTROL = r"""#!/usr/bin/env bash
# scontrol show hostnames A,B -> one name per line
[[ "$1 $2" == "show hostnames" ]] || exit 1
tr ',' '\n' <<< "$3"
"""


@pytest.mark.slow
def test_slurm_script_runs_a_search_on_a_two_node_allocation(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    require(ray_job_cli_available(), "ray[default] is needed (pip install -e '.[test]')")
    bindir = tmp_path / "slurm-bin"
    bindir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bindir / name).write_text(text)
        (bindir / name).chmod(0o755)
    ray_tmp = Path(tempfile.mkdtemp(prefix="ct-slurm-", dir="/tmp"))
    shared = tmp_path / "shared"
    env = tool_env(
        SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="node-a,node-b", SLURM_CPUS_PER_TASK="1",
        SLURM_SUBMIT_DIR=str(REPO), CALOTUNE_VENV=sys.prefix, CALOTUNE_SHARED=str(shared),
        CALOTUNE_TRACKING_URI="", CALOTUNE_ARGS="--trials 2 --max-epochs 1 --events 400",
        RAY_TMP=f"{ray_tmp}/r", RAY_PORT=str(free_port()), RAY_START_TIMEOUT_S="180",
        RAY_HEAD_ARGS=(f"--dashboard-port={free_port()} --ray-client-server-port={free_port()} "
                       f"--dashboard-agent-listen-port={free_port()} --object-store-memory=200000000"),
        RAY_WORKER_ARGS=f"--dashboard-agent-listen-port={free_port()} --object-store-memory=200000000",
    )
    env["PATH"] = f"{bindir}{os.pathsep}{env['PATH']}"
    try:
        proc = subprocess.run(["bash", str(JOBS / "slurm.sbatch")], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=420, start_new_session=True)
        leftovers = pids_mentioning(str(ray_tmp))
    finally:
        kill_pids(pids_mentioning(str(ray_tmp)))
        shutil.rmtree(ray_tmp, ignore_errors=True)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-8000:]
    assert "calotune: 2 Ray node(s) up" in output
    assert "search finished with status 0" in output
    assert not leftovers, "the script must stop every Ray process it started"
    # No tracking URI given: SQLite in the shared --home, and Tune's state on shared storage.
    uri = f"sqlite:///{shared / 'home' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.get_experiment_by_name("zdc_swiglu")
    trials = [r for r in client.search_runs([exp.experiment_id])
              if r.data.tags.get("calotune.kind") == "trial"]
    assert len(trials) == 2
    assert list((shared / "ray_results").glob("zdc_swiglu-*/experiment_state-*.json"))
