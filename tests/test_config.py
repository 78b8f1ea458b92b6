"""Server settings: precedence (flags > QUICCMD_* > TOML > defaults), parsing, and
one-line errors with exit status 2; and the CLI's graceful exit on a signal."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from trio_quiccmd.config import ConfigError, ServerSettings, load_settings, parse_host_port
from trio_quiccmd.server.__main__ import main


def test_defaults():
    settings = load_settings([], {})
    assert settings == ServerSettings()
    assert (settings.http_host, settings.http_port) == ("127.0.0.1", 8080)
    assert (settings.quic_host, settings.quic_port) == ("0.0.0.0", 8474)
    assert settings.data_dir == Path(".quiccmd")
    assert settings.shutdown_grace == 10 and settings.max_payload_bytes == 1 << 20


@pytest.mark.parametrize(
    "argv, env, path",
    [
        ([], {}, Path(".quiccmd/commands.db")),
        (["--data-dir", "/var/lib/quiccmd"], {}, Path("/var/lib/quiccmd/commands.db")),
        (["--store", "memory"], {}, None),
        (["--store", "sqlite:///history/c.db"], {}, Path("history/c.db")),
        ([], {"QUICCMD_STORE": "sqlite:////srv/quiccmd/c.db"}, Path("/srv/quiccmd/c.db")),
        # As in --data-dir ~/q; it made a directory named "~" in the working directory.
        (["--store", "sqlite:///~/q/commands.db"], {}, Path.home() / "q" / "commands.db"),
    ],
)
def test_where_the_store_is(argv, env, path):
    settings = load_settings(argv, env)
    assert settings.store_path == path
    assert settings.store_sync == "full"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("127.0.0.1:8080", ("127.0.0.1", 8080)),
        ("[::1]:8080", ("::1", 8080)),
        ("[::]:0", ("::", 0)),
        ("localhost:65535", ("localhost", 65535)),
        (" 0.0.0.0:8474 ", ("0.0.0.0", 8474)),
    ],
)
def test_host_port(text, expected):
    assert parse_host_port(text) == expected


@pytest.mark.parametrize(
    "text", ["127.0.0.1", "127.0.0.1:70000", ":8080", "::1:8080", "[::1]8080", "[nope]:1", "h:port", "h:-1", "h:٣"]
)
def test_bad_host_port(text):
    with pytest.raises(ValueError):
        parse_host_port(text)


def test_precedence_flags_over_env_over_file_over_defaults(tmp_path):
    config = tmp_path / "server.toml"
    config.write_text(
        'http = "10.0.0.1:1000"\nquic = "[::]:2000"\nshutdown_grace = 3\n'
        "max_payload_bytes = 2048\nidle_timeout = 7.5\n"
    )
    env = {"QUICCMD_HTTP": "10.0.0.2:1001", "QUICCMD_SHUTDOWN_GRACE": "4", "QUICCMD_CONFIG": str(config)}
    settings = load_settings(["--http", "10.0.0.3:1002"], env)
    assert (settings.http_host, settings.http_port) == ("10.0.0.3", 1002)  # flag
    assert settings.shutdown_grace == 4  # environment
    assert (settings.quic_host, settings.quic_port) == ("::", 2000)  # file
    assert settings.max_payload_bytes == 2048 and settings.idle_timeout == 7.5  # file
    assert settings.default_timeout == 30  # default


def test_limits_defaults_precedence_and_mapping(tmp_path):
    from trio_quiccmd.server.service import manager_settings

    defaults = load_settings([], {})
    assert defaults.max_queued_per_agent == 10_000
    assert defaults.max_unfinished_commands == 1_000_000
    assert defaults.max_agents == 100_000
    assert defaults.max_hello_rate == 200.0
    assert defaults.gc_freeze_agents == 1000
    assert defaults.max_handshakes == 64
    assert load_settings([], {"QUICCMD_MAX_HANDSHAKES": "8"}).max_handshakes == 8
    assert load_settings(["--gc-freeze-agents", "0"], {}).gc_freeze_agents == 0  # never
    config = tmp_path / "limits.toml"
    config.write_text(
        "[server]\nmax_queued_per_agent = 5\nmax_unfinished_commands = 6\n"
        "max_agents = 7\nmax_hello_rate = 8\n"
    )
    settings = load_settings(
        ["--config", str(config), "--max-agents", "70"],
        {"QUICCMD_MAX_HELLO_RATE": "0.5", "QUICCMD_MAX_AGENTS": "700"},
    )
    assert (settings.max_queued_per_agent, settings.max_unfinished_commands) == (5, 6)  # file
    assert settings.max_agents == 70  # flag over environment
    assert settings.max_hello_rate == 0.5  # environment over file
    mapped = manager_settings(settings)
    assert (mapped.max_queued_per_agent, mapped.max_unfinished_commands) == (5, 6)
    assert (mapped.max_agents, mapped.max_hello_rate) == (70, 0.5)


def test_server_table_in_toml(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('[server]\ndata_dir = "/srv/quiccmd"\nlog_level = "debug"\n')
    settings = load_settings(["--config", str(config)], {})
    assert settings.data_dir == Path("/srv/quiccmd") and settings.log_level == "DEBUG"


@pytest.mark.parametrize(
    "argv, env, toml, fragment",
    [
        (["--http", "127.0.0.1:70000"], {}, None, "option --http: port 70000"),
        (["--default-timeout", "-5"], {}, None, "option --default-timeout: default_timeout must be greater than 0"),
        (["--max-timeout", "soon"], {}, None, "option --max-timeout: expected a number"),
        (["--shutdown-grace", "nan"], {}, None, "expected a finite number"),
        (["--max-payload-bytes", "1.5"], {}, None, "expected an integer"),
        (["--log-level", "chatty"], {}, None, "not one of DEBUG"),
        (["--unknown-flag"], {}, None, "unrecognized arguments"),
        ([], {"QUICCMD_QUIC": "0.0.0.0"}, None, "environment variable QUICCMD_QUIC"),
        ([], {"QUICCMD_MAX_HISTORY": "0"}, None, "environment variable QUICCMD_MAX_HISTORY: max_history"),
        ([], {}, "timout = 5\n", "unknown setting 'timout'"),
        ([], {}, "shutdown_grace = true\n", "expected a number, got bool"),
        ([], {}, "http = 8080\n", "expected HOST:PORT as a string"),
        ([], {}, "this is not toml", "invalid TOML"),
        (["--default-timeout", "100", "--max-timeout", "50"], {}, None, "must not exceed max_timeout"),
        (["--cert-file", "/no/such/cert.pem", "--key-file", "/no/such/key.pem"], {}, None, "not a readable file"),
        (["--max-queued-per-agent", "0"], {}, None, "option --max-queued-per-agent: max_queued_per_agent must be greater than 0"),
        (["--max-queued-per-agent", "many"], {}, None, "expected an integer"),
        ([], {"QUICCMD_MAX_UNFINISHED_COMMANDS": "-1"}, None, "environment variable QUICCMD_MAX_UNFINISHED_COMMANDS: max_unfinished_commands must be greater than 0"),
        ([], {}, "max_unfinished_commands = 1e12\n", "max_unfinished_commands must be at most"),
        ([], {}, "max_agents = 0\n", "max_agents must be greater than 0"),
        (["--max-agents", "2.5"], {}, None, "expected an integer"),
        (["--max-hello-rate", "0"], {}, None, "option --max-hello-rate: max_hello_rate must be greater than 0"),
        ([], {"QUICCMD_MAX_HELLO_RATE": "inf"}, None, "expected a finite number"),
        ([], {}, "max_hello_rate = true\n", "expected a number, got bool"),
        (["--store", "postgres://db"], {}, None, "option --store: store must be 'memory', 'sqlite' or 'sqlite:///PATH'"),
        (["--store", "sqlite:///"], {}, None, "store must be"),
        ([], {"QUICCMD_STORE_SYNC": "always"}, None, "environment variable QUICCMD_STORE_SYNC: store_sync must be 'full' or 'normal'"),
        ([], {}, "store = 1\n", "expected a non-empty string"),
        (["--gc-freeze-agents", "-1"], {}, None, "option --gc-freeze-agents: gc_freeze_agents must be 0 or more"),
        # Connections would drop between an agent's keepalives.
        (["--idle-timeout", "0.001"], {}, None, "option --idle-timeout: idle_timeout must be at least 1, got 0.001"),
        ([], {"QUICCMD_IDLE_TIMEOUT": "0"}, None, "QUICCMD_IDLE_TIMEOUT: idle_timeout must be at least 1"),
        # Results purged before a client polling for them could read them.
        ([], {}, "history_retention = 1\n", "history_retention must be at least 60, got 1.0"),
        (["--max-handshakes", "0"], {}, None, "option --max-handshakes: max_handshakes must be greater than 0"),
        ([], {}, "max_handshakes = 20000\n", "max_handshakes must be at most"),
        ([], {"QUICCMD_GC_FREEZE_AGENTS": "lots"}, None, "expected an integer"),
    ],
)
def test_bad_settings_are_one_line_errors(tmp_path, argv, env, toml, fragment):
    if toml is not None:
        path = tmp_path / "c.toml"
        path.write_text(toml)
        argv = [*argv, "--config", str(path)]
    with pytest.raises(ConfigError) as info:
        load_settings(argv, env)
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message


def test_a_config_file_that_is_not_utf8_is_a_one_line_error(tmp_path):
    path = tmp_path / "c.toml"
    path.write_bytes(b'http = "127.0.0.1:8080"\n# caf\xe9\n')
    with pytest.raises(ConfigError) as info:
        load_settings(["--config", str(path)], {})
    assert str(info.value) == f"config file {str(path)!r}: not UTF-8 text (invalid continuation byte at byte 29)"


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file"):
        load_settings(["--config", str(tmp_path / "absent.toml")], {})


def test_cli_exits_2_with_one_line_on_a_bad_setting(capsys):
    assert main(["--http", "127.0.0.1:70000"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "error: option --http: port 70000" in err
    assert "Traceback" not in err


async def test_cli_serves_then_exits_0_on_sigterm(tmp_path):
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "trio_quiccmd.server", "--http", "127.0.0.1:0",
                 "--quic", "127.0.0.1:0", "--data-dir", str(tmp_path / "data")],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            stderr = bytearray()

            async def drain_stderr() -> None:
                async for chunk in process.stderr:
                    stderr.extend(chunk)

            nursery.start_soon(drain_stderr)
            line = bytearray()
            while not line.endswith(b"\n"):
                chunk = await process.stdout.receive_some(1024)
                assert chunk, stderr.decode()
                line += chunk
            assert line.startswith(b"quiccmd server listening http=http://127.0.0.1:")
            process.send_signal(signal.SIGTERM)
            assert await process.wait() == 0, stderr.decode()
    log = stderr.decode()
    assert "fingerprint=sha256:" in log
    assert "Signal received signal=SIGTERM action=graceful_shutdown" in log
    assert "Server stopped" in log
    assert (tmp_path / "data" / "server-cert.pem").is_file()
