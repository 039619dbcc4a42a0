"""
A C{--checker} for the drain's integration tests: each login holds a thread
of the reactor's pool for a minute (a backend that hangs), so a stop meets
a worker thread it cannot join.
"""

from __future__ import annotations

import time
from typing import Any

from twisted.internet import threads

#: Seconds each check blocks its thread.
BLOCK = 60.0


def auth_block(authz: str, authc: str, password: str, conn_meta: Any) -> Any:
    """Blocks a pool thread for L{BLOCK} seconds, then refuses."""
    return threads.deferToThread(lambda: (time.sleep(BLOCK), False)[1])
