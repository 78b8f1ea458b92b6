"""Reference peer: raw aioquic on its own asyncio API, one QUIC stream per request.

What it measures
----------------
Request/reply round trips over plain aioquic (``aioquic.asyncio.serve`` /
``aioquic.asyncio.connect`` with ``QuicConnectionProtocol`` subclasses), with
none of trio_quiccmd's machinery: the baseline "what the QUIC stack itself
costs" for the same workload.

* The CONTROLLER is the QUIC server (agents dial out, as in trio_quiccmd). It
  makes a throwaway self-signed certificate (ECDSA P-256, SAN 127.0.0.1 / ::1 /
  localhost) with ``cryptography``, keeps the private key in a private temp dir,
  and publishes only the certificate as ``<cert-dir>/cert.pem`` once it listens.
* The AGENT dials the controller (ALPN ``bench/1``) and VERIFIES the server
  certificate against that file (``--ca-file``); verification is never disabled.
* For each request the SERVER opens a new bidirectional stream, writes the JSON
  request and FIN; the agent reads until FIN, replies with JSON + FIN on the
  same stream. Framing is length-agnostic (a message ends at FIN).
* The agent raises the number of bidirectional streams the server may open from
  aioquic's hard-wired 128 to 4096 (aioquic has no setting for it), so C=256
  does not silently cap at 128 in flight.
* Writes are followed by ``transmit()``, as aioquic's asyncio layer expects; no
  other tuning (default congestion control, datagram size, flow-control windows).
* Only loopback is dialled/served (``--host`` must be a loopback address), but
  note that aioquic's ``connect()`` binds the agent's ephemeral UDP socket to
  ``::`` (it has no local-address parameter); it only ever talks to loopback.

Requests are ``{"id", "type": COMMAND_TYPE, "payload": make_payload(i)}``;
replies ``{"id", "result": make_result(payload)}``. With ``--agents N`` the
controller waits for N handshakes, then spreads requests round-robin.

Run by hand (two shells; the cert dir defaults to $TMPDIR/bench-aioquic-<port>,
derived from the port on both sides, so no extra flags are needed)::

    python benchmarks/peers/aioquic_asyncio.py controller --port 4480 --requests 2000 --concurrency 16
    python benchmarks/peers/aioquic_asyncio.py agent --port 4480

Either may start first: the agent waits (``--connect-timeout``, 30 s) for the
certificate to appear and the handshake to succeed. The agent exits when the
controller closes the connection, on SIGTERM/SIGINT, or after QUIC's idle
timeout if the controller vanishes. The controller prints one JSON line last.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import ipaddress
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import COMMAND_TYPE, Recorder, emit, make_payload, make_result, skip  # noqa: E402

try:
    from aioquic.asyncio import QuicConnectionProtocol, connect, serve
    from aioquic.quic import events
    from aioquic.quic.configuration import QuicConfiguration
except ImportError as exc:  # pragma: no cover - depends on the environment
    QuicConnectionProtocol = object  # type: ignore[assignment,misc]
    _IMPORT_ERROR: ImportError | None = exc
else:
    _IMPORT_ERROR = None

SYSTEM = "aioquic-asyncio"
ALPN = "bench/1"
WARMUP_REQUESTS = 200
#: Bidirectional streams the agent lets the server open at once (aioquic: 128).
AGENT_MAX_STREAMS_BIDI = 4096
REQUEST_TIMEOUT = 10.0
AGENTS_WAIT_TIMEOUT = 30.0


def default_cert_dir(port: int) -> Path:
    return Path(tempfile.gettempdir()) / f"bench-aioquic-{port}"


def require_loopback(host: str) -> None:
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise SystemExit(f"refusing non-loopback address {host!r}")


def make_self_signed(cert_path: Path, key_path: Path) -> None:
    """Write a throwaway self-signed certificate and its key (PEM)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench-controller")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.IPAddress(ipaddress.ip_address("::1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


# --------------------------------------------------------------------------- agent


def handle_request(body: bytes) -> bytes:
    request = json.loads(body)
    reply = {"id": request["id"], "result": make_result(request["payload"])}
    return json.dumps(reply).encode()


