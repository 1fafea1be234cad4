"""Typed configuration: a TOML or YAML file read into a table, and a table checked into a dataclass.

The trainer's config (``trainer.config``) and the reward server's (``reward_server.config``) both load through here,
so a value is read and checked the same way in both. Base dependencies only: PyYAML is imported for YAML alone.
Every error is a ConfigError; the two kinds a caller may word its own way (UnknownKeyError, WrongTypeError) carry
their parts as attributes.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
import tomllib
import types
import typing
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

if TYPE_CHECKING:
    import yaml
    from _typeshed import DataclassInstance

Settings = TypeVar("Settings", bound="DataclassInstance")

ConfigFormat = Literal["toml", "yaml"]
_FORMATS: dict[str, ConfigFormat] = {".toml": "toml", ".yaml": "yaml", ".yml": "yaml"}

# How check_value's errors name a type where its Python name would mislead: a float setting takes an int, a path
# is written as a string, and TOML/YAML call None null.
_TYPE_NAMES: dict[Any, str] = {float: "float or int", Path: "str", type(None): "null"}


class ConfigError(ValueError):
    """A configuration file or value that cannot be used, with the key and the fix in the message."""


class UnknownKeyError(ConfigError):
    """A table holds keys that no setting reads: a typo, or a setting of another section."""

    def __init__(self, prefix: str, unknown: Sequence[str], known: Sequence[str], suggestion: str | None) -> None:
        self.unknown = list(unknown)
        self.known = list(known)
        self.suggestion = suggestion
        super().__init__(
            f"unknown config key {prefix}{unknown[0]}; known keys here: {', '.join(known)}{self.did_you_mean}"
        )

    @property
    def did_you_mean(self) -> str:
        """ ". Did you mean train.learning_rate?" where a known key is close, else ""."""
        return f". Did you mean {self.suggestion}?" if self.suggestion else ""


class WrongTypeError(ConfigError):
    """A value whose type does not fit its setting."""

    def __init__(self, key: str, expected: str, value: Any) -> None:
        self.key = key
        self.expected = expected
        self.value = value
        super().__init__(f"{key} must be {expected}, got {value!r}")


def config_format(path: Path) -> ConfigFormat | None:
    """How the config file at ``path`` is read, by its suffix (.toml, .yaml or .yml); None for any other suffix."""
    return _FORMATS.get(path.suffix)


def parse_config_text(text: str, form: ConfigFormat) -> Any:
    """The document in a config file's text (an empty YAML file is an empty table); ConfigError with the parser's
    message if the text is not valid TOML or YAML. YAML reads 1e-4 as a float, as TOML and YAML 1.2 do."""
    if form == "toml":
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(str(error)) from None
    import yaml

    try:
        document = yaml.load(text, Loader=_yaml_loader())  # a SafeLoader: no Python objects
    except (yaml.YAMLError, ValueError) as error:  # ValueError: a well-formed but impossible date
        raise ConfigError(str(error)) from None
    return {} if document is None else document


@functools.cache
def _yaml_loader() -> type[yaml.SafeLoader]:
    """``yaml.safe_load``'s loader, except that 1e-4 is a float: PyYAML follows YAML 1.1, which needs a dot (1.0e-4)
    and reads 1e-4 as a string."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    exponent = re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$")
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", exponent, list("-+0123456789."))
    return Loader


