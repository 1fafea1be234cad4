"""One entry point for every reward backend and every number of replicas (``open_client``), and the check every
command makes before it relies on a service's rewards (``check_rewards``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import grpc

from clients._wire import parse_target
from clients.errors import RewardServiceError
from clients.replicas import DNS_SCHEME, ReplicaSet, expand_endpoints
from clients.triton import SCHEME as TRITON_SCHEME
from clients.triton import triton_address
from clients.types import RewardClientLike, RewardInfo

AnyRewardClient = ReplicaSet
"""What ``open_client`` returns for any backend and any number of replicas; code that takes any single client too
(``RewardClient``, ``TritonRewardClient``) types it ``RewardClientLike``."""
LIST_TIMEOUT_S = 10.0  # listing answers at once when a server is up; waiting for rewards to load has its own timeout


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


def check_rewards(
    client: RewardClientLike, server: str, rewards: Sequence[str], timeout: float
) -> dict[str, RewardInfo]:
    """Check that ``server`` (``client``'s address, for messages) offers each of ``rewards`` and has loaded it, then
    wait up to ``timeout`` seconds until each serves. Returns their listings, or {} from a Triton server that cannot
    list its models (PyTriton's are loaded through the load API): then the rewards are only waited on.

    Fails at once, rather than after ``timeout``, with a RewardServiceError whose message names ``server`` and says
    what to do: UNAVAILABLE when nothing answers there, NOT_FOUND for a reward it does not offer (naming those it
    does), FAILED_PRECONDITION for one that failed to load (with the reason), or the code of any other refusal.
    TimeoutError when the rewards still do not serve after ``timeout``.
    """
    try:
        listing = {info.name: info for info in client.list_rewards(timeout=min(timeout, LIST_TIMEOUT_S))}
    except RewardServiceError as error:
        if error.code == grpc.StatusCode.UNAVAILABLE:
            raise RewardServiceError(
                error.code,
                f"cannot connect to the reward service at {server} ({error.message}): start one with "
                f"`ddpo serve --rewards {','.join(rewards)}`, or give the address of one that runs",
                error.method,
            ) from None
        if error.code != grpc.StatusCode.FAILED_PRECONDITION:  # FAILED_PRECONDITION: a Triton that cannot list
            raise RewardServiceError(error.code, f"reward service at {server}: {error.message}", error.method) from None
        listing = None
    if listing is not None:
        missing = [name for name in rewards if name not in listing]
        if missing:
            names = ", ".join(repr(name) for name in missing)
            which = f"reward {names} is" if len(missing) == 1 else f"rewards {names} are"
            raise RewardServiceError(
                grpc.StatusCode.NOT_FOUND,
                f"{which} not offered by {server}; it offers: {', '.join(sorted(listing)) or 'nothing'}",
                "ListRewards",
            )
        for name in rewards:
            if listing[name].load_error:
                raise RewardServiceError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"reward {name!r} could not be loaded by {server}: {listing[name].load_error}",
                    "ListRewards",
                )
    client.wait_ready(timeout=timeout, rewards=list(rewards))
    return {name: listing[name] for name in rewards} if listing is not None else {}