class AgentProtocol(QuicConnectionProtocol):
    """Answers every server-opened stream: read until FIN, reply + FIN."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # aioquic hard-wires 128 peer-initiated bidi streams and has no setting;
        # raise it before connect() so the transport parameters carry it.
        limit = self._quic._local_max_streams_bidi
        limit.value = limit.sent = AGENT_MAX_STREAMS_BIDI
        self._buffers: dict[int, bytearray] = {}

    def quic_event_received(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.StreamDataReceived):
            buf = self._buffers.get(event.stream_id)
            if buf is None:
                buf = self._buffers[event.stream_id] = bytearray()
            buf += event.data
            if event.end_stream:
                del self._buffers[event.stream_id]
                try:
                    reply = handle_request(bytes(buf))
                except (ValueError, KeyError, TypeError) as exc:
                    reply = json.dumps({"error": f"bad request: {exc}"}).encode()
                self._quic.send_stream_data(event.stream_id, reply, end_stream=True)
                # datagram_received() calls transmit() once all events are handled.
        elif isinstance(event, events.StreamReset):
            self._buffers.pop(event.stream_id, None)


async def run_agent(args: argparse.Namespace) -> int:
    require_loopback(args.host)
    ca_file = Path(args.ca_file) if args.ca_file else default_cert_dir(args.port) / "cert.pem"
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    deadline = loop.time() + args.connect_timeout
    last_error: BaseException | None = None
    while not stop.is_set() and loop.time() < deadline:
        if not ca_file.exists():
            await asyncio.sleep(0.05)
            continue
        configuration = QuicConfiguration(is_client=True, alpn_protocols=[ALPN])
        configuration.load_verify_locations(cafile=str(ca_file))
        if args.server_name:
            configuration.server_name = args.server_name
        try:
            async with asyncio.timeout(2.0):
                cm = connect(
                    args.host, args.port, configuration=configuration,
                    create_protocol=AgentProtocol,
                )
                protocol = await cm.__aenter__()
        except (OSError, ConnectionError, TimeoutError) as exc:
            # controller not up yet, or a stale certificate from an earlier run
            last_error = exc
            await asyncio.sleep(0.1)
            continue
        try:
            closed = asyncio.ensure_future(protocol.wait_closed())
            stopped = asyncio.ensure_future(stop.wait())
            await asyncio.wait({closed, stopped}, return_when=asyncio.FIRST_COMPLETED)
            for task in (closed, stopped):
                task.cancel()
        finally:
            # Closes the connection if still open (SIGTERM) and waits for it.
            try:
                async with asyncio.timeout(2.0):
                    await cm.__aexit__(None, None, None)
            except TimeoutError:
                pass
        return 0
    if stop.is_set():
        return 0
    print(f"agent {args.id}: could not connect to {args.host}:{args.port} "
          f"(ca {ca_file}): {last_error!r}", file=sys.stderr)
    return 1


# ---------------------------------------------------------------------- controller


class Hub:
    """The connected agents, as the controller's server sees them."""

    def __init__(self, wanted: int) -> None:
        self.agents: list[ControllerProtocol] = []
        self.wanted = wanted
        self.ready = asyncio.Event()

    def joined(self, protocol: ControllerProtocol) -> None:
        self.agents.append(protocol)
        if len(self.agents) >= self.wanted:
            self.ready.set()

    def left(self, protocol: ControllerProtocol) -> None:
        if protocol in self.agents:
            self.agents.remove(protocol)


class ControllerProtocol(QuicConnectionProtocol):
    """Server side of one agent connection: opens a stream per request."""

    hub: Hub  # set on the subclass made per run

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._pending: dict[int, tuple[bytearray, asyncio.Future[bytes]]] = {}

    async def request(self, body: bytes) -> bytes:
        if self._closed.is_set():
            raise ConnectionError("agent connection closed")
        stream_id = self._quic.get_next_available_stream_id()
        future: asyncio.Future[bytes] = self._loop.create_future()
        self._pending[stream_id] = (bytearray(), future)
        self._quic.send_stream_data(stream_id, body, end_stream=True)
        self.transmit()
        try:
            return await future
        finally:
            if self._pending.pop(stream_id, None) is not None and not future.done():
                # cancelled (timeout): abandon the stream
                try:
                    self._quic.stop_stream(stream_id, 0)
                    self.transmit()
                except Exception:
                    pass

    def quic_event_received(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.StreamDataReceived):
            entry = self._pending.get(event.stream_id)
            if entry is None:
                return
            buf, future = entry
            buf += event.data
            if event.end_stream:
                del self._pending[event.stream_id]
                if not future.done():
                    future.set_result(bytes(buf))
        elif isinstance(event, events.StreamReset):
            entry = self._pending.pop(event.stream_id, None)
            if entry is not None and not entry[1].done():
                entry[1].set_exception(ConnectionError("stream reset by agent"))
        elif isinstance(event, events.HandshakeCompleted):
            self.hub.joined(self)
        elif isinstance(event, events.ConnectionTerminated):
            self.hub.left(self)
            for _, future in self._pending.values():
                if not future.done():
                    future.set_exception(ConnectionError("agent connection closed"))
            self._pending.clear()


