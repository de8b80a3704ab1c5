#!/usr/bin/env python3
"""Preliminary measurements against a running gateway, until the Rust load tester (loadtest/)
exists: resident memory per idle SSE connection, and publish-to-receive latency for a modest
fan-out. Standard library only; loopback only; bounded in count and time.

  python3 bench/sse_probe.py idle    --port 8080 --pid <gateway pid> --connections 5000
  python3 bench/sse_probe.py fanout  --port 8080 --connections 1000 --rate 10 --seconds 10
"""
import argparse
import asyncio
import json
import time
import urllib.request


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def open_stream(port, topic):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET /events?topic={topic} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head[:60]
    return reader, writer


async def idle(args):
    before = rss_kib(args.pid)
    streams = []
    for i in range(args.connections):
        streams.append(await open_stream(args.port, f"idle{i % 100}"))
    await asyncio.sleep(2)
    after = rss_kib(args.pid)
    per = (after - before) / args.connections
    print(json.dumps({"connections": args.connections, "rss_before_kib": before,
                      "rss_after_kib": after, "kib_per_connection": round(per, 2)}))
    for _, writer in streams:
        writer.close()


def publish(port, topic, data):
    body = json.dumps({"topic": topic, "data": data}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/publish", body,
                                     {"Content-Type": "application/json"})
    urllib.request.urlopen(request).read()


async def fanout(args):
    latencies = []
    expected = int(args.rate * args.seconds)

    async def consume(reader):
        seen = 0
        while seen < expected:
            line = await reader.readline()
            if line.startswith(b"data: "):
                sent = float(line[6:].decode().split()[0])
                latencies.append(time.time() - sent)
                seen += 1
        return seen

    streams = [await open_stream(args.port, "fanout") for _ in range(args.connections)]
    tasks = [asyncio.create_task(consume(reader)) for reader, _ in streams]
    loop = asyncio.get_running_loop()
    start = time.time()
    for n in range(expected):
        # Open loop: each event leaves on schedule, whatever the server's speed.
        await asyncio.sleep(max(0.0, start + n / args.rate - time.time()))
        await loop.run_in_executor(None, publish, args.port, "fanout", f"{time.time()} {n}")
    received = await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)
    latencies.sort()
    pct = lambda p: round(1000 * latencies[min(len(latencies) - 1, int(p * len(latencies)))], 1)
    print(json.dumps({"connections": args.connections, "events": expected,
                      "deliveries": sum(received), "expected": expected * args.connections,
                      "p50_ms": pct(0.50), "p99_ms": pct(0.99), "max_ms": pct(1.0)}))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["idle", "fanout"])
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--pid", type=int)
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=10)
    parser.add_argument("--seconds", type=float, default=10)
    args = parser.parse_args()
    asyncio.run(idle(args) if args.mode == "idle" else fanout(args))


if __name__ == "__main__":
    main()
