"""deploy/: static checks of every file, and one end-to-end run on a real local Prefect server.

Static (no Docker, no Kubernetes here): prefect.yaml against Prefect's own schema, the work-pool job
templates against the server's validation (every placeholder declared) and rendered as the worker
would, the Dockerfile's pins, the accelerate multi-node config through accelerate's own loader.

End to end (slow): `prefect server start` on 127.0.0.1 (SQLite in a temp PREFECT_HOME), the process
work pool from deploy/process-pool.json, a process worker, `prefect deploy` of the `nightly` deployment
from deploy/prefect.yaml, `prefect deployment run` with tiny-model parameters, the shards checked
against the plain job's bytes; then the worker and the server are stopped by pid, worker first.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from tiny_models import TINY_SUPPORT_RADIUS, save_tiny_dit, write_reference_folder

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"


def _prefect_yaml() -> dict:
    return yaml.safe_load((DEPLOY / "prefect.yaml").read_text())


def _deployment(name: str) -> dict:
    return next(d for d in _prefect_yaml()["deployments"] if d["name"] == name)


def _placeholders(obj) -> set[str]:
    text = json.dumps(obj)
    return set(re.findall(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}", text))


def _render(template: dict, job_variables: dict) -> dict:
    """The job configuration as a worker renders it: variable defaults, overridden by the deployment's."""
    from prefect.utilities.templating import apply_values

    props = template["variables"]["properties"]
    values = {k: v["default"] for k, v in props.items() if "default" in v}
    values.update(job_variables)
    return apply_values(template["job_configuration"], values)


# ----------------------------------------------------------------------------------- prefect.yaml


def test_prefect_yaml_is_valid_for_prefect_and_the_flows():
    from prefect.cli.deploy._models import PrefectYamlModel
    from prefect.client.schemas.schedules import CronSchedule

    from pipeline.config import AugmentConfig

    spec = PrefectYamlModel.model_validate(_prefect_yaml())
    by_name = {d.name: d for d in spec.deployments}
    assert set(by_name) == {"nightly", "gpu-node", "fanout"}
    nightly = by_name["nightly"]
    assert nightly.entrypoint == "flows/augment_flow.py:augment"
    assert nightly.work_pool.name == "mmd-augment-process"
    cron = nightly.schedules[0]
    CronSchedule(cron=cron.cron, timezone=cron.timezone)  # a valid cron expression and time zone
    assert cron.active is True and nightly.concurrency_limit == 1
    # default parameters are a valid config (the shipped prior and the example references)
    cfg = AugmentConfig.model_validate(nightly.parameters["config"])
    assert cfg.model is None and cfg.ref == "examples/thick_digits"
    for name in ("gpu-node", "fanout"):
        d = by_name[name]
        assert d.work_pool.name == "mmd-augment-k8s"
        assert d.pull[0]["prefect.deployments.steps.set_working_directory"]["directory"] == "/opt/mmd-augment"
    AugmentConfig.model_validate(by_name["fanout"].parameters["config"])
    assert by_name["fanout"].parameters["node_deployment"] == "augment-node/gpu-node"
    assert by_name["gpu-node"].concurrency_limit >= 1


def test_entrypoints_load_and_parameters_match_the_flow_signatures(monkeypatch):
    from prefect.flows import load_flow_from_entrypoint
    from prefect.utilities.callables import parameter_schema

    monkeypatch.chdir(REPO)  # entrypoints are relative to the working directory the pull step sets
    for d in _prefect_yaml()["deployments"]:
        flow = load_flow_from_entrypoint(d["entrypoint"])
        schema = parameter_schema(flow)
        params = d.get("parameters", {})
        assert set(params) <= set(schema.properties), d["name"]
        if params:
            flow.validate_parameters(params)


def test_serve_script_builds_the_nightly_deployment_from_prefect_yaml():
    sys.path.insert(0, str(DEPLOY))
    try:
        import serve
    finally:
        sys.path.remove(str(DEPLOY))
    options = serve.serve_options(out="/tmp/x")
    nightly = _deployment("nightly")
    assert options["cron"] == nightly["schedules"][0]["cron"]
    assert options["parameters"]["config"]["out"] == "/tmp/x"
    assert options["parameters"]["config"]["ref"] == str(REPO / "examples" / "thick_digits")
    deployment = serve._augment_flow().to_deployment(**options)
    assert deployment.entrypoint.endswith("flows/augment_flow.py:augment")
    assert deployment.schedules[0].schedule.cron == nightly["schedules"][0]["cron"]


# ------------------------------------------------------------------------------- pool templates


@pytest.mark.parametrize("name, pool_type", [("process-pool.json", "process"), ("kubernetes-pool.json", "kubernetes")])
def test_pool_templates_pass_the_servers_validation(name, pool_type):
    from prefect.server.schemas.actions import WorkPoolCreate

    template = json.loads((DEPLOY / name).read_text())
    WorkPoolCreate(name="check", type=pool_type, base_job_template=template)  # every placeholder declared
    assert _placeholders(template["job_configuration"]) <= set(template["variables"]["properties"])
    assert {"command", "env"} <= set(template["job_configuration"])


