"""One entry point for every reward backend and every number of replicas: ``open_client``."""

from __future__ import annotations

from pathlib import Path

from clients._wire import parse_target
from clients.replicas import DNS_SCHEME, ReplicaSet, expand_endpoints
from clients.triton import SCHEME as TRITON_SCHEME
from clients.triton import triton_address

AnyRewardClient = ReplicaSet


def open_client(
    server: str,
    *,
    timeout: float = 60.0,
    progress_timeout: float = 600.0,
    outage_timeout: float = 900.0,
    tls: bool | None = None,
    root_certificates: str | Path | None = None,
    auth_token: str | None = None,
) -> ReplicaSet:
    """A client for ``server``: ``[grpc[s]://]host:port`` for ``ddpo serve``, ``triton://host:port`` for Triton, a
    comma-separated list of either for several replicas, or ``dns:///name:port`` for every replica a name resolves
    to (``clients.replicas``)."""
    check_address(server)
    return ReplicaSet(
        server,
        timeout=timeout,
        progress_timeout=progress_timeout,
        outage_timeout=outage_timeout,
        tls=tls,
        root_certificates=root_certificates,
        auth_token=auth_token,
    )


def check_address(server: str) -> None:
    """ValueError, saying what is expected, unless ``server`` is an address ``open_client`` takes."""
    if server.startswith(DNS_SCHEME):
        expand_endpoints(server)
        return
    for address, _ in expand_endpoints(server):
        if address.startswith(TRITON_SCHEME):
            triton_address(address)
        else:
            parse_target(address)
