"""The worker's socket to TorchServe's frontend with one writer at a time. In TorchServe's async mode
(ts/async_service.py) final answers are written by its own thread while our step loop writes streamed
ones (send_intermediate_predict_response): two sendall() calls must not interleave their bytes. The
socket TorchServe made becomes this class in place (the same object and file descriptor; a subclass
with no state of its own)."""

from __future__ import annotations

import socket
import threading


class OneWriterSocket(socket.socket):
    __slots__ = ()
    _lock = threading.Lock()

    def sendall(self, data, *args) -> None:
        with self._lock:
            super().sendall(data, *args)
