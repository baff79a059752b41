"""A TCP proxy that adds a fixed one-way delay, to measure as if the database were across a network.

On this machine the worker and Postgres share a loopback interface, where a round trip costs
tens of microseconds; in a deployment they are on different hosts (0.2-1 ms within one
availability zone). Row-by-row code pays that per statement, batched code once per batch, so
the benchmarks measure both ways.

Each direction of each connection has a reader thread (stamps every chunk with its arrival
time) and a writer thread (forwards it ``delay`` later, in order). Threads rather than asyncio:
the event loop's timers are rounded up to a millisecond, too coarse for a 0.25 ms delay. It
runs in its own process (``python -m bench.latency_proxy``) so that it shares no GIL with the
code under measurement; it prints its port on the first line of its output.

    .venv/bin/python -m bench.latency_proxy --delay-ms 0.25 [--target 127.0.0.1:5432]
"""

from __future__ import annotations

import argparse
import contextlib
import queue
import socket
import sys
import threading
import time


def _forward(src: socket.socket, dst: socket.socket, delay_s: float) -> None:
    chunks: queue.Queue[tuple[float, bytes]] = queue.Queue()

    def read() -> None:
        try:
            while data := src.recv(65536):
                chunks.put((time.perf_counter() + delay_s, data))
        except OSError:
            pass
        chunks.put((0.0, b""))

    def write() -> None:
        try:
            while True:
                due, data = chunks.get()
                if not data:
                    break
                wait = due - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            # Closing both ends wakes the other direction's reader too.
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    threading.Thread(target=read, daemon=True).start()
    threading.Thread(target=write, daemon=True).start()


def serve(target: tuple[str, int], delay_s: float, port: int = 0) -> None:
    """Accept connections forever, each forwarded to ``target`` with ``delay_s`` each way."""
    listener = socket.create_server(("127.0.0.1", port))
    print(listener.getsockname()[1], flush=True)
    while True:
        client, _ = listener.accept()
        try:
            upstream = socket.create_connection(target)
        except OSError:
            client.close()
            continue
        for s in (client, upstream):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _forward(client, upstream, delay_s)
        _forward(upstream, client, delay_s)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--delay-ms", type=float, required=True, help="one-way delay (a round trip pays twice)"
    )
    parser.add_argument("--target", default="127.0.0.1:5432")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    host, _, port = args.target.rpartition(":")
    try:
        serve((host, int(port)), args.delay_ms / 1000, args.port)
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
