"""Secrets out of URIs: `redact_uri` and every place a tracking, remote or endpoint URI is shown."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from components.provenance import PipelineRun, pipeline_run
from pipeline import tracking
from pipeline.classes import CLASSES
from pipeline.tracking import redact_text, redact_uri
from tests.conftest import stage_runner


@pytest.mark.parametrize(
    ("uri", "shown"),
    [
        ("http://user:p@ss@host:5000", "http://***@host:5000"),
        ("postgresql://u:se@cret@db/mlflow", "postgresql://***@db/mlflow"),
        ("postgresql+psycopg2://mlflow:pw@postgres:5432/mlflow", "postgresql+psycopg2://***@postgres:5432/mlflow"),
        ("http://u:pa/ss@host/x", "http://***@host/x"),  # a '/' in the password, not percent-encoded
        ("https://user@host", "https://***@host"),
        ("http://host:5000/api?token=abc&run=3", "http://host:5000/api?token=***&run=3"),
        ("http://host/?Password=x;api_key=y&a=1#top", "http://host/?Password=***;api_key=***&a=1#top"),
        ("http://host/?access_token=t&ClientSecret=s", "http://host/?access_token=***&ClientSecret=***"),
        (
            "https://bucket.s3.amazonaws.com/a.tar.gz?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIA%2F1"
            "&X-Amz-Date=20240101T000000Z&X-Amz-Security-Token=tok&X-Amz-Signature=f00d",
            "https://bucket.s3.amazonaws.com/a.tar.gz?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=***"
            "&X-Amz-Date=20240101T000000Z&X-Amz-Security-Token=***&X-Amz-Signature=***",
        ),
        (
            "http://u:p@host:5000/path?signature=s&access_key=k",
            "http://***@host:5000/path?signature=***&access_key=***",
        ),
        # a token in the fragment (OAuth's implicit flow puts access_token there)
        ("http://host/x#token=abc", "http://host/x#token=***"),
        ("https://host/cb#access_token=t&state=s", "https://host/cb#access_token=***&state=s"),
        ("http://host/?run=3#token=abc", "http://host/?run=3#token=***"),
        # no scheme: user:password@host
        ("user:pw@host:5000", "***@host:5000"),
        ("alice:p@ss@mlflow.internal:5000/x?token=t", "***@mlflow.internal:5000/x?token=***"),
    ],
)
def test_redact_uri_masks_user_info_and_secret_query_values(uri: str, shown: str) -> None:
    assert redact_uri(uri) == shown


@pytest.mark.parametrize(
    "uri",
    [
        "http://mlflow:5000",
        "https://mlflow.example.org:443/tracking/",
        "sqlite:////work/repo/mlflow.db",
        "file:///tmp/mlruns",
        "mlruns",
        "databricks",
        "s3://my-bucket/chestxray14",
        "http://[::1]:5000/x",
        "http://host/a@b/c",  # an '@' in the path is no user info
        "http://host:5000/x?email=a@b.org&run=3",
        "https://nihcc.box.com/shared/static/{id}.gz",
        "http://mlflow:5000/#/experiments/1/runs/abc",  # a UI link's fragment holds no secret
        "git@github.com:org/repo.git",  # no scheme and no password: a user name, not a secret
        "ops@example.org",
        "/data/nih@v2/images",
        "",
    ],
)
def test_redact_uri_leaves_a_uri_without_secrets_as_it_is(uri: str) -> None:
    assert redact_uri(uri) == uri


def test_redact_text_masks_uris_and_query_pairs_inside_a_message() -> None:
    message = (
        "HTTPConnectionPool(host='h', port=80): Max retries exceeded with url: /a.tar.gz?token=abc&part=2 "
        "(Caused by NewConnectionError) via https://u:pw@proxy:3128/"
    )
    assert redact_text(message) == (
        "HTTPConnectionPool(host='h', port=80): Max retries exceeded with url: /a.tar.gz?token=***&part=2 "
        "(Caused by NewConnectionError) via https://***@proxy:3128/"
    )
    assert redact_text("connecting to alice:p@ss@db.internal:5432, page login#token=abc as ops@example.org") == (
        "connecting to ***@db.internal:5432, page login#token=*** as ops@example.org"
    )


@pytest.fixture
def tracking_uri():
    """Set MLflow's tracking URI for one test; the previous one comes back afterwards."""
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    def use(uri: str):
        return _use_tracking_uri(uri)

    return use


def test_the_recorded_run_reference_holds_no_password(tmp_path: Path, tracking_uri) -> None:
    run = SimpleNamespace(info=SimpleNamespace(run_id="r1", experiment_id="7"))
    with tracking_uri("postgresql://mlflow:se@cret@db:5432/mlflow"):
        assert tracking.redacted_uri() == "postgresql://***@db:5432/mlflow"
        tracking.save_run_ref(tmp_path, run)
    text = (tmp_path / tracking.RUN_FILE).read_text()
    assert "cret" not in text and json.loads(text)["tracking_uri"] == "postgresql://***@db:5432/mlflow"


