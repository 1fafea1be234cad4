"""The gRPC reward server: build it from a config, start it on a port, and shut it down gracefully.

    server = RewardServer(config)         # or RewardServer(config, rewards=[...]) with reward objects
    await server.start()                  # loads rewards, binds, serves; server.port is the bound port
    await server.stop(grace=30)           # health NOT_SERVING, drain in-flight RPCs, stop workers

``serve(config)`` does the same until SIGTERM or SIGINT, which is what ``ddpo serve`` runs.

Besides the configured rewards, the server serves named composites (``reward_server.composite``) once their
components have loaded, and remote endpoints registered at runtime through the RewardAdmin service
(``reward_server.admin``), which ``reward_server.endpoints`` saves to ``endpoints_file`` and the server serves again
after a restart. What is offered, and in what state, is in one ``RewardRegistry`` (``reward_server.registry``), which
the RewardService and RewardAdmin servicers read. The health of remote endpoints is checked every
``health_interval_s`` and mirrored in this server's health service.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from clients._wire import KEEPALIVE_TIME_MS
from clients.cli_support import read_token_file
from clients.generated.ddpo.reward.v1 import reward_pb2 as pb
from clients.generated.ddpo.reward.v1 import reward_pb2_grpc as pb_grpc
from reward_server.admin import ADMIN_SERVICE_NAME, RewardAdminServicer
from reward_server.batching import BatchingConfig
from reward_server.builder import build_rewards
from reward_server.composite import COMPOSITE
from reward_server.config import MiB, ServerConfig
from reward_server.endpoints import RuntimeEndpoints, read_endpoints_file
from reward_server.metrics import ServerMetrics
from reward_server.ports import check_free
from reward_server.registry import RewardRegistry, reward_health_name
from reward_server.rewards import Reward, RewardSpec
from reward_server.service import DecodeLimits, RewardServicer, bearer_token_problem

log = logging.getLogger(__name__)

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["RewardService"].full_name


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
        plain = [c for c in (*config.rewards, *saved) if c.type != COMPOSITE]
        self._rewards = list(rewards) if rewards is not None else build_rewards(plain)
        if not self._rewards:
            raise ValueError("no rewards to serve; name some with --rewards or in the config file")
        self.metrics = ServerMetrics()
        self.health = HealthServicer()
        self.registry = RewardRegistry(
            (reward.spec for reward, _ in self._rewards), config.rewards, self.health, self.metrics, saved
        )
        self._endpoints = RuntimeEndpoints(self.registry, config.endpoints_file)
        self.loaded = asyncio.Event()
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._server: grpc.aio.Server | None = None
        limits = DecodeLimits(
            max_image_pixels=config.max_image_pixels,
            max_request_bytes=config.max_request_decoded_mb * MiB,
            max_in_flight_bytes=config.max_decoded_mb_in_flight * MiB,
        )
        self._servicer = RewardServicer(self.registry, self.metrics, limits)
        self._metrics_http: Any = None
        self._loading: asyncio.Task[None] | None = None
        self._watching: asyncio.Task[None] | None = None

    @property
    def specs(self) -> Mapping[str, RewardSpec]:
        """Every reward the server offers, by name, whether it serves yet or not."""
        return self.registry.specs

    async def start(self) -> None:
        """Bind and serve at once; rewards load in the background (``loaded`` is set when all have tried).

        Health says NOT_SERVING for each reward until it has loaded, and for the server ("" and RewardService)
        until every reward has loaded or failed. A reward that fails to load stays NOT_SERVING, its calls get
        FAILED_PRECONDITION with the reason, the log says why, and the other rewards serve.
        """
        for service in ("", SERVICE_NAME, *(reward_health_name(name) for name in self.registry.specs)):
            await self.health.set(service, NOT_SERVING)
        config = self.config
        max_bytes = config.max_message_mb * MiB
        interceptors = []
        if config.auth_token_file is not None:
            interceptors.append(_BearerTokenInterceptor(read_token_file(config.auth_token_file, "auth_token_file")))
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
        admin_token = (
            read_token_file(config.admin_token_file, "admin_token_file")
            if config.admin_token_file is not None
            else None
        )
        pb_grpc.add_RewardAdminServicer_to_server(
            RewardAdminServicer(self.registry, self._endpoints, admin_token), server
        )
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
                "rewards": sorted(self.registry.specs),
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
        registry = self.registry
        for reward, batching in self._rewards:
            name = reward.spec.name
            started = time.perf_counter()
            try:
                await asyncio.to_thread(reward.load)
            except Exception as error:
                reason = f"{type(error).__name__}: {error}"
                registry.fail(name, reason)
                log.error("reward failed to load", extra={"reward": name, "error": reason})
                await registry.start_composites()  # fails the composites that use it
                continue
            worker = await registry.serve(reward, batching)
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
            await registry.start_composites()
        if registry.scorers:
            for service in ("", SERVICE_NAME):
                await self.health.set(service, SERVING)
        log.info("serving", extra={"rewards": sorted(registry.scorers), "unavailable": registry.unavailable()})
        self.loaded.set()

    async def _watch_endpoints(self) -> None:
        """Mirror each remote endpoint's health in ours, and each composite's as that of its components."""
        while True:
            await asyncio.sleep(self.config.health_interval_s)
            await self.registry.check_endpoints()

    async def wait_loaded(self) -> dict[str, str]:
        """Wait until every reward has loaded or failed; returns the failed ones with their reasons."""
        await self.loaded.wait()
        return self.registry.unavailable()

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
        await self.registry.stop()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        self._servicer.close()
        log.info("stopped")

    async def wait_for_termination(self) -> None:
        assert self._server is not None, "start() the server first"
        await self._server.wait_for_termination()


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
