"""deploy/accelerate-multinode.yaml for real: two "machines" (two accelerate launches with machine ranks
0 and 1, one CPU process each, gloo over 127.0.0.1) stand in for two GPU nodes of a static cluster.

prepare (pipeline.jobs.static_cluster) -> both launches of `pipeline.jobs.distributed` -> finish; the shards must be
byte-identical to the single-process job's.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import TINY_SUPPORT_RADIUS, save_tiny_dit, write_reference_folder

from pipeline.config import AugmentConfig
from pipeline.jobs.job import run_job
from pipeline.jobs.static_cluster import finish, prepare

REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_two_machine_static_cluster_gives_the_single_process_bytes(tmp_path):
    dit = str(save_tiny_dit(tmp_path / "dit"))
    refs = str(write_reference_folder(tmp_path / "refs", classes=("a", "b")))
    job = dict(ref=refs, n=16, model=dit, shard_size=4, batch_size=5, steps=3, keep=0.8, progress="quiet")
    job["support_radius"] = TINY_SUPPORT_RADIUS
    job["cache_dir"] = str(tmp_path / "cache")
    run_job(AugmentConfig(out=str(tmp_path / "single"), **job))

    cfg = AugmentConfig(out=str(tmp_path / "cluster"), **job)
    spec = tmp_path / "job-spec.json"
    assert prepare(cfg, spec) == [0, 1, 2, 3]
    port = str(_free_port())
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    procs = []
    for rank in (0, 1):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
        cmd += [str(REPO / "deploy" / "accelerate-multinode.yaml"), "--num_machines", "2", "--num_processes", "2"]
        cmd += ["--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", port]
        cmd += ["-m", "pipeline.jobs.distributed", str(spec)]
        log = open(tmp_path / f"rank{rank}.log", "w")
        procs.append((subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    try:
        for proc, _ in procs:
            proc.wait(timeout=300)
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                proc.kill()  # by pid, only the launchers this test started
                proc.wait(timeout=30)
            log.close()
    logs = "\n".join((tmp_path / f"rank{r}.log").read_text()[-2000:] for r in (0, 1))
    assert all(proc.returncode == 0 for proc, _ in procs), logs

    summary = finish(spec)
    assert summary.num_kept == 16
    single = {p.name: p.read_bytes() for p in sorted((tmp_path / "single" / "shards").glob("*.tar"))}
    cluster = {p.name: p.read_bytes() for p in sorted((tmp_path / "cluster" / "shards").glob("*.tar"))}
    assert cluster == single and len(cluster) == 4
    markers = [p.read_text() for p in (tmp_path / "cluster" / "shards").glob("*.done")]
    assert any('"rank0"' in m for m in markers) and any('"rank1"' in m for m in markers)  # both machines worked
    manifest = (tmp_path / "cluster" / "manifest.parquet").read_bytes()
    assert manifest == (tmp_path / "single" / "manifest.parquet").read_bytes()
