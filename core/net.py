"""A free TCP port for a rendezvous (torch.distributed's master, Ray's head and agents)."""

from __future__ import annotations

import socket


def free_port(host: str = "") -> int:
    """A port the OS reports free on `host` ("" = every interface) right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