def test_process_template_keeps_the_workers_fields():
    from prefect.workers.process import ProcessWorker

    template = json.loads((DEPLOY / "process-pool.json").read_text())
    default = ProcessWorker.get_default_base_job_template()
    assert set(template["job_configuration"]) == set(default["job_configuration"])
    env = _render(template, {})["env"]
    assert "pipeline" in env["PREFECT_LOGGING_EXTRA_LOGGERS"]


def test_kubernetes_template_requests_gpus_and_mounts_shared_storage():
    template = json.loads((DEPLOY / "kubernetes-pool.json").read_text())
    node = _deployment("gpu-node")["work_pool"]["job_variables"]
    config = _render(template, node)
    manifest = config["job_manifest"]
    assert manifest["apiVersion"] == "batch/v1" and manifest["kind"] == "Job"
    pod = manifest["spec"]["template"]["spec"]
    container = pod["containers"][0]
    resources = container["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == node["gpu_count"] == 8
    assert container["image"] == template["variables"]["properties"]["image"]["default"]
    assert ":" in container["image"] and not container["image"].endswith(":latest")
    assert container["workingDir"] == "/opt/mmd-augment"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounts == {"data": "/data", "dshm": "/dev/shm"}
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] == "mmd-augment-data"
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    assert manifest["spec"]["backoffLimit"] == 0  # retries are Prefect's
    # paths of the cluster config are on the shared volume
    cfg = _deployment("fanout")["parameters"]["config"]
    assert all(cfg[k].startswith("/data/") for k in ("ref", "out", "cache_dir"))


# ------------------------------------------------------------------------- Dockerfile, accelerate


def test_dockerfile_pins_a_cuda_torch_and_installs_the_project():
    text = (DEPLOY / "Dockerfile").read_text()
    lock = (REPO / "requirements.lock").read_text()
    torch_pin = re.search(r"^torch==(\S+)$", lock, re.M).group(1)
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))
    base = args["PYTHON_IMAGE"]
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", base), base  # a pinned patch release, not a floating tag
    assert args["TORCH_VERSION"] == torch_pin  # the lock's torch, as a CUDA build
    assert re.fullmatch(r"cu\d{3}", args["TORCH_CUDA"])
    assert "download.pytorch.org/whl/${TORCH_CUDA}" in text
    assert re.search(r'pip install --index-url "\$\{TORCH_INDEX\}" "torch==\$\{TORCH_VERSION\}"', text)
    assert "pip install -r requirements.lock" in text and "torch.version.cuda" in text
    assert "pip install --no-deps -e ." in text
    assert "WORKDIR /opt/mmd-augment" in text  # = the pull step of the Kubernetes deployments
    copied = set(re.findall(r"^COPY (\w+) \./\1$", text, re.M))
    assert {"guidance", "pipeline", "storage", "flows"} <= copied
    assert re.search(r"^USER (?!root)\w+", text, re.M)
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert ".venv" in ignore and ".git" in ignore


def test_accelerate_multinode_config_loads_with_accelerate():
    from accelerate.commands.config.config_args import ClusterConfig

    cfg = ClusterConfig.from_yaml_file(str(DEPLOY / "accelerate-multinode.yaml"))
    assert cfg.num_machines >= 2 and cfg.num_processes % cfg.num_machines == 0
    assert cfg.distributed_type == "MULTI_GPU" and cfg.rdzv_backend == "static" and cfg.main_process_port


# ------------------------------------------------------------------------------ end to end (slow)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGINT (graceful), then SIGTERM, then SIGKILL: this process only, by pid, bounded."""
    if proc.poll() is not None:
        return
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
            return
        except subprocess.TimeoutExpired:
            continue


