"""One exception type for everything the service refuses, as tritonclient does."""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc

if TYPE_CHECKING:
    from clients.types import ItemResult


class RewardServiceError(Exception):
    """An RPC failed as a whole. ``code`` is the gRPC status code; ``message`` says why and what to do."""

    def __init__(self, code: grpc.StatusCode, message: str, method: str = "") -> None:
        super().__init__(f"{method + ': ' if method else ''}{code.name}: {message}")
        self.code = code
        self.message = message
        self.method = method

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError, method: str) -> RewardServiceError:
        code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        details = error.details() if hasattr(error, "details") else str(error)
        return cls(code or grpc.StatusCode.UNKNOWN, details or "", method)


class ServiceUnavailableError(RewardServiceError):
    """No reward server could be reached for longer than the outage timeout (UNAVAILABLE)."""

    def __init__(self, message: str, method: str = "") -> None:
        super().__init__(grpc.StatusCode.UNAVAILABLE, message, method)


class ItemsFailedError(Exception):
    """Scores were asked for, but some items failed; ``failed`` holds their results (id, code, message)."""

    def __init__(self, failed: list[ItemResult]) -> None:
        shown = "; ".join(f"{r.id}: {r.code.name}: {r.message}" for r in failed[:5])
        more = f" (and {len(failed) - 5} more)" if len(failed) > 5 else ""
        super().__init__(f"{len(failed)} item(s) failed: {shown}{more}")
        self.failed = failed
