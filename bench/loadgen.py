"""A closed-loop HTTP load generator for when wrk is not installed; prints post.lua's JSON summary.

Runs in its own process (bench/load.py starts it), one asyncio loop, aiohttp.
It costs more CPU per request than wrk, which the report then says.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import aiohttp


async def _connection(session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str], until: float,
                      latencies: list[float], errors: dict[str, int], statuses: dict[str, int]) -> None:
    while time.monotonic() < until:
        started = time.monotonic()
        try:
            async with session.post(url, data=body, headers=headers) as response:
                await response.read()
                statuses[str(response.status)] = statuses.get(str(response.status), 0) + 1
                if response.status >= 400:
                    errors["status"] += 1
        except asyncio.TimeoutError:
            errors["timeout"] += 1
            continue
        except aiohttp.ClientError:
            errors["read"] += 1
            continue
        latencies.append(time.monotonic() - started)


async def _main(args: argparse.Namespace) -> dict:
    body = open(args.body, "rb").read()
    headers = {"Content-Type": args.content_type}
    for item in args.header:
        name, _, value = item.partition(":")
        headers[name.strip()] = value.strip()
    latencies: list[float] = []
    errors = {"connect": 0, "read": 0, "write": 0, "status": 0, "timeout": 0}
    statuses: dict[str, int] = {}
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        started = time.monotonic()
        until = started + args.duration
        await asyncio.gather(*(_connection(session, args.url, body, headers, until, latencies, errors, statuses)
                               for _ in range(args.concurrency)))
        duration = time.monotonic() - started
    latencies.sort()

    def pct(q: float) -> int:
        return int(latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1e6) if latencies else 0

    return {"requests": len(latencies), "duration_us": int(duration * 1e6), "bytes": 0, **errors,
            "p50_us": pct(0.5), "p90_us": pct(0.9), "p99_us": pct(0.99), "max_us": pct(1.0),
            "mean_us": sum(latencies) / max(1, len(latencies)) * 1e6, "statuses": statuses}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__)
    parser.add_argument("url")
    parser.add_argument("--body", required=True)
    parser.add_argument("--content-type", required=True)
    parser.add_argument("--header", action="append", default=[])
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--duration", type=float, default=10)
    parser.add_argument("--timeout", type=float, default=60)
    print(json.dumps(asyncio.run(_main(parser.parse_args()))))


if __name__ == "__main__":
    main()
