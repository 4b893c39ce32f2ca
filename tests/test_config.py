"""params.yaml, the profile overlay and the typed stage configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, build, load_params, section

ROOT = Path(__file__).resolve().parents[1]


def stage_classes():
    from pipeline.data.download import DownloadConfig
    from pipeline.data.prepare import PrepareConfig
    from pipeline.evaluation import EvaluateConfig
    from pipeline.prototypes import PrototypeConfig
    from pipeline.registry import RegisterConfig
    from pipeline.training import TrainConfig

    return {"download": DownloadConfig, "prepare": PrepareConfig, "prototypes": PrototypeConfig,
            "train": TrainConfig, "evaluate": EvaluateConfig, "register": RegisterConfig}


@pytest.mark.parametrize("profile", ["demo", "paper"])
def test_every_stage_config_builds_for_both_profiles(profile: str) -> None:
    params = load_params(ROOT / "params.yaml", profile)
    assert params["profile"] == profile
    for step, cls in stage_classes().items():
        if profile == "paper" and step == "download":
            # the NIH source needs the metadata URL that only the user can give; it must say so
            with pytest.raises(ConfigError, match="metadata_url"):
                build(cls, section(params, step), step)
            continue
        build(cls, section(params, step), step)


def test_paper_profile_overlays_only_what_it_names() -> None:
    demo, paper = load_params(ROOT / "params.yaml", "demo"), load_params(ROOT / "params.yaml", "paper")
    assert paper["train"]["model"]["backbone"]["name"].startswith("convnext_tiny")
    assert paper["train"]["augment"]["crop_size"] == 224
    assert paper["prototypes"]["encoder"] == "dmis-lab/biobert-base-cased-v1.2"
    assert paper["train"]["loss"] == demo["train"]["loss"]  # untouched keys keep the params.yaml value
    assert demo["download"]["source"] == "synthetic"


def write_params(tmp_path: Path, params: dict) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_unknown_profile_lists_the_known_ones(tmp_path: Path) -> None:
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "paper.yaml").write_text("train: {epochs: 3}\n")
    with pytest.raises(ConfigError, match="profile 'papr'.*known profiles: demo, paper"):
        load_params(write_params(tmp_path, {"profile": "papr"}))


def test_errors_name_the_dotted_key() -> None:
    from pipeline.training import TrainConfig

    with pytest.raises(ConfigError, match=r"train\.loss\.gama"):
        build(TrainConfig, {"loss": {"gama": 1.0}}, "train")
    with pytest.raises(ConfigError, match=r"'train\.epochs' must be an integer"):
        build(TrainConfig, {"epochs": "ten"}, "train")
    with pytest.raises(ConfigError, match=r"'train\.model\.head' is 'mlp'; choose one of"):
        build(TrainConfig, {"model": {"head": "mlp"}}, "train")
    with pytest.raises(ConfigError, match=r"'train'.*epochs"):
        build(TrainConfig, {"epochs": 0}, "train")


def test_bad_yaml_and_missing_section_are_clear(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(path)
    with pytest.raises(ConfigError, match="no 'train' section"):
        section({}, "train")


def test_component_reports_a_bad_key_in_one_line(tmp_path: Path, capsys) -> None:
    from components.common import run_main
    from components.prepare import main

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["prepare"]["image_sise"] = 64
    path = write_params(tmp_path, params)
    code = run_main("prepare", main, ["--params", str(path), "--raw", str(tmp_path), "--out",
                                      str(tmp_path / "out"), "--no-mlflow"])
    err = capsys.readouterr().err
    assert code == 2
    assert "cxr-dwml prepare: error:" in err and "prepare.image_sise" in err
    assert not (tmp_path / "out").exists()
