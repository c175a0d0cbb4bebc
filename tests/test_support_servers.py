"""The helpers that start real servers for end-to-end tests (tests/support/servers.py): a free loopback port.
(Their PostgreSQL and MLflow server are exercised in tests/mlops/test_tracking_server.py.)"""

from __future__ import annotations

import socket

from servers import HOST, free_port


def test_free_port_is_bindable_on_loopback():
    port = free_port()
    assert 1024 <= port <= 65535
    with socket.socket() as sock:
        sock.bind((HOST, port))