def test_summary_prints_the_tracking_server_without_its_password(tmp_path: Path, monkeypatch, capsys) -> None:
    from components import summary

    auc = {c: 0.8 for c in CLASSES}
    metrics = {
        "per_class_auc": auc,
        "per_class_auc_ci": {c: [0.7, 0.9] for c in CLASSES},
        "mean_auc": 0.8,
        "mean_auc_ci": [0.75, 0.85],
        "test_images": 10,
    }
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://admin:p@ss@mlflow.example.org/?token=abc")
    assert summary.main(["--reports", str(tmp_path), "--model", str(tmp_path / "no-model")]) == 0
    out = capsys.readouterr().out
    assert "browse the runs:  https://***@mlflow.example.org/?token=***/#/experiments?" in out
    assert "p@ss" not in out and "abc" not in out


def test_summary_links_open_the_model_training_view(tmp_path: Path, monkeypatch, capsys) -> None:
    """MLflow's UI opens in its GenAI view (no runs list, no registry in the sidebar) unless the link
    says otherwise: the summary's links carry workflowType=machine_learning, to the experiment's runs
    and to the registered model."""
    from components import summary

    metrics = {
        "per_class_auc": {c: 0.8 for c in CLASSES},
        "per_class_auc_ci": {c: [0.7, 0.9] for c in CLASSES},
        "mean_auc": 0.8,
        "mean_auc_ci": [0.75, 0.85],
        "test_images": 10,
    }
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    (tmp_path / "registration.json").write_text(
        json.dumps({"model_name": "cxr-dwml", "version": "3", "promote": False, "reason": "r"})
    )
    model = tmp_path / "model"
    model.mkdir()
    (model / tracking.RUN_FILE).write_text(json.dumps({"run_id": "abc", "experiment_id": "7"}))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert summary.main(["--reports", str(tmp_path), "--model", str(model)]) == 0
    out = capsys.readouterr().out
    assert "mlflow ui --backend-store-uri sqlite:///" in out
    assert "then http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning" in out
    assert "the registered model:  http://127.0.0.1:5000/#/models/cxr-dwml?workflowType=machine_learning" in out


def test_stage_runner_prints_remote_urls_without_their_secrets(tmp_path: Path, capsys) -> None:
    dvc_stage = stage_runner()
    url = "https://user:pw@storage.example.org/cxr?X-Amz-Signature=f00d"
    assert dvc_stage.run(["true", "remote", "add", "--local", "cxr-remote", url], tmp_path) == 0
    out = capsys.readouterr().out
    assert out == "+ true remote add --local cxr-remote https://***@storage.example.org/cxr?X-Amz-Signature=***\n"


def test_predict_names_an_unreachable_tracking_server_without_its_password(
    tmp_path: Path, monkeypatch, capsys, tracking_uri
) -> None:
    from components import predict
    from components.common import run_main

    server = "http://admin:p@ss@127.0.0.1:9/"  # port 9: nothing answers
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    monkeypatch.delenv("CXR_DEBUG", raising=False)
    with tracking_uri(server):  # the component sets the URI process-wide; this puts the old one back
        args = ["--model", "models:/cxr-dwml@champion", str(tmp_path), "--out", str(tmp_path / "p.csv")]
        code = run_main("predict", predict.main, args)
    err = capsys.readouterr().err
    assert code == 2 and "cannot load model 'models:/cxr-dwml@champion' from http://***@127.0.0.1:9/" in err
    assert "p@ss" not in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, None),
        ({"AIRFLOW_CTX_DAG_ID": "cxr_dwml"}, None),  # no DAG run: not an execution
        (
            {"CXR_PIPELINE_RUN": "nightly 2026-11-30", "AIRFLOW_CTX_DAG_RUN_ID": "manual__1"},
            PipelineRun("nightly_2026-11-30", "pipeline nightly_2026-11-30"),
        ),
        (
            {"AIRFLOW_CTX_DAG_ID": "cxr_dwml", "AIRFLOW_CTX_DAG_RUN_ID": "scheduled__2026-11-30T00:00:00+00:00"},
            PipelineRun(
                "airflow:cxr_dwml:scheduled__2026-11-30T00:00:00+00:00", "dag scheduled__2026-11-30T00:00:00+00:00"
            ),
        ),
        ({"DVC_STAGE": "train"}, None),  # a DVC stage without a dvc process above it (here: pytest)
    ],
)
def test_what_makes_one_pipeline_execution(environ: dict, expected: PipelineRun | None) -> None:
    assert pipeline_run(environ) == expected
