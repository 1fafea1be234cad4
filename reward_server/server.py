"""The gRPC reward server: build it from a config, start it on a port, and shut it down gracefully.

    server = RewardServer(config)         # or RewardServer(config, rewards=[...]) with reward objects
    await server.start()                  # loads rewards, binds, serves; server.port is the bound port
    await server.stop(grace=30)           # health NOT_SERVING, drain in-flight RPCs, stop workers

``serve(config)`` does the same until SIGTERM or SIGINT, which is what ``ddpo serve`` runs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from clients.generated.ddpo.reward.v1 import reward_pb2 as pb
from clients.generated.ddpo.reward.v1 import reward_pb2_grpc as pb_grpc
from reward_server.batching import BatchingConfig, RewardWorker
from reward_server.config import MiB, RewardConfig, ServerConfig
from reward_server.metrics import ServerMetrics
from reward_server.rewards import Reward, build_reward
from reward_server.service import LOADING, RewardServicer, reward_health_name

log = logging.getLogger(__name__)

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["RewardService"].full_name


def build_rewards(configs: Sequence[RewardConfig]) -> list[tuple[Reward, BatchingConfig]]:
    """Construct the configured rewards (not yet loaded), applying per-reward image limits."""
    built = []
    for config in configs:
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
        metadata = dict(handler_call_details.invocation_metadata or ())
        given = metadata.get("authorization", "")
        given_bytes = given.encode() if isinstance(given, str) else given
        if hmac.compare_digest(given_bytes, self._expected):
            return handler
        reason = (
            "missing `authorization: Bearer <token>` metadata"
            if not given_bytes
            else "the bearer token does not match the server's"
        )

        async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)

        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(refuse)
        return grpc.unary_unary_rpc_method_handler(refuse)


class RewardServer:
    def __init__(self, config: ServerConfig, rewards: Sequence[tuple[Reward, BatchingConfig]] | None = None) -> None:
        """Serve ``rewards`` if given (reward objects with their batching), else the rewards in ``config``."""
        self.config = config
        self._rewards = list(rewards) if rewards is not None else build_rewards(config.rewards)
        if not self._rewards:
            raise ValueError("no rewards to serve; name some with --rewards or in the config file")
        self.metrics = ServerMetrics()
        self.health = HealthServicer()
        self.specs = {reward.spec.name: reward.spec for reward, _ in self._rewards}
        self.workers: dict[str, RewardWorker] = {}
        # name -> why it cannot score yet: "is still loading", then removed, or "failed to load: ..."
        self.unavailable: dict[str, str] = {name: LOADING for name in self.specs}
        self.loaded = asyncio.Event()
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._servicer = RewardServicer(self.workers, self.specs, self.unavailable, self.metrics)
        self._metrics_http: Any = None
        self._loading: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Bind and serve at once; rewards load in the background (``loaded`` is set when all have tried).

        Health says NOT_SERVING for each reward until it has loaded, and for the server ("" and RewardService)
        until every reward has loaded or failed. A reward that fails to load stays NOT_SERVING, its calls get
        FAILED_PRECONDITION with the reason, the log says why, and the other rewards serve.
        """
        for service in ("", SERVICE_NAME, *(reward_health_name(name) for name in self.specs)):
            await self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        config = self.config
        max_bytes = config.max_message_mb * MiB
        interceptors = []
        if config.auth_token_file is not None:
            interceptors.append(_BearerTokenInterceptor(_read_token(config)))
        server = grpc.aio.server(
            interceptors=interceptors,
            maximum_concurrent_rpcs=config.max_concurrent_rpcs,
            options=[("grpc.max_receive_message_length", max_bytes), ("grpc.max_send_message_length", max_bytes)],
        )
        pb_grpc.add_RewardServiceServicer_to_server(self._servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
        )
        address = f"{config.host}:{config.port}"
        if config.tls_cert is not None and config.tls_key is not None:
            credentials = grpc.ssl_server_credentials([(config.tls_key.read_bytes(), config.tls_cert.read_bytes())])
            self.port = server.add_secure_port(address, credentials)
        else:
            self.port = server.add_insecure_port(address)
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
                "metrics_port": self.metrics_port,
            },
        )
        self._loading = asyncio.create_task(self._load_rewards(), name="load-rewards")

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
                continue
            worker = RewardWorker(reward, batching, self.metrics)
            worker.start()
            self.workers[name] = worker
            del self.unavailable[name]
            await self.health.set(reward_health_name(name), health_pb2.HealthCheckResponse.SERVING)
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
        if self.workers:
            for service in ("", SERVICE_NAME):
                await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving", extra={"rewards": sorted(self.workers), "unavailable": dict(self.unavailable)})
        self.loaded.set()

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
        if not await self._servicer.drain(grace):
            log.warning("grace period over; cancelling the RPCs still running", extra={"grace_s": grace})
        if self._server is not None:
            await self._server.stop(0)
        await asyncio.gather(*(worker.stop() for worker in self.workers.values()))
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        log.info("stopped")

    async def wait_for_termination(self) -> None:
        assert self._server is not None, "start() the server first"
        await self._server.wait_for_termination()


def _read_token(config: ServerConfig) -> str:
    assert config.auth_token_file is not None
    token = config.auth_token_file.read_text().strip()
    if not token:
        raise ValueError(f"auth token file {config.auth_token_file} is empty")
    return token


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
