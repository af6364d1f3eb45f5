"""Serve the nightly `augment` deployment from this process: one machine, no work pool, no worker.

    python deploy/serve.py                              # the `nightly` defaults of deploy/prefect.yaml
    python deploy/serve.py --cron "30 1 * * *" --ref ./my_refs --out ./synthetic --n 5000

Needs a Prefect API to talk to (`prefect server start` and `PREFECT_API_URL`, or Prefect Cloud);
runs each scheduled (or manually triggered: `prefect deployment run augment/nightly-local`) flow run
in a subprocess of this one, until interrupted. Defaults come from the `nightly` deployment in
deploy/prefect.yaml, so the two stay one definition; relative paths are taken from the repository root.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
PREFECT_YAML = Path(__file__).resolve().parent / "prefect.yaml"
PATH_FIELDS = ("ref", "out", "cache_dir", "model")


def nightly_defaults(prefect_yaml: Path = PREFECT_YAML) -> dict[str, Any]:
    """The `nightly` deployment of prefect.yaml: {"parameters": ..., "cron": ..., "timezone": ...}."""
    spec = yaml.safe_load(prefect_yaml.read_text())
    nightly = next(d for d in spec["deployments"] if d["name"] == "nightly")
    schedule = nightly["schedules"][0]
    return {"parameters": nightly["parameters"], "cron": schedule["cron"], "timezone": schedule.get("timezone", "UTC")}


def absolute_paths(config: dict[str, Any], root: Path = ROOT) -> dict[str, Any]:
    """Relative local paths in the config, made absolute against `root` (served runs may start elsewhere)."""
    out = dict(config)
    for name in PATH_FIELDS:
        value = out.get(name)
        if isinstance(value, str) and "://" not in value and (name != "model" or (root / value).exists()):
            path = Path(value)
            out[name] = str(path if path.is_absolute() else (root / path))
    return out


def serve_options(name: str = "nightly-local", cron: str | None = None, **overrides: Any) -> dict[str, Any]:
    """Keyword arguments of `augment.serve(...)` / `augment.to_deployment(...)`: prefect.yaml's nightly
    parameters and cron, with `overrides` (ref, out, n, model) applied and local paths made absolute."""
    defaults = nightly_defaults()
    params = dict(defaults["parameters"])
    params["config"] = absolute_paths({**params["config"], **{k: v for k, v in overrides.items() if v is not None}})
    return {
        "name": name,
        "cron": cron or defaults["cron"],
        "parameters": params,
        "tags": ["mmd-augment", "served"],
        "description": "augment, served from deploy/serve.py",
    }


def _augment_flow():
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from flows.augment_flow import augment

    return augment


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--name", default="nightly-local", help="deployment name")
    parser.add_argument("--cron", default=None, help="cron schedule (default: the nightly one of prefect.yaml)")
    parser.add_argument("--ref", default=None, help="reference folder")
    parser.add_argument("--out", default=None, help="output folder (a sub-folder per run)")
    parser.add_argument("--n", type=int, default=None, help="samples to keep per run")
    parser.add_argument("--model", default=None, help="model (default: the shipped prior)")
    args = parser.parse_args(argv)
    options = serve_options(args.name, args.cron, ref=args.ref, out=args.out, n=args.n, model=args.model)
    _augment_flow().serve(**options)  # blocks until interrupted (Ctrl-C)
    return 0


if __name__ == "__main__":
    sys.exit(main())
