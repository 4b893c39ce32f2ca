"""`airflow standalone` as docs/airflow.md starts it: seconds until the UI answers, processes, memory.

Starts it in a throwaway AIRFLOW_HOME with the documented environment, once with Airflow's own
default parallelism (32 LocalExecutor workers) and once sized for this machine
(AIRFLOW__CORE__PARALLELISM = the CPU count, one API worker), one after the other. For each:
seconds from the start until `GET /api/v2/monitor/health` answers 200 with the scheduler healthy,
then, 20 s later, the number of processes in its tree and their summed resident memory.

    .venv/bin/python benchmarks/airflow_standalone.py [--port 8090]

The last line reads `standalone_rss_ratio <default / sized>`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]


def sized_env() -> dict[str, str]:
    """The settings docs/airflow.md gives for a small machine."""
    return {"AIRFLOW__CORE__PARALLELISM": str(os.cpu_count() or 2), "AIRFLOW__API__WORKERS": "1"}


def start(port: int, extra: dict[str, str], timeout: float = 300.0) -> dict:
    home = Path(tempfile.mkdtemp(prefix="airflow-home-"))
    env = dict(os.environ)
    env.update(
        {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__API__PORT": str(port),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
            **extra,
        }
    )
    subprocess.run(["airflow", "db", "migrate"], env=env, check=True, capture_output=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        ["airflow", "standalone"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    ready = None
    try:
        while time.perf_counter() - t0 < timeout:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v2/monitor/health", timeout=2) as r:
                    health = json.load(r)
                if health.get("scheduler", {}).get("status") == "healthy":
                    ready = time.perf_counter() - t0
                    break
            except OSError:
                pass
            time.sleep(0.5)
        time.sleep(20)
        procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        rss = sum(p.memory_info().rss for p in procs if p.is_running())
        return {
            "ready_seconds": None if ready is None else round(ready, 1),
            "processes": len(procs),
            "rss_mb": round(rss / 2**20),
        }
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(home, ignore_errors=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, default=8090)
    args = p.parse_args()
    results = {}
    for name, extra in (("default", {}), ("sized", sized_env())):
        results[name] = start(args.port, extra)
        print(f"{name:>8}: {json.dumps({**extra, **results[name]})}", flush=True)
    print(f"standalone_rss_ratio {results['default']['rss_mb'] / results['sized']['rss_mb']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
