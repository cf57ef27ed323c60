"""Loading settings from a YAML file or a mapping, with readable errors."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from kernel.errors import ConfigError

from .schema import Settings

CONFIG_ENV = "CIVITAS_CONFIG"


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for err in exc.errors():
        # pydantic puts the union tag (e.g. 'oidc') into the location; drop it for readability
        loc = tuple(p for p in err["loc"]
                    if p not in ("oidc", "ldap", "function-after[_secret()]"))
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"  {_loc(loc)}: {msg}")
    return "\n".join(lines)


def settings_from_mapping(data: Mapping[str, Any], *, source: str = "settings") -> Settings:
    try:
        return Settings(**dict(data))
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from exc


def load_settings(path: str | os.PathLike[str] | None = None) -> Settings:
    """Read the YAML file (``--config`` or ``$CIVITAS_CONFIG``) and apply the environment."""
    chosen = path or os.environ.get(CONFIG_ENV)
    data: dict[str, Any] = {}
    source = "the environment"
    if chosen:
        file = Path(chosen)
        source = str(file)
        try:
            loaded = yaml.safe_load(file.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read configuration file {source}: {exc.strerror}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"configuration file {source} is not valid YAML: {exc}") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"configuration file {source} must hold a mapping at the top level")
        data = loaded
    return settings_from_mapping(data, source=source)
