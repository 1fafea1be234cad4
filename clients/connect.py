"""One entry point for every reward backend: the project's gRPC server or Triton (``triton://``)."""

from __future__ import annotations

from pathlib import Path

from clients._wire import parse_target
from clients.client import RewardClient
from clients.triton import SCHEME as TRITON_SCHEME
from clients.triton import TritonRewardClient, triton_address

AnyRewardClient = RewardClient | TritonRewardClient


def open_client(
    server: str,
    *,
    timeout: float = 60.0,
    progress_timeout: float = 600.0,
    tls: bool | None = None,
    root_certificates: str | Path | None = None,
    auth_token: str | None = None,
) -> AnyRewardClient:
    """A client for ``server``: ``triton://host:port`` for Triton, else ``[grpc[s]://]host:port`` for ``ddpo serve``."""
    client_class: type[AnyRewardClient] = TritonRewardClient if server.startswith(TRITON_SCHEME) else RewardClient
    return client_class(
        server,
        timeout=timeout,
        progress_timeout=progress_timeout,
        tls=tls,
        root_certificates=root_certificates,
        auth_token=auth_token,
    )


def check_address(server: str) -> None:
    """ValueError, saying what is expected, unless ``server`` is an address ``open_client`` takes."""
    if server.startswith(TRITON_SCHEME):
        triton_address(server)
    else:
        parse_target(server)
