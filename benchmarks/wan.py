"""Start the delay proxy and check with a raw stream that it is a true delay line."""

from __future__ import annotations

import os
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path


class ProxyUnusable(Exception):
    """The proxy failed its check (the reason is the message)."""


class _TestServer:
    """Loopback server for the check: first byte ``E`` echoes, ``S`` sinks (and records the
    arrival times of the first and last payload bytes, then answers the byte count)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        self.first = self.last = 0.0
        self.received = 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            mode = conn.recv(1)
            if mode == b"E":
                while data := conn.recv(65536):
                    conn.sendall(data)
            elif mode == b"S":
                buf = bytearray(1 << 20)
                first, count = 0.0, 0
                while n := conn.recv_into(buf):
                    if not count:
                        first = time.monotonic()
                    count += n
                    self.last = time.monotonic()
                self.first, self.received = first, count
                conn.sendall(struct.pack("!Q", count))
                self.done.set()

    def close(self) -> None:
        self.sock.close()


@dataclass
class Proxy:
    delay: float
    proc: subprocess.Popen[bytes] | None = None
    ports: dict[int, int] = field(default_factory=dict)  # target port -> proxy port
    check: dict[str, float] = field(default_factory=dict)

    def start(self, targets: list[int], log: Path) -> None:
        argv = [sys.executable, "-m", "benchmarks.delayproxy", "--delay", str(self.delay)]
        for target in targets:
            argv += ["--forward", str(target)]
        with log.open("wb") as err:
            self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err,
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         cwd=Path(__file__).resolve().parent.parent)
        assert self.proc.stdout is not None
        for target in targets:
            line = self.proc.stdout.readline()
            if not line:
                raise ProxyUnusable(f"delay proxy did not start: {log.read_text().strip()}")
            self.ports[target] = int(line)

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.proc = None


def _rtt(port: int, count: int = 7) -> float:
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(b"E")
        times = []
        for _ in range(count):
            started = time.monotonic()
            s.sendall(b"x")
            if s.recv(1) != b"x":
                raise ProxyUnusable("echo through the proxy returned the wrong byte")
            times.append(time.monotonic() - started)
        return statistics.median(times)


def start_and_check(delay: float, targets: list[int], log: Path,
                    stream_bytes: int) -> Proxy:
    """Start a proxy for ``targets`` (plus one for its own check), stream ``stream_bytes``
    through it and measure the added latency; ProxyUnusable unless it is a delay line."""
    server = _TestServer()
    proxy = Proxy(delay)
    try:
        proxy.start([*targets, server.port], log)
        via = proxy.ports[server.port]
        direct_rtt = _rtt(server.port)
        proxied_rtt = _rtt(via)
        payload = os.urandom(1 << 20)
        with socket.create_connection(("127.0.0.1", via)) as s:
            s.sendall(b"S")
            time.sleep(delay * 3)  # the mode byte has passed: the stream starts on an idle line
            started = time.monotonic()
            sent = 0
            while sent < stream_bytes:
                s.sendall(payload)
                sent += len(payload)
            s.shutdown(socket.SHUT_WR)
            answer = s.recv(8)
        if not server.done.wait(30) or struct.unpack("!Q", answer)[0] != sent:
            raise ProxyUnusable("raw stream through the proxy lost bytes")
        one_way = server.first - started
        rate = sent / max(server.last - server.first, 1e-9)
        proxy.check = {
            "delay_set_s": delay,
            "rtt_direct_s": round(direct_rtt, 5),
            "rtt_via_proxy_s": round(proxied_rtt, 5),
            "added_latency_each_way_s": round((proxied_rtt - direct_rtt) / 2, 5),
            "first_byte_latency_s": round(one_way, 5),
            "stream_bytes": sent,
            "stream_MBps": round(rate / 1e6, 1),
            "read_sleep_write_cap_MBps": round((1 << 18) / delay / 1e6, 1),
        }
        added = (proxied_rtt - direct_rtt) / 2
        if not (0.9 * delay <= added <= 1.5 * delay + 0.005
                and 0.9 * delay <= one_way <= 1.5 * delay + 0.005):
            raise ProxyUnusable(f"added latency {added * 1e3:.1f} ms each way"
                                f" (first byte {one_way * 1e3:.1f} ms), set {delay * 1e3:.0f} ms")
        floor = 10 * proxy.check["read_sleep_write_cap_MBps"]
        if rate / 1e6 < floor:
            raise ProxyUnusable(f"raw throughput {rate / 1e6:.1f} MB/s through the proxy is"
                                f" below {floor:.0f} MB/s: not a delay line")
        return proxy
    except BaseException:
        proxy.stop()
        raise
    finally:
        server.close()
