"""Compose params.yaml from conf/: the base settings, one profile and overrides.

This is the composition `dvc exp run` performs (DVC's Hydra support, enabled in .dvc/config), made
available to `dvc repro`, to orchestrated runs and to checks:

    python -m components.params                          # conf/config.yaml, demo profile
    python -m components.params --profile paper --set train.epochs=20
    python -m components.params --check                  # fail when params.yaml is not conf/'s

The composed file is validated before it replaces params.yaml, so a wrong override fails here,
naming the key, and params.yaml stays as it was. An override is a literal value: interpolations
(`${...}`, resolvers such as `${oc.env:NAME}`) may appear only in the committed conf/, so a value
given for one run (here, or in an Airflow DAG run's conf) cannot read the environment or reach
outside the project.
"""

from __future__ import annotations

import argparse
import configparser
import json
import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from components.common import run_main
from pipeline.config import ConfigError, Params, validate
from pipeline.io import write_text

PARAMS = "params.yaml"
PROFILE_KEY = "profile"  # the config group that selects a profile (conf/profile/<name>.yaml)
# what OmegaConf resolves while composing: in an override it would read the environment
# (`${oc.env:SECRET}`) or other keys into params.yaml, dvc.lock and MLflow
INTERPOLATION = "${"
# a profile is a file name in conf/profile/ (as Params.profile allows): no path, no Hydra syntax
_PROFILE_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
# a key inside a mapping value, written unquoted into the Hydra override
_MAPPING_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def hydra_settings(root: Path) -> tuple[Path, str]:
    """The config folder and config name DVC composes from (.dvc/config's [hydra] section)."""
    cfg = configparser.ConfigParser()
    for name in ("config", "config.local"):
        path = root / ".dvc" / name
        if path.exists():
            cfg.read(path, encoding="utf-8")
    section = cfg["hydra"] if cfg.has_section("hydra") else {}
    if str(section.get("enabled", "false")).strip().lower() not in ("true", "1", "yes"):
        raise ConfigError(f"{root}/.dvc/config: [hydra] enabled is not true; params.yaml is composed from conf/")
    config_dir = section.get("config_dir", "conf").strip().strip('"')
    return (root / config_dir).resolve(), section.get("config_name", "config").strip().strip('"')


def known_profiles(config_dir: Path) -> list[str]:
    """The profiles `config_dir` offers: the names of its profile/<name>.yaml files."""
    return sorted(path.stem for path in (config_dir / PROFILE_KEY).glob("*.yaml"))


def check_profile(profile: str, where: str, root: Path) -> None:
    """Refuse a params file (`where`) whose `profile` names no profile of the project `root`'s conf/.

    Nothing is checked where `root` has no conf/profile/ to compare with.

    Raises:
        ConfigError: naming the file, the key and the valid profiles.
    """
    try:
        config_dir, _ = hydra_settings(root)
    except ConfigError:  # a folder without DVC's Hydra settings: conf/ where DVC would look first
        config_dir = root / "conf"
    known = known_profiles(config_dir)
    if known and profile not in known:
        raise ConfigError(
            f"{where}: 'profile' is {profile!r}, not a profile of {config_dir / PROFILE_KEY}/ "
            f"({', '.join(known)}): compose the file with python -m components.params --profile <name>"
        )


def override_strings(overrides: Mapping[str, Any]) -> list[str]:
    """{dotted key: value} as Hydra override strings; `profile` selects a conf/profile/ entry.

    Raises:
        ConfigError: naming the key, when it is not a params.yaml key, when `profile` is not a
            profile name, or when a value holds an interpolation (a value is a literal).
    """
    out = []
    for key, value in overrides.items():
        _check_key(key)
        if key == PROFILE_KEY:
            if not isinstance(value, str) or not _PROFILE_NAME.match(value):
                raise ConfigError(
                    f"override 'profile' {value!r} is not a profile name: give the name of a "
                    "conf/profile/<name>.yaml, e.g. paper"
                )
            out.append(f"{key}={value}")
        else:
            out.append(f"{key}={_hydra_value(value, key)}")
    return out


