"""Reward types by name: the built-in ones, those that plugins register, and those installed packages declare.

``build_reward(type, name, options)`` is the one way every front end constructs a reward. The plugin API that adds
types (``reward_server.plugins``) registers them here; this module imports no plugin code, so that the rewards package
and the plugin API do not import each other.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import re
from collections.abc import Callable, Mapping
from typing import Any

from reward_server.rewards.aesthetic import Aesthetic
from reward_server.rewards.base import Reward, RewardSpec
from reward_server.rewards.jpeg import JpegSize
from reward_server.rewards.llava import LlavaBertScore, LlavaVqa
from reward_server.rewards.remote import REMOTE, RemoteReward

ENTRY_POINT_GROUP = "ddpo.rewards"
# Served names become health-service names ("reward/NAME") and Triton model names.
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,63}")

RewardFactory = Callable[..., Reward]

# type name -> factory(name, **options). The served name defaults to the type name.
BUILTIN_REWARD_TYPES: dict[str, RewardFactory] = {
    "jpeg_compressibility": lambda name: JpegSize(name, sign=-1),
    "jpeg_incompressibility": lambda name: JpegSize(name, sign=+1),
    # model rewards: torch and transformers (the rewards extra); weights load in ``Reward.load``
    "aesthetic": Aesthetic,
    "llava_bertscore": LlavaBertScore,
    "llava_vqa": LlavaVqa,
    # a reward served by another endpoint (grpc://, triton://, http://), forwarded as is
    REMOTE: RemoteReward,
}

# type name -> (factory(name, **options), the module that registered it, or None for built-ins)
_types: dict[str, tuple[RewardFactory, str | None]] = {name: (f, None) for name, f in BUILTIN_REWARD_TYPES.items()}


class PluginError(ValueError):
    """A plugin that cannot be used: it does not import, or it breaks the reward contract."""


def check_name(name: object, what: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise PluginError(
            f"{what} {name!r} is not a valid reward name: start with a letter, then letters, digits, '_', '.' or '-' "
            "(at most 64 characters)"
        )
    return name


def register_type(type_name: str, factory: RewardFactory, module: str) -> None:
    """Serve ``factory`` as ``type_name``; PluginError if the name is invalid or another module registered it."""
    check_name(type_name, "reward type")
    known = _types.get(type_name)
    if known is not None and known[1] != module:
        origin = "a built-in reward" if known[1] is None else f"module {known[1]!r}"
        raise PluginError(f"module {module!r} registers reward type {type_name!r}, which {origin} already registers")
    _types[type_name] = (factory, module)


def types_registered_by(module: str) -> list[str]:
    """The reward types ``module`` has registered so far, sorted."""
    return sorted(type_name for type_name, (_, origin) in _types.items() if origin == module)


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    return {entry.name: entry for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def reward_types() -> list[str]:
    """Every reward type that can be configured: built-in, loaded plugins, and installed entry points."""
    return sorted(set(_types) | set(_entry_points()))


def plugin_module(type_name: str) -> str | None:
    """The module that registered ``type_name`` (None for built-ins and types not loaded yet)."""
    known = _types.get(type_name)
    return known[1] if known is not None else None


def reward_factory(type_name: str) -> RewardFactory:
    """The factory of ``type_name``, importing the installed package that declares it when needed."""
    if type_name not in _types:
        entry = _entry_points().get(type_name)
        if entry is None:
            raise ValueError(f"unknown reward type {type_name!r}; known types: {', '.join(reward_types())}")
        package = f" (package {entry.dist.name})" if entry.dist is not None else ""
        what = f"entry point {type_name} = {entry.value!r} in group {ENTRY_POINT_GROUP!r}{package}"
        try:
            entry.load()
        except PluginError as error:
            raise PluginError(f"{what}: {error}") from error
        except Exception as error:
            raise PluginError(f"{what} failed to import: {type(error).__name__}: {error}") from error
        if type_name not in _types:
            raise PluginError(
                f"{what} imported but did not register reward type {type_name!r}; the entry point's name must be "
                "the name given to @reward(name=...) or @register_reward_type(...)"
            )
    return _types[type_name][0]


def build_reward(reward_type: str, name: str | None = None, options: Mapping[str, Any] | None = None) -> Reward:
    """Construct the reward ``reward_type`` served as ``name``, checking ``options`` against its factory, and the
    result against the reward contract (a plugin's factory may break it)."""
    factory = reward_factory(reward_type)
    name = name or reward_type
    options = dict(options or {})
    accepted = [p for p in inspect.signature(factory).parameters if p != "name"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        takes = f"takes options {', '.join(accepted)}" if accepted else "takes no options"
        raise ValueError(f"reward type {reward_type!r} {takes}; got unknown option(s) {', '.join(unknown)}")
    reward = factory(name, **options)
    if not isinstance(reward, Reward) or not isinstance(getattr(reward, "spec", None), RewardSpec):
        raise PluginError(
            f"reward type {reward_type!r} built {type(reward).__name__}, which is not a Reward with a RewardSpec `spec`"
        )
    if reward.spec.name != name:
        raise PluginError(
            f"reward type {reward_type!r} built a reward whose spec is named {reward.spec.name!r} instead of the "
            f"served name {name!r}; set RewardSpec(name=name, ...) from the constructor's `name` argument"
        )
    return reward
