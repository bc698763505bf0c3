"""A delay line for TCP on loopback: every byte leaves the proxy ``delay`` seconds after it
arrived, in each direction, at full speed.

Each direction has a reader that reads continuously and stamps every chunk with its arrival
time, and a writer that releases each chunk at arrival + delay (all chunks that are due are
written together). So throughput is not capped by the delay (a read-sleep-write loop would
move one buffer per delay); only what the endpoints keep in flight (TCP is terminated at the
proxy, so these are the application's windows, for example SSH channel windows) limits a
transfer, as on a real long link. The reader stops reading while more than ``--buffer`` bytes
wait (a router's queue), which never happens below that many bytes per delay.

Run as ``python -m benchmarks.delayproxy --delay 0.05 --forward PORT [--forward PORT ...]``:
for each ``--forward`` it listens on a free port of 127.0.0.1 and prints that port, one per
line, in order, then serves until killed.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import socket
import sys


class _Direction:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 delay: float, limit: int) -> None:
        self.reader, self.writer = reader, writer
        self.delay, self.limit = delay, limit
        self.queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self.queued = 0
        self.arrived = asyncio.Event()
        self.room = asyncio.Event()

    async def read(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                data = await self.reader.read(1 << 18)
                self.queue.append((loop.time() + self.delay, data))
                self.arrived.set()
                if not data:
                    return
                self.queued += len(data)
                while self.queued > self.limit:
                    self.room.clear()
                    await self.room.wait()
        except (ConnectionError, OSError):
            self.queue.append((loop.time(), b""))
            self.arrived.set()

    async def write(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self.queue:
                self.arrived.clear()
                await self.arrived.wait()
            wait = self.queue[0][0] - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            now = loop.time()
            out: list[bytes] = []
            eof = False
            while self.queue and self.queue[0][0] <= now:
                data = self.queue.popleft()[1]
                if not data:
                    eof = True
                    break
                out.append(data)
            if out:
                size = sum(len(d) for d in out)
                self.writer.write(b"".join(out))
                self.queued -= size
                self.room.set()
                await self.writer.drain()
            if eof:
                if self.writer.can_write_eof():
                    self.writer.write_eof()
                return


def _nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def _serve_connection(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter,
                            target: int, delay: float, limit: int) -> None:
    try:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", target, limit=1 << 20)
    except OSError:
        client_w.close()
        return
    _nodelay(client_w)
    _nodelay(server_w)
    up = _Direction(client_r, server_w, delay, limit)
    down = _Direction(server_r, client_w, delay, limit)
    tasks = [asyncio.create_task(c) for c in (up.read(), up.write(), down.read(), down.write())]
    try:
        await asyncio.gather(*tasks)
    except (ConnectionError, OSError):
        pass
    finally:
        for task in tasks:
            task.cancel()
        for w in (client_w, server_w):
            w.close()


async def serve(targets: list[int], delay: float, limit: int) -> None:
    servers = []
    for target in targets:
        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter,
                         target: int = target) -> None:
            await _serve_connection(r, w, target, delay, limit)

        server = await asyncio.start_server(handle, "127.0.0.1", 0, limit=1 << 20)
        servers.append(server)
        print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.gather(*(s.serve_forever() for s in servers))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--delay", type=float, default=0.05, help="seconds, each way")
    parser.add_argument("--forward", type=int, action="append", required=True,
                        metavar="PORT", help="127.0.0.1 port to forward to (repeatable)")
    parser.add_argument("--buffer", type=int, default=64 << 20,
                        help="bytes queued per direction before reading pauses")
    args = parser.parse_args()
    try:
        asyncio.run(serve(args.forward, args.delay, args.buffer))
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
