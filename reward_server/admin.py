"""The ``ddpo.reward.v1.RewardAdmin`` servicer: register and unregister remote endpoints at runtime, list rewards.

Every call must carry the admin token as ``authorization: Bearer <token>``: none gives UNAUTHENTICATED, another
token PERMISSION_DENIED. A server started without ``admin_token_file`` refuses every admin call (PERMISSION_DENIED),
so runtime registration is off unless asked for. ``reward_server.endpoints`` does the registering, and the listing
comes from the server's ``RewardRegistry``.
"""

from __future__ import annotations

import logging
from typing import Any

import grpc
from google.protobuf import json_format

from clients.generated.ddpo.reward.v1 import reward_pb2 as pb
from clients.generated.ddpo.reward.v1 import reward_pb2_grpc as pb_grpc
from reward_server.composite import COMPOSITE
from reward_server.endpoints import EndpointError, RuntimeEndpoints
from reward_server.plugins import plugin_module
from reward_server.registry import RewardRegistry
from reward_server.rewards.remote import REMOTE
from reward_server.service import abort, bearer_token_problem
from reward_server.wire import spec_to_proto

log = logging.getLogger(__name__)

ADMIN_SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["RewardAdmin"].full_name


class RewardAdminServicer(pb_grpc.RewardAdminServicer):
    def __init__(self, registry: RewardRegistry, endpoints: RuntimeEndpoints, token: str | None) -> None:
        self._registry = registry
        self._endpoints = endpoints
        self._expected = f"Bearer {token}".encode() if token is not None else None

    async def RegisterEndpoint(
        self, request: pb.RegisterEndpointRequest, context: grpc.aio.ServicerContext
    ) -> pb.RegisterEndpointResponse:
        await self._authorize(context)
        endpoint = request.endpoint
        options = {key: _whole_numbers(value) for key, value in json_format.MessageToDict(endpoint.options).items()}
        try:
            spec = await self._endpoints.register(endpoint.name, endpoint.url, options, request.replace)
        except EndpointError as error:
            await abort(context, error.code, error.message)
        return pb.RegisterEndpointResponse(spec=spec_to_proto(spec))

    async def UnregisterEndpoint(
        self, request: pb.UnregisterEndpointRequest, context: grpc.aio.ServicerContext
    ) -> pb.UnregisterEndpointResponse:
        await self._authorize(context)
        try:
            await self._endpoints.unregister(request.name)
        except EndpointError as error:
            await abort(context, error.code, error.message)
        return pb.UnregisterEndpointResponse()

    async def ListRewards(
        self, request: pb.AdminListRewardsRequest, context: grpc.aio.ServicerContext
    ) -> pb.AdminListRewardsResponse:
        await self._authorize(context)
        registry = self._registry
        entries = []
        for name in sorted(registry.specs):
            config = registry.config(name)
            reward_type = config.type if config is not None else ""  # a reward object given to RewardServer in-process
            entries.append(
                pb.RewardEntry(
                    spec=spec_to_proto(registry.specs[name]),
                    source=_source(reward_type),
                    type=reward_type,
                    url=str(config.options.get("url", "")) if config is not None else "",
                    runtime=registry.is_runtime_endpoint(name),
                    state=registry.state(name),
                )
            )
        return pb.AdminListRewardsResponse(rewards=entries)

    async def _authorize(self, context: grpc.aio.ServicerContext) -> None:
        if self._expected is None:
            await abort(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                "admin calls are disabled on this server; start it with --admin-token-file to enable them",
            )
        problem = bearer_token_problem(context.invocation_metadata(), self._expected)
        if problem == "missing":
            await abort(context, grpc.StatusCode.UNAUTHENTICATED, "missing `authorization: Bearer <admin token>`")
        if problem == "mismatch":
            log.warning("admin call refused: wrong token", extra={"peer": context.peer()})
            await abort(context, grpc.StatusCode.PERMISSION_DENIED, "the admin token does not match the server's")


def _source(reward_type: str) -> pb.RewardSource:
    if not reward_type:
        return pb.REWARD_SOURCE_UNSPECIFIED
    if reward_type == REMOTE:
        return pb.REWARD_SOURCE_ENDPOINT
    if reward_type == COMPOSITE:
        return pb.REWARD_SOURCE_COMPOSITE
    return pb.REWARD_SOURCE_PLUGIN if plugin_module(reward_type) is not None else pb.REWARD_SOURCE_BUILTIN


def _whole_numbers(value: Any) -> Any:
    """protobuf Struct numbers are doubles: give back ints where a config file would have had them."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_whole_numbers(v) for v in value]
    if isinstance(value, dict):
        return {k: _whole_numbers(v) for k, v in value.items()}
    return value
