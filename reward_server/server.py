"""The gRPC reward server: build it from a config, start it on a port, and shut it down gracefully.

    server = RewardServer(config)         # or RewardServer(config, rewards=[...]) with reward objects
    await server.start()                  # loads rewards, binds, serves; server.port is the bound port
    await server.stop(grace=30)           # health NOT_SERVING, drain in-flight RPCs, stop workers

``serve(config)`` does the same until SIGTERM or SIGINT, which is what ``ddpo serve`` runs.

Besides the configured rewards, the server serves named composites (``reward_server.composite``) once their
components have loaded, and remote endpoints registered at runtime through the RewardAdmin service
(``reward_server.admin``), which it saves to ``endpoints_file`` and serves again after a restart. The health of remote
endpoints is checked every ``health_interval_s`` and mirrored in this server's health service.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from clients._wire import KEEPALIVE_TIME_MS
from clients.errors import RewardServiceError
from clients.generated.ddpo.reward.v1 import reward_pb2 as pb
from clients.generated.ddpo.reward.v1 import reward_pb2_grpc as pb_grpc
from reward_server.admin import ADMIN_SERVICE_NAME, EndpointError, RewardAdminServicer
from reward_server.batching import BatchingConfig, RewardWorker
from reward_server.composite import COMPOSITE, CompositeScorer, composite_description
from reward_server.config import (
    BATCHING_KEYS,
    ConfigError,
    MiB,
    RewardConfig,
    ServerConfig,
    parse_config,
    reward_config,
    reward_table,
)
from reward_server.metrics import ServerMetrics
from reward_server.plugins import PluginError, check_name
from reward_server.ports import check_free
from reward_server.rewards import Reward, RewardSpec, build_reward
from reward_server.rewards.remote import REMOTE, RemoteReward
from reward_server.service import (
    LOADING,
    DecodeLimits,
    RewardServicer,
    Scorer,
    bearer_token_problem,
    reward_health_name,
)

log = logging.getLogger(__name__)

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["RewardService"].full_name


def build_rewards(configs: Sequence[RewardConfig]) -> list[tuple[Reward, BatchingConfig]]:
    """Construct the configured rewards (not yet loaded), applying per-reward image limits. Composites are not
    reward objects: the server builds them from the others."""
    built = []
    for config in configs:
        if config.type == COMPOSITE:
            continue
        reward = build_reward(config.type, config.name, config.options)
        if config.max_image_size is not None:
            spec = reward.spec
            own_h, own_w = spec.image_spec.max_size
            limit = (min(own_h, config.max_image_size[0]), min(own_w, config.max_image_size[1]))
            reward.spec = dataclasses.replace(spec, image_spec=dataclasses.replace(spec.image_spec, max_size=limit))
        built.append((reward, config.batching))
    return built


class _BearerTokenInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Requires ``authorization: Bearer <token>`` on RewardService calls; health and reflection stay open."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(f"/{SERVICE_NAME}/"):
            return handler
        problem = bearer_token_problem(handler_call_details.invocation_metadata, self._expected)
        if problem is None:
            return handler
        reason = (
            "missing `authorization: Bearer <token>` metadata"
            if problem == "missing"
            else "the bearer token does not match the server's"
        )

        async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)

        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(refuse)
        return grpc.unary_unary_rpc_method_handler(refuse)


class RewardServer:
    def __init__(self, config: ServerConfig, rewards: Sequence[tuple[Reward, BatchingConfig]] | None = None) -> None:
        """Serve ``rewards`` if given (reward objects with their batching), else the rewards in ``config``; plus the
        config's composites and the endpoints saved in its ``endpoints_file``."""
        self.config = config
        saved = read_endpoints_file(config.endpoints_file, {r.name for r in config.rewards})
        self.configs = {c.name: c for c in (*config.rewards, *saved)}
        self.runtime_endpoints = {c.name for c in saved}
        plain = [c for c in self.configs.values() if c.type != COMPOSITE]
        self._rewards = list(rewards) if rewards is not None else build_rewards(plain)
        if not self._rewards:
            raise ValueError("no rewards to serve; name some with --rewards or in the config file")
        self.composites = {c.name: dict(c.weights or {}) for c in self.configs.values() if c.type == COMPOSITE}
        self.metrics = ServerMetrics()
        self.health = HealthServicer()
        self.specs: dict[str, RewardSpec] = {reward.spec.name: reward.spec for reward, _ in self._rewards}
        for name, weights in self.composites.items():  # provisional until the components have loaded
            self.specs[name] = RewardSpec(name, composite_description(weights), "1", "")
        self.scorers: dict[str, Scorer] = {}
        # name -> why it cannot score yet: "is still loading", then removed, or "failed to load: ..."
        self.unavailable: dict[str, str] = {name: LOADING for name in self.specs}
        # remote endpoint name -> why it is not serving now (health_interval_s checks)
        self.endpoint_problems: dict[str, str] = {}
        self.loaded = asyncio.Event()
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._server: grpc.aio.Server | None = None
        limits = DecodeLimits(
            max_image_pixels=config.max_image_pixels,
            max_request_bytes=config.max_request_decoded_mb * MiB,
            max_in_flight_bytes=config.max_decoded_mb_in_flight * MiB,
        )
        self._servicer = RewardServicer(self.scorers, self.specs, self.unavailable, self.metrics, limits)
        self._metrics_http: Any = None
        self._loading: asyncio.Task[None] | None = None
        self._watching: asyncio.Task[None] | None = None
        self._admin_lock = asyncio.Lock()

    async def start(self) -> None:
        """Bind and serve at once; rewards load in the background (``loaded`` is set when all have tried).

        Health says NOT_SERVING for each reward until it has loaded, and for the server ("" and RewardService)
        until every reward has loaded or failed. A reward that fails to load stays NOT_SERVING, its calls get
        FAILED_PRECONDITION with the reason, the log says why, and the other rewards serve.
        """
        for service in ("", SERVICE_NAME, *(reward_health_name(name) for name in self.specs)):
            await self.health.set(service, NOT_SERVING)
        config = self.config
        max_bytes = config.max_message_mb * MiB
        interceptors = []
        if config.auth_token_file is not None:
            interceptors.append(_BearerTokenInterceptor(_read_token(config.auth_token_file)))
        server = grpc.aio.server(
            interceptors=interceptors,
            maximum_concurrent_rpcs=config.max_concurrent_rpcs,
            options=[
                ("grpc.max_receive_message_length", max_bytes),
                ("grpc.max_send_message_length", max_bytes),
                # our clients ping open calls every KEEPALIVE_TIME_MS; gRPC's default would answer that with GOAWAY
                ("grpc.http2.min_recv_ping_interval_without_data_ms", KEEPALIVE_TIME_MS // 2),
                ("grpc.so_reuseport", 0),  # a port in use is an error, not a port to share (reward_server.ports)
            ],
        )
        server.add_generic_rpc_handlers((self._servicer.handler(),))
        admin_token = _read_token(config.admin_token_file) if config.admin_token_file is not None else None
        pb_grpc.add_RewardAdminServicer_to_server(RewardAdminServicer(self, admin_token), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        health_service = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
        # RewardAdmin answers (PERMISSION_DENIED, naming the flag) but is not advertised unless it is enabled
        advertised = (SERVICE_NAME, *((ADMIN_SERVICE_NAME,) if admin_token is not None else ()), health_service)
        reflection.enable_server_reflection((*advertised, reflection.SERVICE_NAME), server)
        address = f"{config.host}:{config.port}"
        check_free(config.host, config.port, "the gRPC port")
        if config.metrics_port is not None:
            check_free(config.host, config.metrics_port, "the metrics port")
        try:
            if config.tls_cert is not None and config.tls_key is not None:
                key, cert = config.tls_key.read_bytes(), config.tls_cert.read_bytes()
                self.port = server.add_secure_port(address, grpc.ssl_server_credentials([(key, cert)]))
            else:
                self.port = server.add_insecure_port(address)
        except RuntimeError:
            check_free(config.host, config.port, "the gRPC port")  # says why, if it can tell
            raise OSError(f"cannot bind the gRPC port {address}") from None
        if config.metrics_port is not None:
            self._metrics_http, _ = start_http_server(
                config.metrics_port, addr=config.host, registry=self.metrics.registry
            )
            self.metrics_port = self._metrics_http.server_port
        await server.start()
        self._server = server
        log.info(
            "listening; rewards load in the background",
            extra={
                "address": f"{config.host}:{self.port}",
                "rewards": sorted(self.specs),
                "tls": config.tls_cert is not None,
                "auth": config.auth_token_file is not None,
                "admin": config.admin_token_file is not None,
                "metrics_port": self.metrics_port,
            },
        )
        self._loading = asyncio.create_task(self._load_rewards(), name="load-rewards")
        self._watching = asyncio.create_task(self._watch_endpoints(), name="watch-endpoints")

    async def _load_rewards(self) -> None:
        """Load the rewards one after another (no two models compete for memory), each off the event loop; each
        serves as soon as it is ready."""
        for reward, batching in self._rewards:
            name = reward.spec.name
            started = time.perf_counter()
            try:
                await asyncio.to_thread(reward.load)
            except Exception as error:
                reason = f"{type(error).__name__}: {error}"
                self.unavailable[name] = f"failed to load: {reason}"
                log.error("reward failed to load", extra={"reward": name, "error": reason})
                await self._start_composites()  # fails the composites that use it
                continue
            worker = await self._serve_reward(reward, batching)
            log.info(
                "reward loaded",
                extra={
                    "reward": name,
                    "load_s": round(time.perf_counter() - started, 3),
                    "instances": worker.instances,
                    "max_batch_size": worker.max_batch_size,
                    "batching": dataclasses.asdict(batching),
                },
            )
            await self._start_composites()
        if self.scorers:
            for service in ("", SERVICE_NAME):
                await self.health.set(service, SERVING)
        log.info("serving", extra={"rewards": sorted(self.scorers), "unavailable": dict(self.unavailable)})
        self.loaded.set()

    async def _serve_reward(self, reward: Reward, batching: BatchingConfig) -> RewardWorker:
        """Start scoring a loaded reward."""
        name = reward.spec.name
        worker = RewardWorker(reward, batching, self.metrics)
        worker.start()
        self.scorers[name] = worker
        self.specs[name] = reward.spec  # a remote reward's spec is known once it has loaded
        self.unavailable.pop(name, None)
        await self.health.set(reward_health_name(name), SERVING)
        return worker

    async def _start_composites(self) -> None:
        """Serve each composite whose components all serve now; fail those with a failed component."""
        for name, weights in self.composites.items():
            if name in self.scorers or self.unavailable.get(name) != LOADING:
                continue
            failed = [f"{c!r} {self.unavailable[c]}" for c in weights if self.unavailable.get(c, LOADING) != LOADING]
            if failed:
                self.unavailable[name] = f"failed to load: component {failed[0]}"
                continue
            if any(c not in self.scorers for c in weights):
                continue
            try:
                scorer = CompositeScorer(name, weights, self._workers())
            except ValueError as error:
                self.unavailable[name] = f"failed to load: {error}"
                log.error("composite cannot serve", extra={"reward": name, "error": str(error)})
                continue
            self.scorers[name] = scorer
            self.specs[name] = scorer.spec
            del self.unavailable[name]
            await self.health.set(reward_health_name(name), SERVING)

    def _workers(self) -> dict[str, RewardWorker]:
        return {name: s for name, s in self.scorers.items() if isinstance(s, RewardWorker)}

    async def _watch_endpoints(self) -> None:
        """Mirror each remote endpoint's health in ours, and each composite's as that of its components."""
        while True:
            await asyncio.sleep(self.config.health_interval_s)
            for name, worker in self._workers().items():
                if isinstance(worker.reward, RemoteReward):
                    problem = await asyncio.to_thread(worker.reward.check_health)
                    if name not in self.scorers:
                        continue  # unregistered meanwhile
                    if problem != self.endpoint_problems.get(name):
                        level = logging.WARNING if problem else logging.INFO
                        log.log(level, "endpoint health changed", extra={"reward": name, "problem": problem})
                    if problem is None:
                        self.endpoint_problems.pop(name, None)
                    else:
                        self.endpoint_problems[name] = problem
            for name in self.scorers:
                status = NOT_SERVING if self._endpoint_problem(name) else SERVING
                await self.health.set(reward_health_name(name), status)

    # --- endpoints registered at runtime (RewardAdmin) -----------------------------------------------------------

    async def register_endpoint(self, name: str, url: str, options: dict[str, Any], replace: bool) -> RewardSpec:
        """Serve the endpoint at ``url`` as ``name`` once it answers; EndpointError with a status code otherwise."""
        try:
            check_name(name, "endpoint name")
            table = {key: value for key, value in options.items() if key in _TABLE_KEYS}
            table |= {"type": REMOTE, "options": {"url": url} | {k: v for k, v in options.items() if k not in table}}
            config = reward_config(name, table)
            ((reward, batching),) = build_rewards([config])
        except (ConfigError, PluginError, ValueError) as error:
            raise EndpointError(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from None
        async with self._admin_lock:
            if name in self.specs and not (replace and name in self.runtime_endpoints):
                reason = "set replace to swap it" if name in self.runtime_endpoints else "it is not a runtime endpoint"
                raise EndpointError(grpc.StatusCode.ALREADY_EXISTS, f"reward {name!r} is already served; {reason}")
            try:
                await asyncio.to_thread(reward.load)
            except RewardServiceError as error:
                raise EndpointError(error.code, error.message) from None
            except Exception as error:
                raise EndpointError(grpc.StatusCode.FAILED_PRECONDITION, f"{type(error).__name__}: {error}") from None
            if name in self.scorers:
                await self._stop_serving(name)
            await self._serve_reward(reward, batching)
            self.configs[name] = config
            self.runtime_endpoints.add(name)
            self._save_endpoints()
        log.info("endpoint registered", extra={"reward": name, "url": url, "replaced": replace})
        return reward.spec

    async def unregister_endpoint(self, name: str) -> None:
        async with self._admin_lock:
            if name not in self.specs:
                raise EndpointError(
                    grpc.StatusCode.NOT_FOUND, f"no reward {name!r}; served: {', '.join(sorted(self.specs))}"
                )
            if name not in self.runtime_endpoints:
                raise EndpointError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"reward {name!r} was not registered at runtime; it comes from the server's config",
                )
            users = sorted(c for c, weights in self.composites.items() if name in weights)
            if users:
                raise EndpointError(
                    grpc.StatusCode.FAILED_PRECONDITION, f"composite(s) {', '.join(users)} use {name!r}"
                )
            await self._stop_serving(name)
            self.runtime_endpoints.discard(name)
            del self.configs[name], self.specs[name]
            self._save_endpoints()
        log.info("endpoint unregistered", extra={"reward": name})

    async def _stop_serving(self, name: str) -> None:
        scorer = self.scorers.pop(name)
        self.endpoint_problems.pop(name, None)
        await self.health.set(reward_health_name(name), health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
        assert isinstance(scorer, RewardWorker)
        await scorer.stop(f"reward {name!r} was unregistered or replaced while this item waited")
        await asyncio.to_thread(scorer.reward.close)

    def _save_endpoints(self) -> None:
        """Write the runtime endpoints to ``endpoints_file`` (atomically: a crash leaves the old file or the new)."""
        path = self.config.endpoints_file
        if path is None:
            return
        data = {"rewards": {name: reward_table(self.configs[name]) for name in sorted(self.runtime_endpoints)}}
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        os.replace(temporary, path)

    def reward_state(self, name: str) -> str:
        """What ListRewards of the admin service says about one reward."""
        if name in self.unavailable:
            return self.unavailable[name]
        problem = self._endpoint_problem(name)
        return f"not serving: {problem}" if problem else "serving"

    def _endpoint_problem(self, name: str) -> str | None:
        """Why a remote endpoint that ``name`` is, or that composite ``name`` adds up, does not serve now, if one does
        not (health_interval_s checks)."""
        components = self.composites.get(name, {name: 1.0})
        return next((self.endpoint_problems[c] for c in components if c in self.endpoint_problems), None)

    async def wait_loaded(self) -> dict[str, str]:
        """Wait until every reward has loaded or failed; returns the failed ones with their reasons."""
        await self.loaded.wait()
        return dict(self.unavailable)

    async def stop(self, grace: float | None = None) -> None:
        """Refuse new RPCs, let in-flight ones finish within ``grace`` seconds, then stop the workers.

        Only scoring RPCs are waited for: long-lived health Watch streams would otherwise hold every shutdown for
        the whole grace period.
        """
        grace = self.config.grace_s if grace is None else grace
        await self.health.enter_graceful_shutdown()
        log.info("shutting down", extra={"grace_s": grace})
        if self._loading is not None and not self._loading.done():
            self._loading.cancel()  # a load already running in its thread finishes there, unused
            await asyncio.gather(self._loading, return_exceptions=True)
        if self._watching is not None:
            self._watching.cancel()
            await asyncio.gather(self._watching, return_exceptions=True)
        if not await self._servicer.drain(grace):
            log.warning("grace period over; cancelling the RPCs still running", extra={"grace_s": grace})
        if self._server is not None:
            await self._server.stop(0)
        workers = self._workers().values()
        await asyncio.gather(*(worker.stop() for worker in workers))
        for worker in workers:
            worker.reward.close()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        self._servicer.close()
        log.info("stopped")

    async def wait_for_termination(self) -> None:
        assert self._server is not None, "start() the server first"
        await self._server.wait_for_termination()


# Keys of an endpoint's options that are settings of its [rewards.NAME] table rather than of the remote reward.
_TABLE_KEYS = {"max_image_size", *BATCHING_KEYS}


def _read_token(path: Path) -> str:
    token = path.read_text().strip()
    if not token:
        raise ValueError(f"token file {path} is empty")
    return token


def read_endpoints_file(path: Path | None, configured: set[str]) -> list[RewardConfig]:
    """The endpoints saved by an earlier run (none if ``path`` is None or does not exist yet)."""
    if path is None or not path.exists():
        return []
    source = f"endpoints file {path}"
    try:
        saved = parse_config(json.loads(path.read_text()), source=source).rewards
    except (OSError, json.JSONDecodeError) as error:
        raise ConfigError(f"cannot read {source}: {error}") from None
    for config in saved:
        if config.type != REMOTE:
            raise ConfigError(f"{source}: {config.name!r} is of type {config.type!r}; it may only hold remote rewards")
        if config.name in configured:
            raise ConfigError(f"{source}: {config.name!r} is also in the config; remove it from one of them")
    return list(saved)


async def serve(
    config: ServerConfig,
    rewards: Sequence[tuple[Reward, BatchingConfig]] | None = None,
    on_started: Callable[[RewardServer], None] | None = None,
) -> None:
    """Run a server until SIGTERM or SIGINT, then shut it down gracefully."""
    server = RewardServer(config, rewards)
    await server.start()
    if on_started is not None:
        on_started(server)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await server.stop()
