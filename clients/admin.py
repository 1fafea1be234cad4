"""Managing a reward server's remote endpoints at runtime (the RewardAdmin service).

with AdminClient("127.0.0.1:50051", admin_token=token) as admin:
    spec = admin.register_endpoint("judge", "grpc://10.0.0.5:50051/aesthetic", {"timeout_s": 20})
    for entry in admin.list_rewards_admin():
        print(entry.info.name, entry.source, entry.state)
    admin.unregister_endpoint("judge")

It is a RewardClient too (``wait_ready``, ``score``...), sending the admin token with every call.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from google.protobuf import struct_pb2

from clients.client import RewardClient
from clients.generated.ddpo.reward.v1 import reward_pb2 as pb
from clients.generated.ddpo.reward.v1 import reward_pb2_grpc as pb_grpc
from clients.types import RewardInfo


@dataclasses.dataclass(frozen=True)
class RewardEntry:
    """One reward as the admin service lists it."""

    info: RewardInfo
    source: str  # "builtin", "plugin", "endpoint" or "composite"
    type: str
    url: str  # for endpoints
    runtime: bool  # registered at runtime (and saved), not by the config
    state: str  # "serving", "is still loading", or why it does not serve

    @classmethod
    def from_proto(cls, entry: pb.RewardEntry) -> RewardEntry:
        return cls(
            info=RewardInfo.from_proto(entry.spec),
            source=pb.RewardSource.Name(entry.source).removeprefix("REWARD_SOURCE_").lower(),
            type=entry.type,
            url=entry.url,
            runtime=entry.runtime,
            state=entry.state,
        )


class AdminClient(RewardClient):
    def __init__(
        self,
        server: str,
        *,
        admin_token: str,
        timeout: float = 60.0,
        tls: bool | None = None,
        root_certificates: str | Path | None = None,
    ) -> None:
        """Connect to ``server`` as RewardClient does; ``admin_token`` is the server's admin token."""
        if not admin_token:
            raise ValueError("admin_token is empty; admin calls need the server's admin token")
        super().__init__(server, timeout=timeout, tls=tls, root_certificates=root_certificates, auth_token=admin_token)
        self._admin = pb_grpc.RewardAdminStub(self._channel)

    def register_endpoint(
        self,
        name: str,
        url: str,
        options: Mapping[str, Any] | None = None,
        replace: bool = False,
        timeout: float | None = None,
    ) -> RewardInfo:
        """Serve ``url`` as the reward ``name``; returns its spec. RewardServiceError says why it could not."""
        struct = struct_pb2.Struct()
        struct.update(dict(options or {}))
        request = pb.RegisterEndpointRequest(endpoint=pb.Endpoint(name=name, url=url, options=struct), replace=replace)
        response = self._call("RegisterEndpoint", self._admin.RegisterEndpoint, request, timeout)
        return RewardInfo.from_proto(response.spec)

    def unregister_endpoint(self, name: str, timeout: float | None = None) -> None:
        request = pb.UnregisterEndpointRequest(name=name)
        self._call("UnregisterEndpoint", self._admin.UnregisterEndpoint, request, timeout)

    def list_rewards_admin(self, timeout: float | None = None) -> list[RewardEntry]:
        response = self._call("ListRewards", self._admin.ListRewards, pb.AdminListRewardsRequest(), timeout)
        return [RewardEntry.from_proto(entry) for entry in response.rewards]
