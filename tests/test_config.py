"""Settings: conf/ composed into params.yaml, validated once into frozen models with no defaults."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from components.params import compose
from pipeline.config import ConfigError, Params, load_params
from tests.conftest import ROOT, copy_repo, run_env, settings


def flat(mapping: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in mapping.items():
        if isinstance(value, dict) and value:
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_committed_params_yaml_is_what_conf_composes_to() -> None:
    text, params = compose(ROOT)
    assert (ROOT / "params.yaml").read_text(encoding="utf-8") == text, (
        "params.yaml differs from conf/: run `make params` after editing conf/"
    )
    assert params.profile == "demo"


def test_paper_profile_changes_only_what_it_names() -> None:
    _, demo = compose(ROOT)
    _, paper = compose(ROOT, ["profile=paper"])
    named = flat(yaml.safe_load((ROOT / "conf" / "profile" / "paper.yaml").read_text()))
    a, b = flat(demo.model_dump()), flat(paper.model_dump())
    changed = {k for k in a if a[k] != b[k]}
    assert changed <= set(named) and "train.model.backbone.name" in changed
    assert b["train.model.backbone.name"].startswith("convnext_tiny") and b["train.augment.crop_size"] == 224
    assert paper.train.loss == demo.train.loss


def model_fields(model: type[BaseModel], prefix: str = ""):
    for name, field in model.model_fields.items():
        yield f"{prefix}{name}", field
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            yield from model_fields(field.annotation, f"{prefix}{name}.")


def test_no_setting_has_a_default_in_code_and_every_one_is_in_params_yaml() -> None:
    with_default = [key for key, field in model_fields(Params) if not field.is_required()]
    assert not with_default, f"defaults in code (give them in conf/config.yaml instead): {with_default}"
    in_file = set(flat(yaml.safe_load((ROOT / "params.yaml").read_text())))
    leaves = {
        key
        for key, field in model_fields(Params)
        if not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel))
    }
    # a mapping-valued setting (prototypes.texts) is flattened one level further in the file
    assert {k for k in leaves if not any(f.startswith(k + ".") for f in in_file)} <= in_file


def edited(tmp_path: Path, key: str, value) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    *parents, leaf = key.split(".")
    node = params
    for part in parents:
        node = node[part]
    node[leaf] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("train.loss.dwml.gama", 1.0, r"unknown key 'train\.loss\.dwml\.gama'; valid keys here: gamma, beta"),
        ("train.epochs", "ten", r"'train\.epochs' input should be a valid integer, got 'ten'"),
        ("train.optim.lr_head", True, r"'train\.optim\.lr_head' input should be a valid number, got True"),
        ("train.model.head", "mlp", r"'train\.model\.head' input should be 'metric' or 'linear', got 'mlp'"),
        ("train.epochs", 0, r"'train\.epochs' input should be greater than or equal to 1, got 0"),
        (
            "train.loss.dwml.image_weight_momentum",
            1.0,
            r"'train\.loss\.dwml\.image_weight_momentum' input should be less",
        ),
        ("prepare.val_fraction", -0.1, r"'prepare\.val_fraction' input should be greater than or equal to 0"),
        ("train.log_every", 0, r"'train\.log_every' input should be greater than or equal to 1, got 0"),
        ("train.optim.lr_head", math.nan, r"'train\.optim\.lr_head' input should be a finite number, got nan"),
        ("train.optim.lr_head", math.inf, r"'train\.optim\.lr_head' input should be a finite number, got inf"),
        (
            "train.early_stopping_patience",
            -1,
            r"'train\.early_stopping_patience' input should be greater than or equal to 0, got -1",
        ),
        (
            "train.loss.dwml.category_ratio_cap",
            math.inf,  # no cap is null; an infinite cap is no number to compute with
            r"'train\.loss\.dwml\.category_ratio_cap' input should be a finite number, got inf",
        ),
    ],
)
def test_a_wrong_key_type_or_range_is_one_error_naming_the_key(tmp_path, key, value, message) -> None:
    path = edited(tmp_path, key, value)
    with pytest.raises(ConfigError, match=message) as err:
        load_params(path)
    assert str(err.value).startswith(f"{path}: ") and "\n" not in str(err.value)


def float_settings() -> list[str]:
    """Dotted keys of every setting that holds a float, or a list of floats, or a float or null."""
    return [
        key
        for key, field in model_fields(Params)
        if not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel))
        and "float" in repr(field.annotation)
    ]


def test_every_float_setting_refuses_nan_and_infinity(tmp_path) -> None:
    keys = float_settings()
    assert {"train.optim.lr_head", "train.optim.betas", "train.loss.dwml.category_ratio_cap"} <= set(keys)
    assert len(keys) >= 30
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    accepted, unclear = [], []
    for key in keys:
        *parents, leaf = key.split(".")
        node = params
        for part in parents:
            node = node[part]
        for bad in (math.nan, math.inf, -math.inf):
            value = [bad, *node[leaf][1:]] if isinstance(node[leaf], list) else bad
            path = edited(tmp_path, key, value)  # written as YAML's .nan / .inf / -.inf
            try:
                load_params(path)
                accepted.append(f"{key}={bad}")
            except ConfigError as e:
                message = str(e)
                if not (f"'{key}" in message and "finite number" in message and "\n" not in message):
                    unclear.append(message)
    assert not accepted, f"NaN or infinity accepted: {accepted}"
    assert not unclear, "a NaN or infinity must fail as one line naming the key:\n" + "\n".join(unclear)


def test_a_missing_key_is_an_error_not_a_default(tmp_path: Path) -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    del params["train"]["loss"]["dwml"]["beta"]
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError, match=r"missing key 'train\.loss\.dwml\.beta'"):
        load_params(path)


def test_settings_are_frozen_and_replace_validates_again() -> None:
    train = settings("train")
    with pytest.raises(Exception, match="frozen"):
        train.epochs = 3
    faster = train.replace({"epochs": 2, "loss.name": "bce", "loss.dwml.gamma": 2.0})
    assert (faster.epochs, faster.loss.name, faster.loss.dwml.gamma, train.epochs) == (2, "bce", 2.0, 16)
    with pytest.raises(ConfigError, match=r"'train\.loss\.dwml\.gamma' input should be greater"):
        train.replace({"loss.dwml.gamma": -1.0}, at="train")
    with pytest.raises(ConfigError, match=r"unknown key 'loss\.dwml\.gama'"):
        train.replace({"loss.dwml.gama": 1.0})


def test_bad_yaml_and_missing_file_are_clear(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(path)
    with pytest.raises(ConfigError, match="not found: run from the repository root"):
        load_params(tmp_path / "nope.yaml")


def test_component_reports_a_bad_key_in_one_line(tmp_path: Path, capsys) -> None:
    from components.common import run_main
    from components.prepare import main

    path = edited(tmp_path, "prepare.image_sise", 64)
    code = run_main(
        "prepare", main, ["--params", str(path), "--raw", str(tmp_path), "--out", str(tmp_path / "out"), "--no-mlflow"]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "cxr-dwml prepare: error:" in err and "prepare.image_sise" in err


def test_params_command_composes_checks_and_refuses_bad_overrides(tmp_path: Path) -> None:
    def params_cmd(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "components.params", *args], cwd=ROOT, capture_output=True, text=True
        )

    out = tmp_path / "params.yaml"
    done = params_cmd("--profile", "paper", "--set", "train.epochs=3", "--out", str(out))
    assert done.returncode == 0, done.stderr
    paper = load_params(out)
    assert (paper.profile, paper.train.epochs, paper.train.augment.crop_size) == ("paper", 3, 224)
    before = out.read_bytes()
    for args, named in (
        (["--set", "train.epoch=3"], "train.epoch"),
        (["--set", "train.epochs=0"], "train.epochs"),
        (["--profile", "huge"], "profile/huge"),
    ):
        bad = params_cmd(*args, "--out", str(out))
        assert bad.returncode == 2 and named in bad.stderr, bad.stderr
        assert out.read_bytes() == before, "a refused composition leaves the file as it was"
    stale = params_cmd("--check", "--params", str(out))
    assert stale.returncode == 2 and "not what conf/ composes to" in stale.stderr
    assert params_cmd("--check").returncode == 0


def test_set_values_are_literals_and_stay_inside_the_project(tmp_path: Path) -> None:
    """An override cannot read the environment (`${oc.env:...}`) or load a config from elsewhere."""
    secret = "hunter2-not-for-params"
    outside = tmp_path / "elsewhere"
    (outside / "profile").mkdir(parents=True)
    (outside / "profile" / "evil.yaml").write_text("# @package _global_\nprofile: evil\nmlflow:\n  experiment: evil\n")
    out = tmp_path / "params.yaml"
    out.write_text("kept\n")
    env = {**run_env(ROOT), "CXR_TEST_SECRET": secret}
    for args, named in (
        (["--set", "mlflow.experiment=${oc.env:CXR_TEST_SECRET}"], "'mlflow.experiment' holds an interpolation"),
        (["--set", "mlflow.experiment=\\${oc.env:CXR_TEST_SECRET}"], "'mlflow.experiment' holds an interpolation"),
        (["--set", "train.optim.betas=[0.9, '${oc.env:CXR_TEST_SECRET}']"], "'train.optim.betas' holds"),
        (["--set", "download.source=${now:%Y}"], "'download.source' holds an interpolation"),
        (
            ["--set", f"hydra.searchpath=[{outside.as_uri()}]", "--profile", "evil"],
            "'hydra.searchpath' is not a params",
        ),
        (["--profile", f"../../../../../../../..{outside}/profile/evil"], "is not a profile name"),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "components.params", *args, "--out", str(out)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
        )
        errors = [line for line in done.stderr.splitlines() if ": error: " in line]
        assert done.returncode == 2 and len(errors) == 1 and named in errors[0], (args, done.stderr[-2000:])
        assert secret not in done.stdout + done.stderr
        assert out.read_text() == "kept\n", "a refused override leaves the file as it was"


def test_a_params_file_naming_no_profile_of_conf_is_refused(tmp_path: Path, capsys, monkeypatch) -> None:
    from components.common import run_main
    from components.prepare import main

    monkeypatch.chdir(ROOT)  # the project whose conf/profile/ names the profiles
    path = edited(tmp_path, "profile", "papr")
    argv = ["--params", str(path), "--raw", str(tmp_path), "--out", str(tmp_path / "out"), "--no-mlflow"]
    code = run_main("prepare", main, argv)
    (line,) = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
    assert code == 2 and f"{path}: 'profile' is 'papr'" in line and "(demo, paper, scale)" in line, line
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_dvc_records_the_values_each_profile_ran_with(tmp_path: Path) -> None:
    """A demo and a paper-profile experiment side by side: DVC shows what each stage resolved."""
    repo = copy_repo(tmp_path / "repo")
    env = run_env(repo)

    def dvc(*args: str) -> str:
        done = subprocess.run(["dvc", *args], cwd=repo, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        return done.stdout

    resolved = {}
    # tiny sizes on a CPU: the paper profile's data source and worker count are set back for the test
    for name, sets in (
        ("demo", []),
        ("paper", ["-S", "profile=paper", "-S", "download.source=synthetic", "-S", "prepare.workers=1"]),
    ):
        dvc("exp", "run", "-n", name, *sets, "prepare")
        resolved[name] = {
            "download": json.loads((repo / "data" / "raw" / "download_config.json").read_text())["download"],
            "prepare": json.loads((repo / "data" / "prepared" / "prepare_config.json").read_text())["prepare"],
        }
    assert resolved["paper"]["prepare"]["image_size"] == 256 and resolved["demo"]["prepare"]["image_size"] == 32

    shown = json.loads(dvc("exp", "show", "--json"))
    recorded = {}
    for entry in shown:
        for exp in entry.get("experiments") or []:
            for rev in exp.get("revs") or []:
                data = rev.get("data") or {}
                if rev.get("name") in resolved:
                    recorded[rev["name"]] = data["params"]["params.yaml"]["data"]
    assert set(recorded) == {"demo", "paper"}, shown
    for name in resolved:
        for step in ("download", "prepare"):
            assert recorded[name][step] == resolved[name][step], f"{name}: dvc exp show != {step}'s resolved config"
    assert recorded["paper"]["profile"] == "paper" and recorded["paper"]["train"]["epochs"] == 30

    diff = json.loads(dvc("params", "diff", "demo", "paper", "--json"))["params.yaml"]
    assert (diff["prepare.image_size"]["old"], diff["prepare.image_size"]["new"]) == (32, 256)
    assert diff["train.model.backbone.name"]["new"] == "convnext_tiny.fb_in1k"


@pytest.mark.parametrize(
    "source",
    ["https://u:s3cr@t@mirror.org/nih", "https://mirror.org/nih?token=s3cr@t", "https://mirror.org/nih#sig=s3cr@t"],
)
def test_a_source_with_credentials_is_refused_without_showing_them(source) -> None:
    """params.yaml and dvc.lock are committed: a secret in download.source would be in every clone."""
    with pytest.raises(ConfigError, match=r"download\.source.*~/\.netrc") as error:
        settings("download").replace(source=source, at="download")
    assert "s3cr" not in str(error.value)
    assert settings("download").replace(source="https://mirror.org/nih", at="download").source.endswith("/nih")
