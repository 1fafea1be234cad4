"""Custom rewards as in-process plugins: the public API, and how the server finds them.

A plugin is a Python module that registers reward types when it is imported. A plain function is enough:

    from reward_server.plugins import reward

    @reward(name="brightness", description="Mean pixel value, 0-255", units="level")
    def brightness(images, prompts, metadata, *, gamma: float = 1.0):
        return [float((image / 255.0) ** gamma).mean() * 255 for image in images]

The function gets a batch (``images``: (H, W, C) uint8 arrays, ``prompts``, ``metadata``) and returns one float per
image, or a ``RewardOutput`` for components, info and per-item errors. Its keyword-only parameters are the reward's
options (``[rewards.NAME] options = {gamma = 2.2}``). A class with weights subclasses ``Reward`` and is registered with
``@register_reward_type("type_name")``; it is constructed as ``cls(name, **options)`` and loads in ``load``.

The server loads plugin modules named by ``--plugin`` or ``[server] plugins``, and reward types that installed
packages declare in the ``ddpo.rewards`` entry-point group, imported when a reward of that type is configured::

    [project.entry-points."ddpo.rewards"]
    brightness = "my_rewards:brightness"

Anything that goes wrong (an import error, a broken contract) raises ``PluginError`` at startup, naming the plugin.

The types themselves are kept in ``reward_server.rewards.catalog``, next to the built-in ones.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from reward_server.rewards.base import ImageSpec, ItemError, Metadata, Reward, RewardOutput, RewardSpec
from reward_server.rewards.catalog import (
    ENTRY_POINT_GROUP,
    PluginError,
    check_name,
    plugin_module,
    register_type,
    reward_types,
    types_registered_by,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "ImageSpec",
    "ItemError",
    "Metadata",
    "PluginError",
    "Reward",
    "RewardOutput",
    "RewardSpec",
    "load_plugin",
    "plugin_module",
    "register_reward_type",
    "reward",
    "reward_types",
]

_BATCH_PARAMETERS = ("images", "prompts", "metadata")


def register_reward_type(type_name: str) -> Callable[[type[Reward]], type[Reward]]:
    """Class decorator: serve a ``Reward`` subclass as ``type_name``; it is built as ``cls(name, **options)``."""

    def register(cls: type[Reward]) -> type[Reward]:
        if not (inspect.isclass(cls) and issubclass(cls, Reward)):
            raise PluginError(f"@register_reward_type({type_name!r}) decorates {cls!r}, which is not a Reward subclass")
        parameters = list(inspect.signature(cls).parameters)
        if not parameters or parameters[0] != "name":
            raise PluginError(
                f"reward type {type_name!r}: {cls.__qualname__}.__init__ must take the served name first, "
                f"as __init__(self, name, **options); it takes ({', '.join(parameters)})"
            )
        register_type(type_name, cls, cls.__module__)
        return cls

    return register


class FunctionReward(Reward):
    """A reward made of a function of the batch (see ``reward``)."""

    def __init__(
        self, spec: RewardSpec, function: Callable[..., Any], options: dict[str, Any], max_batch_size: int
    ) -> None:
        self.spec = spec
        self._function = function
        self._options = options
        self.preferred_max_batch_size = max_batch_size

    def score(self, images: Sequence[Any], prompts: Sequence[str | None], metadata: Sequence[Metadata]) -> RewardOutput:
        output = self._function(images, prompts, metadata, **self._options)
        if isinstance(output, RewardOutput):
            return output
        # A malformed answer (wrong length, NaN) is caught by RewardOutput.item_errors and fails the items.
        return RewardOutput(scores=np.asarray(output, dtype=np.float64).reshape(-1))


def reward(
    *,
    name: str,
    description: str,
    units: str = "",
    version: str = "1",
    higher_is_better: bool = True,
    requires_prompt: bool = False,
    image_spec: ImageSpec | None = None,
    component_names: Sequence[str] = (),
    max_batch_size: int = 32,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Function decorator: register ``function(images, prompts, metadata, **options)`` as the reward type ``name``.

    The function is returned unchanged, so it can still be called directly (in tests, say)."""
    check_name(name, "@reward name")
    if not description.strip():
        raise PluginError(f"@reward {name!r}: description is empty; say in one line what the score measures")
    if max_batch_size < 1:
        raise PluginError(f"@reward {name!r}: max_batch_size must be >= 1, got {max_batch_size}")
    if image_spec is not None and not isinstance(image_spec, ImageSpec):
        raise PluginError(f"@reward {name!r}: image_spec must be an ImageSpec, got {type(image_spec).__name__}")

    def register(function: Callable[..., Any]) -> Callable[..., Any]:
        parameters = list(inspect.signature(function).parameters.values())
        positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        options = [p for p in parameters if p.kind == p.KEYWORD_ONLY]
        if len(positional) != len(_BATCH_PARAMETERS) or len(options) != len(parameters) - len(positional):
            raise PluginError(
                f"@reward {name!r}: {function.__qualname__} must take (images, prompts, metadata) and then only "
                f"keyword-only options after a `*`; it takes ({', '.join(str(p) for p in parameters)})"
            )

        def build(served_name: str, **values: Any) -> Reward:
            spec = RewardSpec(
                name=served_name,
                description=description,
                version=version,
                units=units,
                higher_is_better=higher_is_better,
                requires_prompt=requires_prompt,
                image_spec=image_spec or ImageSpec(),
                component_names=tuple(component_names),
            )
            return FunctionReward(spec, function, values, max_batch_size)

        # build_reward checks a config's options against this signature: the served name, then the options.
        build.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            [inspect.Parameter("name", inspect.Parameter.POSITIONAL_OR_KEYWORD), *options]
        )
        register_type(name, build, function.__module__)
        return function

    return register


def load_plugin(module: str) -> list[str]:
    """Import a plugin module; returns the reward types it registered. PluginError if it fails or registers none."""
    before = types_registered_by(module)
    try:
        importlib.import_module(module)
    except PluginError:
        raise
    except Exception as error:
        raise PluginError(f"plugin {module!r} failed to import: {type(error).__name__}: {error}") from error
    registered = types_registered_by(module)
    if not registered and not before:
        raise PluginError(
            f"plugin {module!r} imported but registered no reward type; decorate a function with "
            "@reward_server.plugins.reward(...) or a Reward subclass with @register_reward_type(...)"
        )
    return registered
