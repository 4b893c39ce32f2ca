"""Typed stage configs filled from `params.yaml`, with the profile overlay and clear errors.

`params.yaml` holds one section per pipeline step with the demo values. Its top-level `profile`
key names an overlay in `profiles/<profile>.yaml` (e.g. `paper`) whose sections are deep-merged
over it, so switching profile is one parameter: `dvc exp run -S profile=paper` or an edit.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Mapping, TypeVar

import yaml

T = TypeVar("T")

DEFAULT_PARAMS = "params.yaml"
PROFILES_DIR = "profiles"


class ConfigError(ValueError):
    """A params file or key is wrong; the message names it and says what to do."""


def load_params(path: str | Path = DEFAULT_PARAMS, profile: str | None = None) -> dict[str, Any]:
    """Read `params.yaml` and merge the profile overlay named by its `profile` key (or `profile`)."""
    path = Path(path)
    params = _read_yaml(path)
    name = profile or params.get("profile", "demo")
    overlay_path = path.parent / PROFILES_DIR / f"{name}.yaml"
    if overlay_path.exists():
        params = deep_merge(params, _read_yaml(overlay_path))
    elif name != "demo":
        known = sorted(p.stem for p in (path.parent / PROFILES_DIR).glob("*.yaml"))
        raise ConfigError(
            f"{path}: profile '{name}' has no overlay {overlay_path}; known profiles: "
            f"{', '.join(['demo', *known])}"
        )
    params["profile"] = name
    return params


def deep_merge(base: Mapping[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in overlay.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def section(params: Mapping[str, Any], name: str) -> dict[str, Any]:
    """One top-level section of the params, or an error naming it."""
    if name not in params:
        raise ConfigError(f"params.yaml has no '{name}' section; add it (see the README)")
    value = params[name]
    if not isinstance(value, Mapping):
        raise ConfigError(f"params.yaml: '{name}' must be a mapping, got {type(value).__name__}")
    return dict(value)


def build(cls: type[T], values: Mapping[str, Any] | None, where: str) -> T:
    """Fill dataclass `cls` from `values`, recursing into nested dataclasses.

    Args:
        cls: a dataclass type whose fields all have defaults or appear in `values`.
        values: the mapping read from YAML (None means all defaults).
        where: the dotted params key of `values`, used in error messages (e.g. "train.loss").

    Raises:
        ConfigError: naming the dotted key of an unknown field, a missing one or a wrong type.
    """
    values = dict(values or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(
            f"params.yaml: unknown key(s) {', '.join(f'{where}.{k}' for k in unknown)}; "
            f"valid keys under '{where}': {', '.join(fields)}"
        )
    kwargs = {}
    for name, f in fields.items():
        key = f"{where}.{name}"
        if name not in values:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"params.yaml: missing required key '{key}'")
            continue
        kwargs[name] = _coerce(hints[name], values[name], key)
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if check is not None:
        try:
            check()
        except (ValueError, AssertionError) as e:
            raise ConfigError(f"params.yaml: '{where}': {e}") from None
    return obj


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"params.yaml: bad value for '{key}'")
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, Mapping):
            raise ConfigError(f"params.yaml: '{key}' must be a mapping")
        return build(hint, value, key)
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(
                f"params.yaml: '{key}' is {value!r}; choose one of {', '.join(map(repr, args))}"
            )
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"params.yaml: '{key}' must be a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_coerce(inner, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"params.yaml: '{key}' must be a mapping, got {value!r}")
        return dict(value)
    if hint is Any:
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"params.yaml: '{key}' must be a number, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"params.yaml: '{key}' must be an integer, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"params.yaml: '{key}' must be true or false, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"params.yaml: '{key}' must be a string, got {value!r}")
        return value
    return value


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path} not found: run from the repository root or pass --params") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sections at the top level")
    return data