def _check_key(key: str) -> None:
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override key {key!r} is not a dotted params key such as 'train.epochs'")
    # Hydra's own node (hydra.searchpath, ...) would let an override load configs from elsewhere
    if key.split(".")[0] not in Params.model_fields:
        raise ConfigError(
            f"override key {key!r} is not a params.yaml key: it must start with one of {', '.join(Params.model_fields)}"
        )


def _hydra_value(value: Any, key: str) -> str:
    """`value` as a Hydra override value: strings quoted, and nothing that Hydra would resolve."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        if INTERPOLATION in value:  # Hydra resolves ${...} inside quotes too
            raise ConfigError(
                f"override {key!r} holds an interpolation ('{INTERPOLATION}...}}'): a value given for one run is a "
                "literal; interpolations and resolvers such as oc.env belong only in the committed conf/"
            )
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_hydra_value(v, key) for v in value) + "]"
    if isinstance(value, Mapping):
        bad = [k for k in value if not isinstance(k, str) or not _MAPPING_KEY.match(k)]
        if bad:
            raise ConfigError(f"override {key!r}: mapping key {bad[0]!r} is not a plain name such as 'Atelectasis'")
        return "{" + ",".join(f"{k}:{_hydra_value(v, key)}" for k, v in value.items()) + "}"
    raise ConfigError(f"override {key!r}: {value!r} is not a number, string, boolean, list or mapping")


def compose(root: str | Path = ".", overrides: Sequence[str] = ()) -> tuple[str, Params]:
    """params.yaml's text composed from conf/ with Hydra `overrides`, and its validated values.

    Raises:
        ConfigError: an override names an unknown key or profile, or the result is invalid.
    """
    from dvc.utils.hydra import compose_and_dump
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    root = Path(root).resolve()
    config_dir, config_name = hydra_settings(root)
    if not (config_dir / f"{config_name}.yaml").exists():
        raise ConfigError(f"{config_dir / config_name}.yaml not found: params.yaml is composed from it")
    for item in overrides:
        key, _, name = item.partition("=")
        if key == PROFILE_KEY and name not in known_profiles(config_dir):
            raise ConfigError(
                f"{config_dir / PROFILE_KEY / name}.yaml not found: profile {name!r} is not one of "
                f"{', '.join(known_profiles(config_dir))}"
            )
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / PARAMS
        try:
            compose_and_dump(
                out, str(config_dir), None, config_name, str(root / ".dvc" / "hydra_plugins"), list(overrides)
            )
        except (HydraException, OmegaConfBaseException) as e:
            raise ConfigError(f"{config_dir}: cannot compose with {list(overrides)}: {_first_line(e)}") from None
        text = out.read_text(encoding="utf-8")
        params = validate(Params, yaml.safe_load(text), where=f"{config_dir} composed with {list(overrides)}")
    return text, params


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return " ".join(text.split("\n")[:2])


def parse_sets(items: Sequence[str]) -> dict[str, Any]:
    """`key=value` strings (values read as YAML scalars) as a dict of dotted keys."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set train.epochs=2")
        out[key] = yaml.safe_load(value)  # 2 -> int, true -> bool, nih -> str
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default=PARAMS, help="the params file (default: %(default)s)")
    p.add_argument("--profile", default=None, help="conf/profile/<name>.yaml to compose with (default: conf's)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key (repeatable), e.g. --set train.epochs=2",
    )
    p.add_argument("--out", default=None, help="file to write (default: the --params file)")
    p.add_argument("--check", action="store_true", help="only check that the file equals the composition")
    args = p.parse_args(argv)
    overrides = parse_sets(args.set)
    if args.profile:
        overrides = {PROFILE_KEY: args.profile, **overrides}
    target = Path(args.out or args.params)
    root = Path.cwd()  # the project: conf/ and .dvc/config
    text, params = compose(root, override_strings(overrides))
    if args.check:
        current = target.read_text(encoding="utf-8") if target.exists() else ""
        if current != text:
            raise ConfigError(
                f"{target} is not what conf/ composes to{' with ' + json.dumps(overrides) if overrides else ''}: "
                "edit conf/, then run `make params` (or `python -m components.params`) to rewrite it"
            )
        print(f"[params] {target} matches conf/ (profile {params.profile})")
        return 0
    write_text(target, text)
    print(f"[params] wrote {target} (profile {params.profile}{', ' + json.dumps(overrides) if overrides else ''})")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main("params", main))
