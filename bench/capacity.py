"""How many messages a second one load-client process can take in: ``python -m bench.capacity``.

A server that does nothing but write (raw asyncio, prebuilt frames) sends ``--rounds`` rounds
of one ``task_update``-sized frame to each of ``--clients`` WebSockets, one write per socket
per round, as a fan-out does. The load client of the benchmark receives them; its CPU time per
message, measured while receiving, is the figure to compare with the servers' delivery rates.
"""

import argparse
import asyncio
import base64
import hashlib
import json
import multiprocessing
import os
import time

from bench.loadclient import LoadClient, raise_open_file_limit
from bench.procstat import seconds_added, thread_times

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def update_frame() -> bytes:
    """A server text frame carrying a task_update of the usual size."""
    task = {
        "id": "0" * 36, "owner": 1, "name": "fanout", "status": "running", "progress": 5,
        "result": None, "error": "", "seq": 2, "created_at": "2025-01-01T00:00:00.000000+00:00",
        "updated_at": "2025-01-01T00:00:00.000000+00:00",
    }  # fmt: skip
    message = {"type": "task_update", "task_id": task["id"], "status": "running",
               "progress": 5, "seq": 2, "timestamp": task["updated_at"], "task": task}  # fmt: skip
    payload = json.dumps(message).encode()
    return bytes((0x81, 126)) + len(payload).to_bytes(2, "big") + payload


class Writer(asyncio.Protocol):
    """Accepts the upgrade, sends ``connected``, then only writes."""

    def __init__(self, ready: list[asyncio.Transport]) -> None:
        self.ready = ready
        self.head = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.head is None:
            return  # client frames (pongs) are ignored
        self.head += data
        if b"\r\n\r\n" not in self.head:
            return
        key = next(
            line.split(b":", 1)[1].strip()
            for line in self.head.split(b"\r\n")
            if line.lower().startswith(b"sec-websocket-key:")
        )
        accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
        connected = b'{"type":"connected"}'
        self.transport.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n" + bytes((0x81, len(connected)))
            + connected
        )  # fmt: skip
        self.head = None
        self.ready.append(self.transport)


def serve(ports: multiprocessing.Queue, go: multiprocessing.Queue, rounds: int) -> None:
    async def main() -> None:
        ready: list[asyncio.Transport] = []
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: Writer(ready), "127.0.0.1", 0, backlog=4096)
        ports.put(server.sockets[0].getsockname()[1])
        await loop.run_in_executor(None, go.get)
        frame = update_frame()
        for _ in range(rounds):
            for transport in ready:
                transport.write(frame)
            await asyncio.sleep(0)
        await loop.run_in_executor(None, go.get)

    asyncio.run(main())


async def measure(port: int, go: multiprocessing.Queue, clients: int, rounds: int) -> dict:
    client = LoadClient()
    opened = await client.open("ws", "127.0.0.1", port, ["/ws"] * clients, [""] * clients, 100, 30)
    client.clear("ws")
    before = thread_times(os.getpid())
    started = time.monotonic()
    go.put("send")
    complete = await client.wait("ws", rounds, 120)
    cpu = seconds_added(before, thread_times(os.getpid()))
    last = max(log[-1][0] for log in client.collect("ws") if log)
    messages = opened["opened"] * rounds
    go.put("stop")
    await client.close("ws")
    return {
        "clients": opened["opened"],
        "messages": messages,
        "complete": complete,
        "messages_per_s": messages / (last - started),
        "client_cpu_us_per_message": cpu / messages * 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--clients", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    raise_open_file_limit()
    context = multiprocessing.get_context("spawn")
    ports, go = context.Queue(), context.Queue()
    server = context.Process(target=serve, args=(ports, go, args.rounds), daemon=True)
    server.start()
    try:
        result = asyncio.run(measure(ports.get(timeout=30), go, args.clients, args.rounds))
    finally:
        server.join(5)
        if server.is_alive():
            server.kill()
    print(json.dumps(result, indent=2))
    print(
        f"one load client took in {result['messages_per_s']:,.0f} messages/s at "
        f"{result['client_cpu_us_per_message']:.1f} µs of CPU each "
        f"(~{1e6 / result['client_cpu_us_per_message']:,.0f}/s on a core of its own)"
    )


if __name__ == "__main__":
    main()
