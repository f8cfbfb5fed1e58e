"""The server's socket and its optional packages, without importing torch or FastAPI (the
command line checks both before any weights load)."""

from __future__ import annotations

import importlib.util
import socket

from ..errors import MissingDependencyError, UsageError

SERVER_PACKAGES = ("fastapi", "uvicorn")


def require_server_packages() -> None:
    """A MissingDependencyError with the pip command when FastAPI or uvicorn is missing."""
    missing = [name for name in SERVER_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise MissingDependencyError(
            f"dyllm serve needs FastAPI and uvicorn ({', '.join(missing)} missing); install them with "
            'pip install "dyllm-fx[serve]" (from a checkout: pip install -e ".[serve]")'
        )


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: a free one); a UsageError names the fix."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise UsageError(
            f"cannot listen on {host}:{port}: {err.strerror or err}; choose another --port (0: any free one)"
        ) from None
    sock.listen(128)
    return sock


def free_port(host: str) -> int:
    """A TCP port nobody listens on now on ``host`` (for a server that binds the port itself)."""
    with bind_socket(host, 0) as sock:
        return sock.getsockname()[1]


__all__ = ["SERVER_PACKAGES", "bind_socket", "free_port", "require_server_packages"]
