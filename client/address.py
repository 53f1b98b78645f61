"""Daemon addresses: "unix:/abs/path", "unix:///abs/path" or "host:port".

Primitives: `parse_address(text) -> Address` (`.target` for grpc, `.unix_path`);
`unix_socket_path(text) -> str | None`, the one reading of a unix address, which the
daemon's listeners and config checks share.

Checked here rather than left to grpc, whose errors for a bad target only appear at the
first call, as a bare UNAVAILABLE that the retry loop would then spin on.
"""

from __future__ import annotations

from dataclasses import dataclass

# sockaddr_un.sun_path is 108 bytes including the terminating NUL on Linux.
_MAX_UNIX_PATH = 107


@dataclass(frozen=True)
class Address:
    target: str  # a grpc channel target
    unix_path: str | None = None  # set for unix-domain sockets


def unix_socket_path(text: str) -> str | None:
    """The socket path of a "unix:" address (None for any other): "unix:///abs" has an
    empty authority, so it names the same path as "unix:/abs"."""
    if not text.startswith("unix:"):
        return None
    return text.removeprefix("unix:").removeprefix("//")


def _parse_unix(text: str) -> Address:
    rest = unix_socket_path(text) or ""
    if text.startswith("unix://") and not rest.startswith("/"):
        # "unix://name" would be a host, not a path.
        raise ValueError(f"address {text!r}: use unix:/abs/path or unix:///abs/path")
    if not rest.startswith("/"):
        raise ValueError(f"address {text!r}: the socket path must be absolute")
    if len(rest.encode()) > _MAX_UNIX_PATH:
        raise ValueError(f"address {text!r}: socket path longer than {_MAX_UNIX_PATH} bytes")
    return Address(target=f"unix:{rest}", unix_path=rest)


def _parse_tcp(text: str) -> Address:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port:
        raise ValueError(f"address {text!r}: expected unix:/path or host:port")
    if host.startswith("["):
        if not host.endswith("]") or len(host) < 3:
            raise ValueError(f"address {text!r}: malformed bracketed IPv6 host")
    elif ":" in host:
        raise ValueError(f"address {text!r}: write IPv6 hosts in brackets, [::1]:port")
    if any(c.isspace() or c == "/" for c in host):
        raise ValueError(f"address {text!r}: invalid host {host!r}")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"address {text!r}: port must be 1..65535")
    return Address(target=f"{host}:{int(port)}")


def parse_address(text: str) -> Address:
    if not isinstance(text, str) or not text:
        raise ValueError("address must be a non-empty string")
    return _parse_unix(text) if text.startswith("unix:") else _parse_tcp(text)
