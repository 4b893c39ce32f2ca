"""Download step: fetch ChestX-ray14 (or the synthetic demo set) into data/raw/ in NIH layout.

Run:
    python -m components.download --out data/raw
    python -m components.download --out data/raw --source s3://my-bucket/chestxray14
The source comes from `download.source` in params.yaml: synthetic | nih | s3://bucket/prefix |
http(s)://mirror | a local folder; --source overrides it. CXR_S3_ENDPOINT_URL fills
`download.s3.endpoint_url` when params leave it empty. (The Airflow DAG's `source` param defaults to
CXR_DATA_SOURCE.)
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from components.common import mlflow_run, parser, run_main, save_resolved, stage_config
from pipeline import tracking
from pipeline.tracking import redact_uri


def main(argv: list[str] | None = None) -> int:
    from pipeline.data.download import check_source, fetch

    p = parser(__doc__)
    p.add_argument("--out", default="data/raw", help="raw data folder (default: %(default)s)")
    p.add_argument("--source", default=None, help="override download.source")
    args = p.parse_args(argv)
    cfg, params = stage_config(args, "download")
    # deployments (docker/compose.yaml) name their S3 endpoint in the environment
    if os.environ.get("CXR_S3_ENDPOINT_URL") and not cfg.s3.endpoint_url:
        cfg = cfg.replace({"s3.endpoint_url": os.environ["CXR_S3_ENDPOINT_URL"]}, at="download")
    if args.source:
        cfg = cfg.replace(source=args.source, at="download")
    out = Path(args.out)
    check_source(cfg)  # a source that cannot be fetched fails before any MLflow run is made
    with mlflow_run(args, params, "download") as run:
        t0 = time.perf_counter()
        summary = fetch(cfg, out, progress=not args.no_progress)
        if run is not None:
            import mlflow

            tracking.log_params({"source": redact_uri(cfg.source), "profile": params.profile}, "download.")
            mlflow.log_metrics({k: float(v) for k, v in _numbers(summary).items()})
            mlflow.log_metric("download_seconds", time.perf_counter() - t0)
            mlflow.log_artifact(str(out / "checksums.json"))
            tracking.save_run_ref(out, run)
    save_resolved(out / "download_config.json", "download", _redacted(cfg), params)
    return 0


def _redacted(cfg):
    """`cfg` with the passwords and tokens of its URLs masked, for the record kept beside the data."""
    urls = {"source": cfg.source, "nih.base_url": cfg.nih.base_url, "nih.metadata_url": cfg.nih.metadata_url}
    if cfg.s3.endpoint_url:
        urls["s3.endpoint_url"] = cfg.s3.endpoint_url
    return cfg.replace({key: redact_uri(url) for key, url in urls.items()}, at="download")


def _numbers(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


if __name__ == "__main__":
    raise SystemExit(run_main("download", main))
