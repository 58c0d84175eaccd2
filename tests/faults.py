"""A TCP proxy on loopback that cuts connections in the middle of a response.

It stands between a client (s3fs) and a real server (moto's S3 server) and forwards
bytes both ways. A connection whose server-to-client stream passes ``cut_after`` bytes
is reset there (SO_LINGER 0: the client sees a connection reset, as on a real network
drop), for the first ``cuts`` such connections; after that it forwards untouched.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from typing import Any


class CuttingProxy:
    """``with CuttingProxy(upstream_port, cut_after=..., cuts=...) as proxy:`` -> proxy.url."""

    def __init__(self, upstream_port: int, cut_after: int, cuts: int) -> None:
        self.upstream_port = upstream_port
        self.cut_after = cut_after
        self.cuts_left = cuts
        self.cuts_made = 0
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._server.getsockname()[1]}"
        self._stop = threading.Event()

    def __enter__(self) -> CuttingProxy:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._server.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            threading.Thread(target=self._pipe, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, True), daemon=True).start()

    def _take_cut(self) -> bool:
        with self._lock:
            if self.cuts_left <= 0:
                return False
            self.cuts_left -= 1
            self.cuts_made += 1
            return True

    def _pipe(self, source: socket.socket, sink: socket.socket, downstream: bool) -> None:
        sent = 0
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if downstream and sent + len(data) > self.cut_after and self._take_cut():
                    sink.sendall(data[: max(0, self.cut_after - sent)])
                    for s in (sink, source):
                        # Reset, not a clean close: what a dropped connection looks like.
                        # shutdown() first wakes the other direction's thread blocked in
                        # recv() on the same socket; without it close() waits for it.
                        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        with contextlib.suppress(OSError):
                            s.shutdown(socket.SHUT_RDWR)
                        s.close()
                    return
                sink.sendall(data)
                sent += len(data)
        except OSError:
            pass
        finally:
            for s in (sink, source):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
