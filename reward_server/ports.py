"""A port that another process listens on is an error, not a port to share.

gRPC binds with SO_REUSEPORT unless told not to, so a second ``ddpo serve`` on a port in use used to start anyway and
take a share of the first one's calls. Every frontend (gRPC, metrics, Triton, PyTriton) checks its ports here.
"""

from __future__ import annotations

import errno
import socket


def check_free(host: str, port: int, what: str) -> None:
    """OSError saying ``what`` ``host:port`` is already in use (or why it cannot be bound); nothing for port 0.

    The probe sets SO_REUSEADDR, as servers do, so a port left in TIME_WAIT by a previous run counts as free.
    """
    if port == 0:
        return
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                message = f"{what} {host}:{port} is already in use; stop what listens there or pick another port"
                raise OSError(message) from None
            raise OSError(f"cannot bind {what} {host}:{port}: {error.strerror}") from None
