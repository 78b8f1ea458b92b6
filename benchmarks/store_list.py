"""The SQLite store with a million commands: how fast lists are, and whether
retention stalls the server.

Fills a store (through the store's own save/flush path) with N commands for
1,000 agents over 30 days, most of them finished, then times each kind of list
the API offers (first page and a deep page, each filter alone and combined)
and a retention purge of a tenth of the rows, while a ticker task measures how
late the event loop runs (what every other request would feel) and a sender
stores a new command every 5 ms and times its commit (what a send waits
for). The fill uses ``synchronous=normal`` for speed; the purge runs with the
store reopened as the server opens it (``full``).

    python benchmarks/store_list.py --commands 1000000
    python benchmarks/store_list.py --commands 1000000 --db /tmp/commands.db  # keep the file

Prints a Markdown table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio

from trio_quiccmd.model import Command, CommandStatus, ErrorCode, new_command_id, transition
from trio_quiccmd.server.store import CommandQuery
from trio_quiccmd.server.store.sqlite import open_sqlite_store

DAY = 86400.0
CLIENTS = [f"client-{i:04d}" for i in range(1000)]
TYPES = ["echo", "sysinfo", "sleep", "deploy", "restart", "backup", "rotate-logs", "ping", "collect", "update"]


def make(rng: random.Random, created_at: float, n: int) -> Command:
    command = Command(
        command_id=new_command_id(created_at),
        client_id=rng.choice(CLIENTS),
        command_type=rng.choice(TYPES),
        payload={"n": n, "args": ["--verbose", "x" * 40]},
        timeout=30.0,
        created_at=created_at,
    )
    roll = rng.random()
    if roll < 0.001:
        return command  # still pending
    command = transition(command, CommandStatus.EXECUTING, at=created_at + 0.01)
    if roll < 0.002:
        return command
    if roll < 0.90:
        return transition(command, CommandStatus.COMPLETED, at=created_at + 0.2, result={"ok": True, "n": n})
    if roll < 0.97:
        return transition(
            command, CommandStatus.FAILED, at=created_at + 0.2, error="exit status 1",
            error_code=ErrorCode.EXECUTOR_ERROR,
        )
    return transition(
        command, CommandStatus.TIMEOUT, at=created_at + 30, error="no result within 30 s",
        error_code=ErrorCode.EXECUTION_TIMEOUT,
    )


async def fill(store, count: int, now: float) -> float:
    rng = random.Random(1)
    started = time.perf_counter()
    step = 30 * DAY / count
    for start in range(0, count, 20_000):
        for n in range(start, min(start + 20_000, count)):
            command = make(rng, now - 30 * DAY + n * step, n)
            store.save(command, deadline_at=command.created_at + 30)
        await store.flush()
    return time.perf_counter() - started


async def time_query(store, query: CommandQuery, repeat: int) -> dict:
    timings = []
    rows = 0
    for _ in range(repeat):
        started = time.perf_counter()
        page = await store.list(query)
        timings.append((time.perf_counter() - started) * 1000)
        rows = len(page.commands)
    timings.sort()
    return {
        "p50_ms": statistics.median(timings),
        "p99_ms": timings[min(len(timings) - 1, int(len(timings) * 0.99))],
        "rows": rows,
    }


def commit_summary(seconds: list[float]) -> dict:
    seconds = sorted(seconds)
    return {
        "commits": len(seconds),
        "p50_ms": statistics.median(seconds) * 1000,
        "p99_ms": seconds[min(len(seconds) - 1, int(len(seconds) * 0.99))] * 1000,
        "max_ms": seconds[-1] * 1000,
    }


async def commits_during(store, work, now: float) -> tuple[dict, object]:
    """Run ``work()``; meanwhile store a new command every 5 ms and time
    each one's commit (save, then flush). Returns (the commits' summary, result)."""
    rng = random.Random(2)
    timings: list[float] = []
    done = trio.Event()

    async def sender():
        n = 0
        while not done.is_set():
            n += 1
            store.save(make(rng, now + n * 0.001, 10**9 + n))
            started = time.perf_counter()
            await store.flush()
            timings.append(time.perf_counter() - started)
            await trio.sleep(0.005)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender)
        result = await work()
        done.set()
    return commit_summary(timings), result


async def event_loop_lag_during(work) -> tuple[float, float, object]:
    """Run ``work()``; meanwhile a task asks to wake every millisecond and
    records how late it woke. Returns (seconds, worst lateness in ms, result)."""
    worst = 0.0
    done = trio.Event()

    async def ticker():
        nonlocal worst
        while not done.is_set():
            asked = trio.current_time() + 0.001
            await trio.sleep_until(asked)
            worst = max(worst, trio.current_time() - asked)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        started = time.perf_counter()
        result = await work()
        elapsed = time.perf_counter() - started
        done.set()
    return elapsed, worst * 1000, result


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(args.db) if args.db else Path(scratch) / "commands.db"
        now = time.time()
        async with open_sqlite_store(path, synchronous="normal") as store:
            async with trio.open_nursery() as nursery:
                await nursery.start(store.run)
                fill_seconds = await fill(store, args.commands, now)
                size_mib = sum(p.stat().st_size for p in path.parent.glob(path.name + "*")) / 2**20
                print(f"filled {args.commands:,} commands in {fill_seconds:.1f} s ({size_mib:.0f} MiB)", file=sys.stderr)

                middle = (await store.list(CommandQuery(created_before=now - 15 * DAY, limit=1))).commands[0]
                queries = {
                    "newest 100": CommandQuery(),
                    "by client": CommandQuery(client_id="client-0042"),
                    "by status (pending, rare)": CommandQuery(status=CommandStatus.PENDING),
                    "by status (failed)": CommandQuery(status=CommandStatus.FAILED),
                    "by type": CommandQuery(command_type="backup"),
                    "by time (one hour, 15 days ago)": CommandQuery(
                        created_after=now - 15 * DAY - 3600, created_before=now - 15 * DAY
                    ),
                    "client + status": CommandQuery(client_id="client-0042", status=CommandStatus.FAILED),
                    "client + type + time": CommandQuery(
                        client_id="client-0042", command_type="backup", created_after=now - 10 * DAY
                    ),
                    "deep page (cursor 15 days back)": CommandQuery(cursor=middle.command_id),
                    "deep page by client": CommandQuery(client_id="client-0042", cursor=middle.command_id),
                }
                results = {}
                for name, query in queries.items():
                    results[name] = await time_query(store, query, args.repeat)

                nursery.cancel_scope.cancel()
        async with open_sqlite_store(path) as store:  # synchronous=full, as the server
            async with trio.open_nursery() as nursery:
                await nursery.start(store.run)
                idle, _ = await commits_during(store, lambda: trio.sleep(2), now)
                during, (purge_seconds, worst_lag_ms, deleted) = await commits_during(
                    store,
                    lambda: event_loop_lag_during(
                        lambda: store.purge(finished_before=now - 27 * DAY, keep_at_most=10**9)
                    ),
                    now,
                )
                nursery.cancel_scope.cancel()

    print(f"| list ({args.commands:,} commands) | rows | p50 ms | p99 ms |")
    print("| --- | ---: | ---: | ---: |")
    for name, r in results.items():
        print(f"| {name} | {r['rows']} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} |")
    print(
        f"\npurge: {deleted:,} rows in {purge_seconds:.1f} s; "
        f"event loop at most {worst_lag_ms:.1f} ms late meanwhile; a send's commit "
        f"p50 / p99 / max {during['p50_ms']:.1f} / {during['p99_ms']:.1f} / {during['max_ms']:.1f} ms "
        f"({idle['p50_ms']:.1f} / {idle['p99_ms']:.1f} / {idle['max_ms']:.1f} ms before it)"
    )
    print(json.dumps({
        "commands": args.commands, "fill_seconds": fill_seconds, "db_mib": size_mib,
        "lists": results,
        "purge": {
            "deleted": deleted, "seconds": purge_seconds, "worst_lag_ms": worst_lag_ms,
            "commits_during": during, "commits_before": idle,
        },
    }))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--commands", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument("--db", help="keep the database here (default: a temporary file)")
    trio.run(main, parser.parse_args())
