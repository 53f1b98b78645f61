"""The systemd notify protocol, spoken directly (no libsystemd): READY, STATUS, RELOADING,
STOPPING and the watchdog keep-alive.

Primitives: `Notifier.from_env()`, `ready(status)`, `status(text)`, `reloading()`,
`stopping()`, `start_watchdog()`, `close()`.

Messages are datagrams of `KEY=VALUE` lines sent to the socket named by $NOTIFY_SOCKET (a
path, or `@name` for the abstract namespace). Without that variable every call is a
no-op, so the daemon behaves the same with or without systemd.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable

log = logging.getLogger("tierd.sdnotify")


class Notifier:
    def __init__(self, address: str | None, watchdog_usec: int = 0) -> None:
        self._address = address
        self._sock: socket.socket | None = None
        if address:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._watchdog_usec = watchdog_usec
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def from_env(cls) -> Notifier:
        usec = os.environ.get("WATCHDOG_USEC", "")
        pid = os.environ.get("WATCHDOG_PID", "")
        # systemd sets WATCHDOG_PID to the service's main pid: another process ignores it.
        mine = not pid or pid == str(os.getpid())
        return cls(os.environ.get("NOTIFY_SOCKET"), int(usec) if usec.isdigit() and mine else 0)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    @property
    def watchdog_interval(self) -> float:
        """Seconds between keep-alive pings (0: no watchdog)."""
        return self._watchdog_usec / 2e6

    def send(self, **fields: str | int) -> None:
        if self._sock is None or self._address is None:
            return
        addr = "\0" + self._address[1:] if self._address.startswith("@") else self._address
        payload = "\n".join(f"{k}={v}" for k, v in fields.items()).encode()
        try:
            self._sock.sendto(payload, addr)
        except OSError as e:  # systemd gone or socket full: the daemon keeps running
            log.warning("cannot notify systemd: %s", e)

    def ready(self, status: str) -> None:
        self.send(READY=1, STATUS=status, MAINPID=os.getpid())

    def status(self, text: str) -> None:
        self.send(STATUS=text)

    def reloading(self) -> None:
        # MONOTONIC_USEC lets systemd match this reload to the READY=1 that ends it.
        self.send(RELOADING=1, MONOTONIC_USEC=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)

    def stopping(self, status: str = "draining") -> None:
        self.send(STOPPING=1, STATUS=status)

    def start_watchdog(self, alive: Callable[[], bool] | None = None) -> None:
        """Ping at half the interval systemd asked for, while `alive()` holds."""
        if not self._watchdog_usec or self._sock is None:
            return
        interval = self._watchdog_usec / 2e6

        def loop() -> None:
            while not self._stop.wait(interval):
                if alive is None or alive():
                    self.send(WATCHDOG=1)

        self._thread = threading.Thread(target=loop, name="tierd-watchdog", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
