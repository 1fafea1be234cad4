"""The one registry of what the server offers: scorers, their specs and states, remote endpoints and composites.

It answers "what scores this request" (``RewardRegistry.scorer``) for the RewardService servicer, says what each
reward is and how it does for the admin service, and is the one place composites are built, both the config's and
those a request asks for with ``ScoreRequest.weights``.

Every reward offered has a spec from the start (a composite's is provisional until its components have loaded) and
a state: loading, failed to load, or serving. A serving remote endpoint may still be down now (``check_endpoints``).
The registry mirrors each reward's state in the health service as "reward/NAME".
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol

import grpc
from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer

from reward_server.batching import BatchingConfig, ItemOutcome, RewardWorker
from reward_server.composite import COMPOSITE, CompositeScorer, check_weights, composite_description
from reward_server.config import RewardConfig
from reward_server.metrics import ServerMetrics
from reward_server.rewards import ItemError, Reward, RewardSpec
from reward_server.rewards.remote import RemoteReward
from reward_server.wire import DecodedItem, quote

log = logging.getLogger(__name__)

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
LOADING = "is still loading"  # the state of a reward whose load has not finished; any other state is a failure
PER_REQUEST_COMPOSITE = "weights"  # how results of ScoreRequest.weights are named in messages and metrics


class Scorer(Protocol):
    """What scores a request's items: a reward's worker, or a composite of workers."""

    name: str

    @property
    def spec(self) -> RewardSpec: ...

    @property
    def capacity(self) -> int:
        """The most items it can ever hold queued at once."""
        ...

    async def submit(self, items: list[DecodedItem]) -> list[asyncio.Future[ItemOutcome]]: ...

    async def submit_nowait(self, items: list[DecodedItem]) -> list[asyncio.Future[ItemOutcome]]: ...


def reward_health_name(reward: str) -> str:
    """The health-check service name of one reward, e.g. "reward/jpeg_compressibility"."""
    return f"reward/{reward}"


class RewardRegistry:
    def __init__(
        self,
        rewards: Iterable[RewardSpec],
        configs: Iterable[RewardConfig],
        health: HealthServicer,
        metrics: ServerMetrics,
        runtime_endpoints: Sequence[RewardConfig] = (),
    ) -> None:
        """``rewards``: the specs of the reward objects the server will load; ``configs``: the configured rewards and
        composites (a reward object given in-process has none); ``runtime_endpoints``: those registered at runtime by
        an earlier run, among ``rewards`` too."""
        self._configs = {c.name: c for c in (*configs, *runtime_endpoints)}
        self._runtime = {c.name for c in runtime_endpoints}
        self._composites = {c.name: dict(c.weights or {}) for c in self._configs.values() if c.type == COMPOSITE}
        self._specs = {spec.name: spec for spec in rewards}
        for name, weights in self._composites.items():  # provisional until the components have loaded
            self._specs[name] = RewardSpec(name, composite_description(weights), "1", "")
        self._scorers: dict[str, Scorer] = {}
        # name -> why it cannot score yet: LOADING, then removed, or "failed to load: ..."
        self._unavailable = dict.fromkeys(self._specs, LOADING)
        # remote endpoint name -> why it is not serving now (check_endpoints)
        self._endpoint_problems: dict[str, str] = {}
        self._health = health
        self._metrics = metrics

    # --- what scores a request, and what each reward is ---------------------------------------------------------

    @property
    def specs(self) -> Mapping[str, RewardSpec]:
        """Every reward offered, by name, whether it serves or not."""
        return self._specs

    @property
    def scorers(self) -> Mapping[str, Scorer]:
        """The rewards that score now, by name."""
        return self._scorers

    def scorer(self, reward: str, weights: Mapping[str, float]) -> Scorer | ItemError:
        """What scores ``reward``, or a weighted sum of rewards when ``weights`` is set; else why nothing can."""
        if not weights:
            return self._scorers.get(reward) or self._not_ready(reward)
        try:
            weights = check_weights(weights, "weights")
        except ValueError as error:
            return ItemError(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        missing = next((component for component in weights if component not in self._scorers), None)
        if missing is not None:
            return self._not_ready(missing)
        try:
            # One name for every per-request composite: the client's label must not become a metrics label value.
            return self._compose(PER_REQUEST_COMPOSITE, weights)
        except ValueError as error:
            return ItemError(grpc.StatusCode.INVALID_ARGUMENT, f"weights: {error}")

    def _not_ready(self, reward: str) -> ItemError:
        """Why ``reward`` cannot score: still loading (UNAVAILABLE), failed to load, or not offered at all."""
        offered = ", ".join(sorted(self._specs))
        if not reward:
            return ItemError(grpc.StatusCode.NOT_FOUND, f"reward is empty; name one of: {offered}")
        state = self._unavailable.get(reward)
        if state is None:
            return ItemError(
                grpc.StatusCode.NOT_FOUND, f"unknown reward {quote(reward)}; this server offers: {offered}"
            )
        code = grpc.StatusCode.UNAVAILABLE if state == LOADING else grpc.StatusCode.FAILED_PRECONDITION
        return ItemError(code, f"reward {reward!r} {state} (health service {reward_health_name(reward)!r})")

    def _compose(self, name: str, weights: Mapping[str, float]) -> CompositeScorer:
        """The weighted sum ``weights`` of serving rewards: the one place composites are built. ValueError if a
        component is itself a composite, or if the components do not fit together (``composite_spec``)."""
        workers = {}
        for component in weights:
            scorer = self._scorers[component]
            if not isinstance(scorer, RewardWorker):
                raise ValueError(f"{quote(component)} is itself a composite; weigh its components instead")
            workers[component] = scorer
        return CompositeScorer(name, weights, workers)

    def unavailable(self) -> dict[str, str]:
        """Why each reward that does not score cannot: LOADING, or why it failed to load."""
        return dict(self._unavailable)

    def load_errors(self) -> dict[str, str]:
        """Why each reward that failed to load did."""
        return {name: state for name, state in self._unavailable.items() if state != LOADING}

    def state(self, name: str) -> str:
        """What the admin service's ListRewards says about one reward."""
        if name in self._unavailable:
            return self._unavailable[name]
        problem = self._endpoint_problem(name)
        return f"not serving: {problem}" if problem else "serving"

    def config(self, name: str) -> RewardConfig | None:
        """The config entry of ``name`` (None for a reward object given to the server in-process)."""
        return self._configs.get(name)

    def is_runtime_endpoint(self, name: str) -> bool:
        return name in self._runtime

    def runtime_endpoints(self) -> list[RewardConfig]:
        """The endpoints registered at runtime, by name: what the endpoints file keeps."""
        return [self._configs[name] for name in sorted(self._runtime)]

    def composites_using(self, name: str) -> list[str]:
        return sorted(composite for composite, weights in self._composites.items() if name in weights)

    def workers(self) -> dict[str, RewardWorker]:
        return {name: s for name, s in self._scorers.items() if isinstance(s, RewardWorker)}

    # --- rewards coming and going -------------------------------------------------------------------------------

    async def serve(self, reward: Reward, batching: BatchingConfig) -> RewardWorker:
        """Start scoring a loaded reward."""
        name = reward.spec.name
        worker = RewardWorker(reward, batching, self._metrics)
        worker.start()
        self._scorers[name] = worker
        self._specs[name] = reward.spec  # a remote reward's spec is known once it has loaded
        self._unavailable.pop(name, None)
        await self._health.set(reward_health_name(name), SERVING)
        return worker

    def fail(self, name: str, reason: str) -> None:
        """Record that ``name`` failed to load; ``start_composites`` then fails the composites that use it."""
        self._unavailable[name] = f"failed to load: {reason}"

    async def start_composites(self) -> None:
        """Serve each composite whose components all serve now; fail those with a failed component."""
        for name, weights in self._composites.items():
            if name in self._scorers or self._unavailable.get(name) != LOADING:
                continue
            failed = [f"{c!r} {self._unavailable[c]}" for c in weights if self._unavailable.get(c, LOADING) != LOADING]
            if failed:
                self._unavailable[name] = f"failed to load: component {failed[0]}"
                continue
            if any(c not in self._scorers for c in weights):
                continue
            try:
                scorer = self._compose(name, weights)
            except ValueError as error:
                self._unavailable[name] = f"failed to load: {error}"
                log.error("composite cannot serve", extra={"reward": name, "error": str(error)})
                continue
            self._scorers[name] = scorer
            self._specs[name] = scorer.spec
            del self._unavailable[name]
            await self._health.set(reward_health_name(name), SERVING)

    async def serve_endpoint(self, config: RewardConfig, reward: Reward, batching: BatchingConfig) -> None:
        """Serve a loaded endpoint registered at runtime, in place of the one of the same name if it serves."""
        if config.name in self._scorers:
            await self._withdraw(config.name)
        await self.serve(reward, batching)
        self._configs[config.name] = config
        self._runtime.add(config.name)

    async def remove_endpoint(self, name: str) -> None:
        """Stop serving an endpoint registered at runtime, and forget it."""
        await self._withdraw(name)
        self._runtime.discard(name)
        del self._configs[name], self._specs[name]

    async def _withdraw(self, name: str) -> None:
        scorer = self._scorers.pop(name, None)
        self._endpoint_problems.pop(name, None)
        self._unavailable.pop(name, None)
        await self._health.set(reward_health_name(name), health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
        if scorer is None:  # it failed to load (a saved endpoint that was gone at startup): nothing runs
            return
        assert isinstance(scorer, RewardWorker)
        await scorer.stop(f"reward {name!r} was unregistered or replaced while this item waited")
        await asyncio.to_thread(scorer.reward.close)

    async def stop(self) -> None:
        """Stop every worker (items still queued fail) and close its reward."""
        workers = self.workers().values()
        await asyncio.gather(*(worker.stop() for worker in workers))
        for worker in workers:
            worker.reward.close()

    # --- the health of remote endpoints -------------------------------------------------------------------------

    async def check_endpoints(self) -> None:
        """Check every remote endpoint's health now and mirror it in ours, and each composite's as that of its
        components."""
        for name, worker in self.workers().items():
            if isinstance(worker.reward, RemoteReward):
                problem = await asyncio.to_thread(worker.reward.check_health)
                if name not in self._scorers:
                    continue  # unregistered meanwhile
                if problem != self._endpoint_problems.get(name):
                    level = logging.WARNING if problem else logging.INFO
                    log.log(level, "endpoint health changed", extra={"reward": name, "problem": problem})
                if problem is None:
                    self._endpoint_problems.pop(name, None)
                else:
                    self._endpoint_problems[name] = problem
        for name in list(self._scorers):  # a copy: an endpoint may come or go while health.set waits
            status = NOT_SERVING if self._endpoint_problem(name) else SERVING
            await self._health.set(reward_health_name(name), status)

    def _endpoint_problem(self, name: str) -> str | None:
        """Why a remote endpoint that ``name`` is, or that composite ``name`` adds up, does not serve now, if one does
        not."""
        components = self._composites.get(name, {name: 1.0})
        return next((self._endpoint_problems[c] for c in components if c in self._endpoint_problems), None)
