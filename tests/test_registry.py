"""The server's reward registry (what scores a request, composites, states) and the shape of the package's imports."""

from __future__ import annotations

import ast
import asyncio
import dataclasses
import graphlib
import subprocess
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import grpc
import pytest
from grpc_health.v1._async import HealthServicer

from reward_server.batching import BatchingConfig, RewardWorker
from reward_server.composite import CompositeScorer
from reward_server.config import RewardConfig, reward_config
from reward_server.metrics import ServerMetrics
from reward_server.registry import LOADING, PER_REQUEST_COMPOSITE, RewardRegistry
from reward_server.rewards import ItemError, Reward
from tests.support import ROOT, SlowReward

# --- imports: no module of reward_server imports one that imports it back ----------------------------------------


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """Each reward_server module -> the reward_server modules it imports anywhere: at the top, in functions, and
    under TYPE_CHECKING. ``from package import module`` counts as importing the module."""
    files = {_module_name(path): path for path in (ROOT / "reward_server").rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        imported: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join([*package[: len(package) - node.level + 1], *([base] if base else [])])
                imported |= {f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names}
        graph[module] = {name for name in imported if name in files} - {module}
    return graph


def test_the_reward_server_package_has_no_import_circle() -> None:
    graph = _import_graph()
    assert "reward_server.registry" in graph["reward_server.server"]  # the parser sees the imports it should
    assert "reward_server.plugins" in graph["reward_server.config"]
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as circle:
        pytest.fail(f"import circle: {' -> '.join(circle.args[1])}")
    # the two circles there were, named so that a regression says which
    assert "reward_server.server" not in graph["reward_server.admin"]
    assert "reward_server.plugins" not in graph["reward_server.rewards"]
    assert "reward_server.rewards" not in graph["reward_server.plugins"]


@pytest.mark.parametrize(
    "module", ["reward_server.admin", "reward_server.plugins", "reward_server.registry", "reward_server.endpoints"]
)
def test_each_module_imports_first_in_a_fresh_interpreter(module: str) -> None:
    subprocess.run([sys.executable, "-c", f"import {module}"], cwd=ROOT, check=True)


def test_the_triton_backend_and_export_build_rewards_without_the_grpc_server() -> None:
    check = (
        "import sys, reward_server.triton.backend, reward_server.triton.export\n"
        "assert 'reward_server.server' not in sys.modules, 'the Triton backend imports the gRPC server'\n"
    )
    subprocess.run([sys.executable, "-c", check], cwd=ROOT, check=True)


# --- what scores a request ---------------------------------------------------------------------------------------


def _registry(rewards: Sequence[Reward], configs: Sequence[RewardConfig] = ()) -> RewardRegistry:
    return RewardRegistry([r.spec for r in rewards], configs, HealthServicer(), ServerMetrics())


def _run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(test())


def _composite(name: str, **weights: float) -> RewardConfig:
    return reward_config(name, {"type": "composite", "weights": weights})


def _error(found: object) -> ItemError:
    assert isinstance(found, ItemError), found
    return found


def test_a_serving_reward_is_scored_by_its_worker_and_the_others_say_why_not() -> None:
    a, b, c = SlowReward("a", delay=0), SlowReward("b", delay=0), SlowReward("c", delay=0)

    async def test() -> None:
        registry = _registry([a, b, c])
        worker = await registry.serve(a, BatchingConfig())
        registry.fail("c", "RuntimeError: no weights")
        assert registry.scorer("a", {}) is worker
        loading = _error(registry.scorer("b", {}))
        assert loading.code == grpc.StatusCode.UNAVAILABLE
        assert loading.message == "reward 'b' is still loading (health service 'reward/b')"
        failed = _error(registry.scorer("c", {}))
        assert failed.code == grpc.StatusCode.FAILED_PRECONDITION
        assert failed.message == "reward 'c' failed to load: RuntimeError: no weights (health service 'reward/c')"
        unknown = _error(registry.scorer("nope", {}))
        assert unknown.code == grpc.StatusCode.NOT_FOUND
        assert unknown.message == "unknown reward 'nope'; this server offers: a, b, c"
        empty = _error(registry.scorer("", {}))
        assert (empty.code, empty.message) == (grpc.StatusCode.NOT_FOUND, "reward is empty; name one of: a, b, c")
        assert registry.unavailable() == {"b": LOADING, "c": "failed to load: RuntimeError: no weights"}
        assert registry.load_errors() == {"c": "failed to load: RuntimeError: no weights"}
        assert [registry.state(name) for name in "abc"] == [
            "serving",
            LOADING,
            "failed to load: RuntimeError: no weights",
        ]
        await registry.stop()

    _run(test)


def test_a_request_s_weights_are_scored_by_a_composite_of_the_serving_rewards() -> None:
    a, b = SlowReward("a", delay=0), SlowReward("b", delay=0)

    async def test() -> None:
        registry = _registry([a, b], [_composite("both", a=1.0, b=0.5)])
        await registry.serve(a, BatchingConfig())
        assert _error(registry.scorer("", {"a": 1.0, "b": 2.0})).code == grpc.StatusCode.UNAVAILABLE  # b loads
        await registry.serve(b, BatchingConfig())
        await registry.start_composites()
        composite = registry.scorer("ignored when weights are set", {"a": 1.0, "b": 2.0})
        assert isinstance(composite, CompositeScorer)
        assert composite.name == PER_REQUEST_COMPOSITE
        assert composite.spec.component_names == ("a", "b")
        nested = _error(registry.scorer("", {"a": 1.0, "both": 1.0}))
        assert nested.code == grpc.StatusCode.INVALID_ARGUMENT
        assert nested.message == "weights: 'both' is itself a composite; weigh its components instead"
        bad = _error(registry.scorer("", {"a": float("nan")}))
        assert bad.code == grpc.StatusCode.INVALID_ARGUMENT
        assert bad.message.startswith("weights: the weight of 'a' must be a finite number")
        assert _error(registry.scorer("", {"missing": 1.0})).code == grpc.StatusCode.NOT_FOUND
        await registry.stop()

    _run(test)


def test_a_named_composite_serves_once_its_components_do_and_fails_with_them() -> None:
    a, b, c = SlowReward("a", delay=0), SlowReward("b", delay=0), SlowReward("c", delay=0)
    configs = [_composite("ab", a=1.0, b=1.0), _composite("ac", a=1.0, c=1.0)]

    async def test() -> None:
        registry = _registry([a, b, c], configs)
        assert registry.specs["ab"].description == "1 × a + 1 × b"  # provisional
        await registry.serve(a, BatchingConfig())
        await registry.start_composites()
        assert _error(registry.scorer("ab", {})).code == grpc.StatusCode.UNAVAILABLE
        await registry.serve(b, BatchingConfig())
        registry.fail("c", "OSError: gone")
        await registry.start_composites()
        ab = registry.scorer("ab", {})
        assert isinstance(ab, CompositeScorer)
        assert registry.specs["ab"] is ab.spec
        assert registry.state("ac") == "failed to load: component 'c' failed to load: OSError: gone"
        assert _error(registry.scorer("ac", {})).code == grpc.StatusCode.FAILED_PRECONDITION
        assert registry.composites_using("a") == ["ab", "ac"]
        assert set(registry.workers()) == {"a", "b"}
        assert all(isinstance(w, RewardWorker) for w in registry.workers().values())
        await registry.stop()

    _run(test)


def test_a_named_composite_whose_components_do_not_fit_fails_to_load() -> None:
    a = SlowReward("a", delay=0)
    lower = SlowReward("lower", delay=0)
    lower.spec = dataclasses.replace(lower.spec, higher_is_better=False)

    async def test() -> None:
        registry = _registry([a, lower], [_composite("mixed", a=1.0, lower=1.0)])
        await registry.serve(a, BatchingConfig())
        await registry.serve(lower, BatchingConfig())
        await registry.start_composites()
        failed = _error(registry.scorer("mixed", {}))
        assert failed.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "lower is lower-is-better" in failed.message
        await registry.stop()

    _run(test)
