"""The bundled agent (``python -m trio_quiccmd.agent``) with a journal of executions.

::

    python -m tests.journal_agent --journal PATH [agent flags ...]

Runs ``trio_quiccmd.agent.__main__.main`` with the agent's usual flags, but
every command it *executes* (the executor is called: a command answered from
the agent's memory of finished commands, or attached to a running execution,
is not executed again) first appends one line to ``PATH``:
``<command_type> <token>``, where ``token`` is ``payload["token"]``. The file
is opened with ``O_APPEND`` and each line is one ``write``, so lines never
interleave and a line written is in the file even if the process is killed.

The executor does not see command ids, only types and payloads; tests give
every command a unique ``token`` in its payload and map tokens to ids
through the API. The built-in types keep working (``echo`` returns its
payload, ``sleep`` ignores keys other than ``seconds``).
"""

from __future__ import annotations

import os
import sys
from typing import Any, Sequence

from trio_quiccmd.agent import __main__ as agent_cli
from trio_quiccmd.agent.executor import CommandExecutor, builtin_executor


class JournaledExecutor:
    """An executor that notes each execution in an append-only file, then runs it."""

    def __init__(self, path: str, inner: CommandExecutor) -> None:
        self._inner = inner
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    @property
    def command_types(self) -> list[str]:
        return list(getattr(self._inner, "command_types", []))

    async def execute(self, command_type: str, payload: Any) -> Any:
        token = payload.get("token") if isinstance(payload, dict) else None
        os.write(self._fd, f"{command_type} {token}\n".encode())
        return await self._inner.execute(command_type, payload)


def main(argv: Sequence[str]) -> int:
    argv = list(argv)
    if len(argv) < 2 or argv[0] != "--journal":
        print("usage: python -m tests.journal_agent --journal PATH [agent flags ...]", file=sys.stderr)
        return 2
    journal = argv[1]
    real_agent = agent_cli.Agent

    def journaled_agent(client_id: Any, server: Any, executor: Any = None, **options: Any) -> Any:
        # Whatever executor the CLI chose (its built-in types, or none given:
        # the Agent's default), wrapped so that each execution is journaled.
        inner = executor if executor is not None else builtin_executor()
        return real_agent(client_id, server, JournaledExecutor(journal, inner), **options)

    # run_agent builds its Agent through this module global.
    agent_cli.Agent = journaled_agent  # type: ignore[misc,assignment]
    return agent_cli.main(argv[2:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