def check_value(key: str, hint: Any, value: Any) -> Any:
    """``value`` as a setting typed ``hint`` holds it: an int widened for a float, a str made a Path, a list checked
    item by item. A value that does not fit is a WrongTypeError naming ``key`` (a ConfigError listing the choices for
    a Literal). bool is not an int here, though it is in Python."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"{key} = {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin in (types.UnionType, typing.Union):
        for arg in typing.get_args(hint):
            try:
                return check_value(key, arg, value)
            except ConfigError:
                continue
        raise WrongTypeError(key, describe(hint), value)
    if origin is list:
        if not isinstance(value, list):
            raise WrongTypeError(key, describe(hint), value)
        (item,) = typing.get_args(hint)
        return [check_value(f"{key}[{i}]", item, v) for i, v in enumerate(value)]
    if isinstance(value, bool) and hint is not bool:
        raise WrongTypeError(key, describe(hint), value)
    if hint is float and isinstance(value, int):
        return float(value)
    if hint is Path and isinstance(value, str):
        return Path(value)
    if not isinstance(value, hint):
        raise WrongTypeError(key, describe(hint), value)
    return value


def describe(hint: Any) -> str:
    """A type as an error names it: ``int``, ``float or int``, ``int or 'auto'``, ``str or null``, ``a list``."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        return " or ".join(map(repr, typing.get_args(hint)))
    if origin in (types.UnionType, typing.Union):
        return " or ".join(map(describe, typing.get_args(hint)))
    if origin is list:
        return "a list"
    return _TYPE_NAMES.get(hint) or str(hint.__name__)


def check_fields(cls: type[Any], table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``table``'s values as the fields of dataclass ``cls`` hold them (``check_value``); ``prefix`` + key names a
    value in errors ("train." + "batch_size"). Every key must be a field of ``cls`` (``reject_unknown`` first)."""
    hints = typing.get_type_hints(cls)
    return {name: check_value(f"{prefix}{name}", hints[name], value) for name, value in table.items()}


def build(cls: type[Settings], table: Any, prefix: str = "") -> Settings:
    """Dataclass ``cls`` from ``table``: sub-tables become its nested dataclasses, values are checked against their
    fields (``check_fields``), and a key that is no field is an UnknownKeyError suggesting the setting anywhere in
    ``cls`` it most likely means. ``prefix`` names the table's keys in errors, as in ``check_fields``."""
    return _build(cls, table, prefix, dotted_keys(cls, prefix))


def _build(cls: type[Settings], table: Any, prefix: str, candidates: Sequence[str]) -> Settings:
    if not isinstance(table, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a table of settings, got {table!r}")
    reject_unknown(table, [field.name for field in dataclasses.fields(cls)], prefix, candidates)
    hints = typing.get_type_hints(cls)
    nested = {
        name: _build(hints[name], value, f"{prefix}{name}.", candidates)
        for name, value in table.items()
        if _is_dataclass_type(hints[name])
    }
    plain = {name: value for name, value in table.items() if name not in nested}
    return cls(**check_fields(cls, plain, prefix), **nested)


def reject_unknown(
    table: Mapping[str, Any], known: Collection[str], prefix: str = "", candidates: Sequence[str] | None = None
) -> None:
    """UnknownKeyError if ``table`` has keys outside ``known``, suggesting the one of ``candidates`` (dotted keys; by
    default ``prefix`` + each known key) that the first unknown key, ``prefix`` + key, most likely means."""
    unknown = sorted(set(table) - set(known))
    if unknown:
        choices = [f"{prefix}{key}" for key in sorted(known)] if candidates is None else candidates
        raise UnknownKeyError(prefix, unknown, sorted(known), closest_key(f"{prefix}{unknown[0]}", choices))


def dotted_keys(cls: type[Any], prefix: str = "") -> list[str]:
    """Every setting of dataclass ``cls`` as a dotted key, nested dataclasses included: model, train.learning_rate."""
    keys = []
    for name, hint in typing.get_type_hints(cls).items():
        if _is_dataclass_type(hint):
            keys += dotted_keys(hint, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def closest_key(key: str, candidates: Sequence[str]) -> str | None:
    """The candidate a misspelled or misplaced key most likely means: the same name in another section
    (learning_rate: train.learning_rate), else the closest spelling (train.learning_rat: train.learning_rate)."""
    leaf = key.rpartition(".")[2]
    same_name = [candidate for candidate in candidates if candidate.rpartition(".")[2] == leaf]
    if same_name:
        return same_name[0]
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.75)
    return close[0] if close else None


def _is_dataclass_type(hint: Any) -> bool:
    return isinstance(hint, type) and dataclasses.is_dataclass(hint)
