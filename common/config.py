"""Strict TOML reading: every key is read once, typed, and unknown keys stop start-up.

Both programs read their TOML through `Table`, which remembers the keys taken and names
the file and the dotted key in every error (fail closed, never warn-and-ignore).
"""

from __future__ import annotations

import difflib
import math
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from common.errors import ConfigError

T = TypeVar("T")
_MISSING: Any = object()


def load_toml(path: Path) -> dict[str, Any]:
    """Read a TOML file.

    Raises:
        ConfigError: missing, unreadable or invalid file.
    """
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"{path}: configuration file not found") from None
    except PermissionError:
        raise ConfigError(f"{path}: permission denied") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a configuration file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None


def parse_host_port(value: str, where: str, default_port: int | None = None) -> tuple[str, int]:
    """Split "host:port" or "[v6]:port".

    Raises:
        ConfigError: malformed value or port out of range.
    """
    bracketed_alone = value.startswith("[") and value.endswith("]")
    host, sep, port_text = value.rpartition(":")
    if not sep or bracketed_alone:
        if default_port is None:
            raise ConfigError(f"{where}: expected host:port, got {value!r}")
        host, port_text = value, str(default_port)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ConfigError(f"{where}: write an IPv6 address in brackets, as [::1]:2222")
    numeric = port_text.isascii() and port_text.isdecimal()
    if not host or not numeric or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"{where}: expected host:port with a port 0-65535, got {value!r}")
    return host, int(port_text)


class Table:
    """One TOML table being read; ``done()`` refuses keys nobody asked for."""

    def __init__(self, data: Mapping[str, Any], source: Path, prefix: str = "") -> None:
        self._data = data
        self.source = source
        self.prefix = prefix
        self._taken: set[str] = set()

    def where(self, key: str) -> str:
        return f"{self.source}: {self.prefix}{key}"

    def has(self, key: str) -> bool:
        return key in self._data

    def _get(self, key: str, kind: type[T] | tuple[type, ...], default: Any, what: str) -> Any:
        self._taken.add(key)
        if key not in self._data:
            if default is _MISSING:
                raise ConfigError(f"{self.where(key)} is required")
            return default
        value = self._data[key]
        if isinstance(value, bool) and kind not in (bool, object):
            raise ConfigError(f"{self.where(key)} must be {what}, not a boolean")
        if not isinstance(value, kind):
            raise ConfigError(f"{self.where(key)} must be {what}, got {value!r}")
        return value

    def text(self, key: str, default: Any = _MISSING, *, choices: tuple[str, ...] = ()) -> Any:
        value = self._get(key, str, default, "a string")
        if choices and value is not default and value not in choices:
            raise ConfigError(f"{self.where(key)} must be one of {', '.join(choices)}")
        return value

    def integer(self, key: str, default: Any = _MISSING, *, low: int = 0, high: int = 2**62) -> Any:
        value = self._get(key, int, default, "an integer")
        if value is not default and not low <= value <= high:
            raise ConfigError(f"{self.where(key)} must be between {low} and {high}")
        return value

    def number(
        self, key: str, default: Any = _MISSING, *, low: float = 0.0, high: float = math.inf
    ) -> Any:
        value = self._get(key, (int, float), default, "a number")
        if value is default or value is None:
            return float(value) if value is not None else None
        if not math.isfinite(value):  # TOML allows nan and inf; no setting means either
            raise ConfigError(f"{self.where(key)} must be a finite number, got {value!r}")
        if value < low:
            raise ConfigError(f"{self.where(key)} must be at least {low}")
        if value > high:
            raise ConfigError(f"{self.where(key)} must be at most {high}")
        return float(value)

    def flag(self, key: str, default: Any = _MISSING) -> Any:
        return self._get(key, bool, default, "true or false")

    def path(self, key: str, default: Any = _MISSING) -> Any:
        value = self._get(key, str, default, "a path")
        if value is default:
            return value
        if not value:
            raise ConfigError(f"{self.where(key)} must not be empty")
        path = Path(value)
        return path if path.is_absolute() else (self.source.parent / path)

    def str_list(self, key: str, default: Any = _MISSING) -> Any:
        value = self._get(key, list, default, "a list of strings")
        if value is not default and not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{self.where(key)} must be a list of strings")
        return tuple(value) if value is not default else value

    def raw(self, key: str, default: Any = _MISSING) -> Any:
        """The value as TOML gave it, for a key with a union type; caller checks it."""
        return self._get(key, object, default, "a value")

    def table(self, key: str, *, required: bool = False) -> Table:
        value = self._get(key, dict, _MISSING if required else {}, "a table")
        return Table(value, self.source, f"{self.prefix}{key}.")

    def tables(self, key: str) -> list[Table]:
        value = self._get(key, list, [], "an array of tables ([[...]])")
        out = []
        for index, item in enumerate(value):
            if not isinstance(item, dict):
                raise ConfigError(f"{self.where(key)}[{index}] must be a table")
            out.append(Table(item, self.source, f"{self.prefix}{key}[{index}]."))
        return out

    def done(self) -> None:
        """Raises ConfigError naming the first key that no reader asked for."""
        unknown = sorted(set(self._data) - self._taken)
        if unknown:
            raise ConfigError(f"{self.where(unknown[0])}: unknown key{self._hint(unknown[0])}")

    def _hint(self, key: str) -> str:
        """ "; did you mean 'x'?" when a known key of this table is close to ``key``."""
        close = difflib.get_close_matches(key, sorted(self._taken), n=1, cutoff=0.75)
        return f"; did you mean {close[0]!r}?" if close else ""
