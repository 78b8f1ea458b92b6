"""The SQLite store's write path alone: CPU per command, no network, no agent.

Commands go through the store as the manager drives it: saved in batches of B
(the commands in flight), flushed (a send is acknowledged only once stored),
then saved as executing, then completed, and flushed again. Reports the CPU of
the whole process (event loop and the store's thread) per command, so a change
to the store can be judged without the noise of a two-process benchmark.

    python benchmarks/store_writes.py                 # B = 1, 16, 256
    python benchmarks/store_writes.py --batch 256 --commands 50000
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import make_payload, make_result  # noqa: E402

from trio_quiccmd.model import Command, CommandStatus, new_command_id, transition  # noqa: E402
from trio_quiccmd.server.store.sqlite import open_sqlite_store  # noqa: E402


async def measure(batch: int, commands: int, synchronous: str) -> dict:
    with tempfile.TemporaryDirectory() as directory:
        async with open_sqlite_store(Path(directory) / "commands.db", synchronous=synchronous) as store:
            async with trio.open_nursery() as nursery:
                await nursery.start(store.run)
                cpu, wall = time.process_time(), time.perf_counter()
                for start in range(0, commands, batch):
                    now = time.time()
                    accepted = [
                        Command(
                            command_id=new_command_id(now), client_id=f"agent-{i % 10}",
                            command_type="echo", payload=make_payload(start + i), created_at=now,
                        )
                        for i in range(batch)
                    ]
                    for command in accepted:
                        store.save(command, deadline_at=now + 30)
                    await store.flush()
                    running = [transition(c, CommandStatus.EXECUTING, at=now) for c in accepted]
                    for command in running:
                        store.save(command, deadline_at=now + 30, sent_to="instance-1")
                    await store.flush()
                    for command in running:
                        store.save(transition(
                            command, CommandStatus.COMPLETED, at=now, result=make_result(command.payload)
                        ))
                    await store.flush()
                cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
                nursery.cancel_scope.cancel()
    done = commands // batch * batch
    return {
        "batch": batch, "commands": done, "synchronous": synchronous,
        "cpu_us_per_command": round(cpu / done * 1e6, 1), "wall_us_per_command": round(wall / done * 1e6, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, action="append")
    parser.add_argument("--commands", type=int, default=20_000)
    parser.add_argument("--store-sync", choices=["full", "normal"], default="full")
    args = parser.parse_args()
    for batch in args.batch or [1, 16, 256]:
        commands = args.commands if batch > 1 else min(args.commands, 2_000)
        print(json.dumps(trio.run(measure, batch, commands, args.store_sync)), flush=True)


if __name__ == "__main__":
    main()