def _wait_until(predicate, timeout: float, what: str, interval: float = 1.0, proc=None, log=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(interval)
    tail = Path(log).read_text()[-3000:] if log and Path(log).exists() else ""
    raise AssertionError(f"timed out waiting for {what}\n{tail}")


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_scheduled_deployment_runs_end_to_end_on_a_local_server_and_worker(tmp_path):
    import httpx

    from pipeline.config import AugmentConfig
    from pipeline.jobs.job import run_job

    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    home = tmp_path / "prefect-home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_API_URL=api,
        PREFECT_SERVER_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home}/prefect.db",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_UI_ENABLED="false",
        PREFECT_CLI_PROMPT="false",
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS="1",
        PREFECT_WORKER_QUERY_SECONDS="2",
    )
    prefect = [sys.executable, "-m", "prefect"]

    t0 = time.monotonic()
    phases: dict[str, float] = {}

    def phase(name: str) -> None:
        phases[name] = round(time.monotonic() - t0 - sum(phases.values()), 1)

    def cli(*args: str, timeout: float = 180) -> str:
        done = subprocess.run(
            [*prefect, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
        assert done.returncode == 0, f"prefect {' '.join(args)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        return done.stdout

    server_log, worker_log = tmp_path / "server.log", tmp_path / "worker.log"
    server = worker = None
    try:
        with open(server_log, "w") as log:
            server = subprocess.Popen(
                [*prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"],
                cwd=tmp_path,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        # while the server starts: tiny model and references, and the plain job's bytes to compare with
        dit = str(save_tiny_dit(tmp_path / "dit"))
        refs = str(write_reference_folder(tmp_path / "refs", classes=("a", "b")))
        job = dict(ref=refs, n=12, model=dit, shard_size=6, batch_size=6, steps=3, keep=0.8, progress="quiet")
        job["support_radius"] = TINY_SUPPORT_RADIUS
        job["cache_dir"] = str(tmp_path / "cache")
        run_job(AugmentConfig(out=str(tmp_path / "plain"), **job))
        expected = {p.name: p.read_bytes() for p in (tmp_path / "plain" / "shards").glob("*.tar")}
        phase("plain job")

        def healthy() -> bool:
            try:
                return httpx.get(f"{api}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        _wait_until(healthy, 150, "the Prefect server", proc=server, log=server_log)
        phase("server start")

        cli("work-pool", "create", "mmd-augment-process", "--type", "process", "--base-job-template",
            str(DEPLOY / "process-pool.json"))  # fmt: skip
        with open(worker_log, "w") as log:  # starts polling while we deploy
            worker = subprocess.Popen(
                [*prefect, "worker", "start", "--pool", "mmd-augment-process", "--type", "process", "--limit", "1"],
                cwd=tmp_path,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        # the Kubernetes template is accepted by a real server too (no cluster: nothing runs on it)
        cli("work-pool", "create", "mmd-augment-k8s", "--type", "kubernetes", "--base-job-template",
            str(DEPLOY / "kubernetes-pool.json"))  # fmt: skip
        phase("pools + worker")
        before = (DEPLOY / "prefect.yaml").read_bytes()
        cli("--no-prompt", "deploy", "--prefect-file", str(DEPLOY / "prefect.yaml"), "--name", "nightly", timeout=240)
        assert (DEPLOY / "prefect.yaml").read_bytes() == before  # deploying does not rewrite the file
        phase("deploy")

        deployment = httpx.get(f"{api}/deployments/name/augment/nightly", timeout=10).json()
        assert deployment["work_pool_name"] == "mmd-augment-process"
        assert [s["schedule"]["cron"] for s in deployment["schedules"]] == ["0 2 * * *"]
        assert deployment["pull_steps"][0]["prefect.deployments.steps.set_working_directory"]["directory"] == str(REPO)
        # the cron schedule materialises as runs at 02:00 UTC (what the server's scheduler service does)
        httpx.post(f"{api}/deployments/{deployment['id']}/schedule", json={"max_runs": 2}, timeout=30)
        scheduled = httpx.post(
            f"{api}/flow_runs/filter",
            json={
                "deployments": {"id": {"any_": [deployment["id"]]}},
                "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}},
            },
            timeout=10,
        ).json()
        assert scheduled and all(r["expected_start_time"][11:19] == "02:00:00" for r in scheduled)

        out = tmp_path / "scheduled"
        params = {"config": {**job, "out": str(out)}}  # per_run_output stays on from the deployment
        printed = cli("deployment", "run", "augment/nightly", "--params", json.dumps(params))
        run_id = re.search(r"UUID:\s*([0-9a-f-]{36})", printed).group(1)
        phase("trigger")

        def finished():
            state = httpx.get(f"{api}/flow_runs/{run_id}", timeout=10).json()["state"]
            return state if state["type"] in {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"} else None

        state = _wait_until(finished, 240, "the flow run", interval=2, proc=worker, log=worker_log)
        assert state["type"] == "COMPLETED", (state, worker_log.read_text()[-4000:])
        phase("flow run")

        (run_folder,) = [p for p in out.iterdir() if p.is_dir()]  # <out>/<scheduled start, UTC>
        assert re.fullmatch(r"\d{8}T\d{4}Z", run_folder.name)
        shards = {p.name: p.read_bytes() for p in (run_folder / "shards").glob("*.tar")}
        assert shards == expected and len(shards) == 2
        assert (run_folder / "manifest.parquet").is_file() and (run_folder / "run.json").is_file()
        artifacts = httpx.post(
            f"{api}/artifacts/filter", json={"flow_runs": {"id": {"any_": [run_id]}}}, timeout=10
        ).json()
        assert any(a["type"] == "table" for a in artifacts)
    finally:
        if worker is not None:
            _stop(worker)  # the worker first: it talks to the server until it exits
        if server is not None:
            _stop(server)
    assert worker.returncode is not None and server.returncode is not None
    phase("stop")
    print("end-to-end phases (s):", phases)
