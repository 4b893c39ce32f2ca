"""Compose params.yaml from conf/: the base settings, one profile and overrides.

This is the composition `dvc exp run` performs (DVC's Hydra support, enabled in .dvc/config), made
available to `dvc repro`, to orchestrated runs and to checks:

    python -m components.params                          # conf/config.yaml, demo profile
    python -m components.params --profile paper --set train.epochs=20
    python -m components.params --check                  # fail when params.yaml is not conf/'s

The composed file is validated before it replaces params.yaml, so a wrong override fails here,
naming the key, and params.yaml stays as it was.
"""

from __future__ import annotations

import argparse
import configparser
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from components.common import run_main
from pipeline.config import ConfigError, Params, validate

PARAMS = "params.yaml"
PROFILE_KEY = "profile"  # the config group that selects a profile (conf/profile/<name>.yaml)


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


def override_strings(overrides: Mapping[str, Any]) -> list[str]:
    """{dotted key: value} as Hydra override strings; `profile` selects a conf/profile/ entry."""
    out = []
    for key, value in overrides.items():
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override key {key!r} is not a dotted params key such as 'train.epochs'")
        out.append(f"{key}={value}" if key == PROFILE_KEY else f"{key}={_hydra_value(value)}")
    return out


def _hydra_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_hydra_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k}:{_hydra_value(v)}" for k, v in value.items()) + "}"
    raise ConfigError(f"override value {value!r} is not a number, string, boolean, list or mapping")


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


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


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
    write_atomic(target, text)
    print(f"[params] wrote {target} (profile {params.profile}{', ' + json.dumps(overrides) if overrides else ''})")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main("params", main))