async def drive(count: int, first: int, concurrency: int, call, recorder: Recorder | None) -> None:
    """Run `count` calls numbered from `first`, `concurrency` at a time."""
    numbers = iter(range(first, first + count))

    async def worker() -> None:
        for i in numbers:
            t0 = time.perf_counter()
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT):
                    ok = await call(i)
            except Exception:  # includes TimeoutError and connection loss
                ok = False
            if recorder is not None:
                if ok:
                    recorder.latencies.append(time.perf_counter() - t0)
                else:
                    recorder.errors += 1

    await asyncio.gather(*(worker() for _ in range(max(1, min(concurrency, count)))))


async def run_controller(args: argparse.Namespace) -> None:
    if _IMPORT_ERROR is not None:
        skip(f"aioquic not importable: {_IMPORT_ERROR}")
    require_loopback(args.host)
    cert_dir = Path(args.cert_dir) if args.cert_dir else default_cert_dir(args.port)
    cert_dir.mkdir(parents=True, exist_ok=True)
    published = cert_dir / "cert.pem"

    hub = Hub(args.agents)
    protocol_class = type("BoundControllerProtocol", (ControllerProtocol,), {"hub": hub})

    with tempfile.TemporaryDirectory(prefix="bench-aioquic-key-") as private:
        cert_path, key_path = Path(private) / "cert.pem", Path(private) / "key.pem"
        make_self_signed(cert_path, key_path)
        configuration = QuicConfiguration(is_client=False, alpn_protocols=[ALPN])
        configuration.load_cert_chain(str(cert_path), str(key_path))
        server = await serve(
            args.host, args.port, configuration=configuration, create_protocol=protocol_class
        )
        try:
            # Publish the certificate only once we listen: agents wait for it.
            staging = cert_dir / f".cert.{os.getpid()}.tmp"
            staging.write_bytes(cert_path.read_bytes())
            os.replace(staging, published)

            try:
                async with asyncio.timeout(args.agents_timeout):
                    await hub.ready.wait()
            except TimeoutError:
                print(f"controller: only {len(hub.agents)}/{args.agents} agents connected "
                      f"within {args.agents_timeout}s", file=sys.stderr)
                raise SystemExit(1)
            agents = list(hub.agents[: args.agents])

            async def call(i: int) -> bool:
                payload = make_payload(i)
                body = json.dumps({"id": i, "type": COMMAND_TYPE, "payload": payload}).encode()
                reply = json.loads(await agents[i % len(agents)].request(body))
                return reply.get("id") == i and reply["result"]["seq"] == payload["seq"]

            await drive(WARMUP_REQUESTS, 0, args.concurrency, call, None)
            recorder = Recorder()
            recorder.start()
            await drive(args.requests, WARMUP_REQUESTS, args.concurrency, call, recorder)
            recorder.stop()

            for agent in agents:
                agent.close()
            await asyncio.sleep(0.05)  # let the CONNECTION_CLOSE frames go out
        finally:
            server.close()
            try:
                published.unlink()
                cert_dir.rmdir()  # only if now empty
            except OSError:
                pass
    emit(recorder.report(
        system=SYSTEM, requests=args.requests, concurrency=args.concurrency,
        agents=args.agents, warmup=WARMUP_REQUESTS,
    ))


# ---------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    roles = parser.add_subparsers(dest="role", required=True)

    agent = roles.add_parser("agent", help="dial the controller and answer requests")
    agent.add_argument("--port", type=int, required=True)
    agent.add_argument("--host", default="127.0.0.1")
    agent.add_argument("--id", type=int, default=0)
    agent.add_argument("--ca-file", default=None,
                       help="certificate to trust (default: $TMPDIR/bench-aioquic-<port>/cert.pem)")
    agent.add_argument("--server-name", default=None,
                       help="name to verify in the certificate (default: --host)")
    agent.add_argument("--connect-timeout", type=float, default=30.0)

    controller = roles.add_parser("controller", help="serve, send requests, report")
    controller.add_argument("--port", type=int, required=True)
    controller.add_argument("--host", default="127.0.0.1")
    controller.add_argument("--requests", type=int, required=True)
    controller.add_argument("--concurrency", type=int, required=True)
    controller.add_argument("--agents", type=int, default=1)
    controller.add_argument("--cert-dir", default=None,
                            help="where to publish cert.pem (default: $TMPDIR/bench-aioquic-<port>)")
    controller.add_argument("--agents-timeout", type=float, default=AGENTS_WAIT_TIMEOUT)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.role == "controller":
        asyncio.run(run_controller(args))
        return 0
    if _IMPORT_ERROR is not None:
        print(f"aioquic not importable: {_IMPORT_ERROR}", file=sys.stderr)
        return 1
    return asyncio.run(run_agent(args))


if __name__ == "__main__":
    sys.exit(main())
