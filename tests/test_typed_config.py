"""The shared typed-config loader: file text to a table, values checked against type hints, dataclasses built."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml

from clients.typed_config import (
    ConfigError,
    UnknownKeyError,
    WrongTypeError,
    build,
    check_value,
    closest_key,
    config_format,
    describe,
    parse_config_text,
    reject_unknown,
)


@dataclasses.dataclass
class Inner:
    rate: float = 0.1
    name: str | None = None


@dataclasses.dataclass
class Outer:
    steps: int = 1
    mode: Literal["fast", "slow"] = "fast"
    chunk: int | Literal["auto"] = "auto"
    tags: list[str] = dataclasses.field(default_factory=list)
    inner: Inner = dataclasses.field(default_factory=Inner)


@pytest.mark.parametrize(
    ("hint", "value", "expected"),
    [
        (int, 3, 3),
        (float, 2, 2.0),  # an int is widened for a float
        (float, 2.5, 2.5),
        (bool, False, False),
        (str, "x", "x"),
        (int | None, None, None),
        (int | Literal["auto"], "auto", "auto"),
        (int | Literal["auto"], 4, 4),
        (Literal["a", "b"], "b", "b"),
        (list[str], ["a", "b"], ["a", "b"]),
        (list[float], [1, 2.5], [1.0, 2.5]),
        (Path, "c.pem", Path("c.pem")),  # paths are written as strings
        (Path | None, None, None),
    ],
)
def test_values_that_fit_are_kept_or_converted(hint: Any, value: Any, expected: Any) -> None:
    checked = check_value("key", hint, value)
    assert checked == expected
    assert type(checked) is type(expected)


@pytest.mark.parametrize(
    ("hint", "value", "message"),
    [
        (int, "four", "n must be int, got 'four'"),
        (int, True, "n must be int, got True"),  # bool is not an int here
        (float, True, "n must be float or int, got True"),
        (float, "1e-4", "n must be float or int, got '1e-4'"),
        (str, 3, "n must be str, got 3"),
        (bool, 1, "n must be bool, got 1"),
        (int | None, "x", "n must be int or null, got 'x'"),
        (int | Literal["auto"], "all", "n must be int or 'auto', got 'all'"),
        (int | Literal["auto"], False, "n must be int or 'auto', got False"),
        (Literal["a", "b"], "c", "n = 'c' is not one of 'a', 'b'"),
        (list[str], "a", "n must be a list, got 'a'"),
        (list[str], ["a", 3], "n[1] must be str, got 3"),
        (Path | None, 3, "n must be str or null, got 3"),
    ],
)
def test_values_that_do_not_fit_name_the_key_and_the_types(hint: Any, value: Any, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        check_value("n", hint, value)
    assert str(raised.value) == message


def test_a_wrong_type_carries_its_parts_for_callers_that_word_it_their_way() -> None:
    with pytest.raises(WrongTypeError) as raised:
        check_value("[server] port", int, "fast")
    assert (raised.value.key, raised.value.expected, raised.value.value) == ("[server] port", "int", "fast")


@pytest.mark.parametrize(
    ("hint", "words"),
    [
        (int, "int"),
        (float, "float or int"),
        (str | None, "str or null"),
        (Path, "str"),
        (Literal["x", "y"], "'x' or 'y'"),
        (list[int], "a list"),
    ],
)
def test_describe_names_types_as_a_config_file_writes_them(hint: Any, words: str) -> None:
    assert describe(hint) == words


def test_build_makes_nested_dataclasses_from_tables() -> None:
    built = build(Outer, {"steps": 2, "chunk": 8, "tags": ["a"], "inner": {"rate": 1, "name": "n"}})
    assert built == Outer(steps=2, chunk=8, tags=["a"], inner=Inner(rate=1.0, name="n"))
    assert isinstance(built.inner.rate, float)
    assert build(Outer, {}) == Outer()


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"inner": {"rate": "fast"}}, "inner.rate must be float or int, got 'fast'"),
        ({"inner": 3}, "inner must be a table of settings, got 3"),
        ({"mode": "medium"}, "mode = 'medium' is not one of 'fast', 'slow'"),
    ],
)
def test_build_names_the_dotted_key_of_a_bad_value(table: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        build(Outer, table)
    assert str(raised.value) == message


def test_a_prefix_names_the_table_in_errors() -> None:
    with pytest.raises(ConfigError, match=r"^config must be a table of settings, got \[1\]$"):
        build(Outer, [1])
    with pytest.raises(ConfigError, match=r"^opts\.steps must be int, got 'x'$"):
        build(Outer, {"steps": "x"}, prefix="opts.")


@pytest.mark.parametrize(
    ("table", "key", "suggestion"),
    [
        ({"rate": 1}, "rate", "inner.rate"),  # a setting of another section
        ({"inner": {"rat": 1}}, "inner.rat", "inner.rate"),  # misspelled
        ({"step": 1}, "step", "steps"),
    ],
)
def test_an_unknown_key_suggests_the_setting_it_most_likely_means(
    table: dict[str, Any], key: str, suggestion: str
) -> None:
    with pytest.raises(UnknownKeyError) as raised:
        build(Outer, table)
    assert str(raised.value).startswith(f"unknown config key {key}; known keys here: ")
    assert str(raised.value).endswith(f". Did you mean {suggestion}?")
    assert raised.value.suggestion == suggestion


def test_an_unrelated_key_gets_no_suggestion() -> None:
    with pytest.raises(UnknownKeyError) as raised:
        build(Outer, {"inner": {"zzz": 1}})
    assert str(raised.value) == "unknown config key inner.zzz; known keys here: name, rate"
    assert (raised.value.suggestion, raised.value.did_you_mean) == (None, "")


def test_reject_unknown_checks_any_key_set_and_lists_every_unknown_key() -> None:
    reject_unknown({"port": 1}, {"host", "port"})
    with pytest.raises(UnknownKeyError) as raised:
        reject_unknown({"prot": 1, "zzz": 2, "host": "h"}, {"port", "host"})
    assert (raised.value.unknown, raised.value.known, raised.value.suggestion) == (
        ["prot", "zzz"],
        ["host", "port"],
        "port",
    )


def test_closest_key_prefers_the_same_name_then_the_closest_spelling() -> None:
    keys = ["seed", "train.learning_rate", "train.batch_size", "sample.batch_size"]
    assert closest_key("learning_rate", keys) == "train.learning_rate"
    assert closest_key("train.learning_rat", keys) == "train.learning_rate"
    assert closest_key("batch_size", keys) == "train.batch_size"  # the first of several
    assert closest_key("colour", keys) is None


def test_yaml_reads_exponents_without_a_dot_as_floats() -> None:
    text = "a: 1e-4\nb: 2E-3\nc: -1.5e+2\nd: .5e1\ne: 1.0e-4\nn: 7\nm: -3\ns: 1e5x\nq: '1e-4'\nf: 0.5\n"
    assert parse_config_text(text, "yaml") == {
        "a": 1e-4,
        "b": 2e-3,
        "c": -150.0,
        "d": 5.0,
        "e": 1e-4,
        "n": 7,
        "m": -3,
        "s": "1e5x",  # not a number
        "q": "1e-4",  # quoted: a string
        "f": 0.5,
    }
    document = parse_config_text(text, "yaml")
    assert [type(document[k]) for k in "abcdenmsqf"] == [float] * 5 + [int] * 2 + [str] * 2 + [float]
    assert yaml.safe_load("x: 1e-4") == {"x": "1e-4"}  # PyYAML's own loader is left as it is


def test_toml_and_yaml_read_the_same_table() -> None:
    toml = parse_config_text('[train]\nlearning_rate = 1e-4\nsteps = 3\nname = "x"\n', "toml")
    assert toml == parse_config_text("train:\n  learning_rate: 1e-4\n  steps: 3\n  name: x\n", "yaml")
    assert parse_config_text("", "yaml") == {}
    assert parse_config_text("", "toml") == {}
    assert parse_config_text("- 1\n- 2\n", "yaml") == [1, 2]  # the caller decides whether a list may be a config


@pytest.mark.parametrize(("text", "form"), [("[train\n", "toml"), ("a: [1\n", "yaml"), ("a: 2001-13-45\n", "yaml")])
def test_text_that_does_not_parse_is_a_config_error(text: str, form: Literal["toml", "yaml"]) -> None:
    with pytest.raises(ConfigError):
        parse_config_text(text, form)


@pytest.mark.parametrize(
    ("name", "form"), [("a.toml", "toml"), ("a.yaml", "yaml"), ("a.yml", "yaml"), ("a.json", None), ("a", None)]
)
def test_config_format_follows_the_suffix(name: str, form: str | None) -> None:
    assert config_format(Path(name)) == form
