"""The PostgreSQL store against SQLite, and two instances on one database against one (issue 12).

    .venv/bin/python -m bench.scale                        # models/demo, 10 s cells
    .venv/bin/python -m bench.scale --model models/NAME --cell-seconds 5

On demand only (never in the tests). It starts a throwaway PostgreSQL server
the way the tests do (tests/postgres.py: Debian's initdb and pg_ctl, as the
`postgres` user when run as root, on 127.0.0.1), then these appliances on the
same model: `sqlite` (the default store), `postgres` (one instance), and two
more instances on one shared database. Cells send a 600x450 JPEG to
/check-image at concurrency 1 and 4, alternating, each after every server has
gone idle. The two-instance cells (concurrency 4 only) drive both at once,
half the clients each, and add their answers. It prints p50, p99 and answers per second, the ratios
postgres / sqlite and two instances / one, and the database's cost per image
(the difference of the mean latencies at concurrency 1). The goal: postgres
costs at most 10% of sqlite's single-instance throughput. On 2 cores, two
instances cannot beat one: inference already uses every core.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import Any

from . import images, procs, standalone
from .load import LoadResult, run_load

CONCURRENCY = (1, 4)
HEADERS = {"X-User-Id": images.USER_ID}


def start_servers(model_dir: Path, work: Path, database_url: str) -> dict[str, list[procs.Server]]:
    """Each setup's running instances: sqlite, postgres, and two instances on a second database."""
    pg = {"backend": "postgres", "database_url": database_url}
    setups: dict[str, list[procs.Server]] = {}
    try:
        setups["sqlite"] = [procs.start_appliance("sqlite", model_dir, work / "sqlite", {"storage": {"backend": "sqlite"}})]
        setups["postgres"] = [procs.start_appliance("postgres", model_dir, work / "postgres", {"storage": pg})]
        setups["postgres x2"] = [
            procs.start_appliance(f"postgres-{n}", model_dir, work / f"postgres-{n}", {"storage": pg}) for n in (1, 2)
        ]
    except BaseException:
        stop_all(setups)
        raise
    return setups


def stop_all(setups: dict[str, list[procs.Server]]) -> None:
    for servers in setups.values():
        for server in servers:
            server.stop()


def drive(servers: list[procs.Server], body: Path, concurrency: int, cell_s: int) -> LoadResult:
    """Load every instance at once, `concurrency` clients in all; one result summing their answers."""
    share = concurrency // len(servers)
    results: list[LoadResult] = []
    threads = [
        threading.Thread(target=lambda s=server: results.append(run_load(
            f"{s.url}/check-image", body, images.MULTIPART_TYPE, HEADERS, concurrency=share, duration_s=cell_s)))
        for server in servers
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if len(results) == 1:
        return results[0]
    first = results[0]
    return LoadResult(first.generator, concurrency, first.duration_s, sum(r.requests for r in results),
                      sum(r.errors for r in results), round(sum(r.rps for r in results), 2),
                      max(r.p50_ms for r in results), max(r.p90_ms for r in results),
                      max(r.p99_ms for r in results), max(r.max_ms for r in results), {}, {})


def run(model_dir: Path, cell_s: int, work: Path) -> list[dict[str, Any]]:
    """Every (setup, concurrency) cell, alternating setups; one row per cell."""
    sys.path.insert(0, str(procs.ROOT))
    from tests.postgres import PostgresServer

    workloads = images.make_images(work / "images")
    database = PostgresServer()
    database.start()
    try:
        setups = start_servers(model_dir, work, database.create_database())
        try:
            rows = []
            for concurrency in CONCURRENCY:
                for name, servers in setups.items():
                    if concurrency < len(servers):  # every instance gets at least one client, the total stays fair
                        continue
                    for others in setups.values():
                        for other in others:
                            other.wait_idle()
                    result = drive(servers, workloads["derm"].body_path, concurrency, cell_s)
                    rows.append({"setup": name, **result.as_dict()})
            return rows
        finally:
            stop_all(setups)
    finally:
        database.destroy()


def table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table per concurrency, with the ratios the issue asks for."""
    lines = ["| concurrency | setup | p50 / p99 ms | img/s | errors | ratio |", "| --- | --- | --- | --- | --- | --- |"]
    by = {(row["concurrency"], row["setup"]): row for row in rows}
    for (concurrency, setup), row in by.items():
        base = by.get((concurrency, {"postgres": "sqlite", "postgres x2": "postgres"}.get(setup, "")))
        ratio = f"{row['rps'] / base['rps']:.2f} of {base['setup']}" if base and base["rps"] else ""
        lines.append(f"| {concurrency} | {setup} | {row['p50_ms']:.1f} / {row['p99_ms']:.1f} | {row['rps']:.1f} "
                     f"| {row['errors']} | {ratio} |")
    one = {setup: by.get((1, setup)) for setup in ("sqlite", "postgres")}
    if one["sqlite"] and one["postgres"] and one["sqlite"]["rps"] and one["postgres"]["rps"]:
        cost = 1000 / one["postgres"]["rps"] - 1000 / one["sqlite"]["rps"]
        lines.append(f"\nDatabase cost per image at concurrency 1: {cost:+.1f} ms "
                     f"(mean latency postgres minus sqlite; goal: postgres >= 0.90 of sqlite's img/s)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return standalone.main("scale", __doc__, run, table, argv)


if __name__ == "__main__":
    sys.exit(main())
