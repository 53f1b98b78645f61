"""tests/ports.py: ports handed out for servers a test has yet to start."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.ports import free_port

ROOT = Path(__file__).resolve().parents[1]
# Of ~22k ports, drawn with replacement: 800 repeat one almost surely (1 - e^-14), and 200
# against another process's 800 share one almost surely (1 - e^-7); a process's own share
# holds ~1400, room for both tests in one run.
DRAWS = 800


def test_one_process_never_hands_out_a_port_twice() -> None:
    # Callers draw several ports before starting any server (a Redis cluster's nodes, a
    # Mooncake master's three): a repeat is two servers on one port.
    ports = [free_port() for _ in range(DRAWS)]
    assert len(set(ports)) == len(ports)


def test_concurrent_test_processes_never_hand_out_the_same_port() -> None:
    code = (
        "import sys\nfrom tests.ports import free_port\n"
        f"print(' '.join(str(free_port()) for _ in range({DRAWS})), flush=True)\n"
        "sys.stdin.read()\n"  # the ports stay this process's until the parent has drawn
    )
    other = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)  # fmt: skip
    try:
        assert other.stdout is not None
        theirs = {int(p) for p in other.stdout.readline().split()}
        assert len(theirs) == DRAWS
        mine = {free_port() for _ in range(200)}
        assert not mine & theirs
    finally:
        other.communicate("", timeout=30)
