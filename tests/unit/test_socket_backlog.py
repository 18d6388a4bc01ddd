"""A unix socket with a full listen queue refuses a connect with EAGAIN at once. The CLI probing for a
running agent must not read that as "no agent" and run the command in-process beside it."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

from kybdr_agent.control.client import agent_listening


def test_a_full_listen_queue_is_a_busy_agent_not_an_absent_one(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(0)
    waiting: list[socket.socket] = []
    try:
        while True:  # fill the queue until the kernel refuses with EAGAIN
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            client.setblocking(False)
            try:
                client.connect(str(path))
            except BlockingIOError:
                client.close()
                break
            waiting.append(client)
            assert len(waiting) < 64, "the kernel never reported a full queue"

        def drain() -> None:
            time.sleep(0.3)
            while not done.is_set():
                try:
                    conn, _ = listener.accept()
                except OSError:
                    continue
                conn.close()

        done = threading.Event()
        listener.settimeout(0.1)
        drainer = threading.Thread(target=drain, daemon=True)
        drainer.start()
        try:
            assert agent_listening(path) is True
        finally:
            done.set()
            drainer.join(5)
    finally:
        for client in waiting:
            client.close()
        listener.close()
