"""Server authentication with a real certificate, as docs/security.md tells an
operator to set it up: a private CA, a server certificate it issued
(``--cert-file`` / ``--key-file``), agents that trust the CA and check the
name. The whole service runs (``serve``), agents are real, over loopback QUIC.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import ssl
import stat
from pathlib import Path

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from trio_quiccmd import Agent
from trio_quiccmd.config import ServerSettings
from trio_quiccmd.quic.connection import ConnectionFailed
from trio_quiccmd.quic.tls import ensure_dev_certificate, fingerprint_of_pem_file
from trio_quiccmd.server.service import StartupError, serve
from trio_quiccmd.tokens import issue_agent_token

TIMEOUT = 20


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_ca_and_server_certificate(directory: Path) -> tuple[Path, Path, Path]:
    """(ca.pem, server-cert.pem, server-key.pem): a CA, and a certificate it
    issued for cmd.example.test and 127.0.0.1 (what the openssl recipe makes)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("quiccmd test CA")).issuer_name(_name("quiccmd test CA"))
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = (
        x509.CertificateBuilder()
        .subject_name(_name("cmd.example.test")).issuer_name(ca.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("cmd.example.test"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    paths = directory / "ca.pem", directory / "server-cert.pem", directory / "server-key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return paths


@pytest.fixture
async def real_cert_server(tmp_path: Path, caplog):
    caplog.set_level(logging.INFO)
    ca, cert, key = make_ca_and_server_certificate(tmp_path / "pki")
    settings = ServerSettings(
        http_host="127.0.0.1", http_port=0, quic_host="127.0.0.1", quic_port=0,
        data_dir=tmp_path / "data", cert_file=cert, key_file=key, shutdown_grace=0.0,
    )
    token = issue_agent_token(settings.data_dir, "web-07")
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        addresses = await nursery.start(
            lambda task_status: serve(settings, shutdown_event=shutdown, task_status=task_status)
        )
        yield addresses, ca, cert, token
        shutdown.set()


async def connects(address: tuple[str, int], **options) -> None:
    """An agent gets a session (and is then stopped)."""
    agent = Agent("web-07", address, **options)
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.run)
        agent.stop()


async def refused(address: tuple[str, int], **options) -> None:
    """One connection attempt fails in the TLS handshake: no session, no HELLO sent."""
    agent = Agent("web-07", address, handshake_timeout=5.0, **options)
    async with trio.open_nursery() as nursery:
        with pytest.raises(ConnectionFailed):
            await agent._serve_one_session(nursery, trio.TASK_STATUS_IGNORED)
    assert agent.sessions_established == 0


async def test_agents_trust_the_issuing_ca_and_check_the_name(real_cert_server, caplog):
    addresses, ca, cert, token = real_cert_server
    address = ("127.0.0.1", addresses.quic[1])
    with trio.fail_after(TIMEOUT):
        # The CA and the certificate's DNS name (not in DNS here: --server-name).
        await connects(address, ca_file=ca, server_name="cmd.example.test", token=token)
        # The CA and the address itself (an IP SAN).
        await connects(address, ca_file=ca, token=token)
        # A pin of the real certificate works too (the server logs it).
        await connects(address, server_fingerprint=fingerprint_of_pem_file(cert), token=token)
        # A name the certificate does not carry is refused, as is a CA that did not issue it.
        await refused(address, ca_file=ca, server_name="other.example.test", token=token)
        await refused(address, ca_file=cert, server_name="cmd.example.test", token=token)
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith(f"Using TLS certificate path={cert} fingerprint=sha256:") for m in messages)


async def test_a_key_that_does_not_belong_to_the_certificate_stops_the_start(tmp_path: Path):
    # Found in review: the server started, and every agent's handshake then
    # failed as "no answer", with nothing in the server's log.
    _, cert, _ = make_ca_and_server_certificate(tmp_path / "one")
    _, _, other_key = make_ca_and_server_certificate(tmp_path / "two")
    settings = ServerSettings(
        http_host="127.0.0.1", http_port=0, quic_host="127.0.0.1", quic_port=0,
        data_dir=tmp_path / "data", cert_file=cert, key_file=other_key,
    )
    with trio.fail_after(TIMEOUT), pytest.raises(StartupError) as info:
        await serve(settings)
    assert str(info.value) == (
        f"cannot load the TLS certificate {cert} / key {other_key}: "
        "the private key does not belong to the certificate"
    )


# -- the development certificate's files -------------------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_development_certificate_makes_a_data_dir_only_its_owner_reads(tmp_path: Path):
    ensure_dev_certificate(tmp_path / "new")
    assert _mode(tmp_path / "new") == 0o700
    (tmp_path / "old").mkdir(mode=0o750)
    (tmp_path / "old").chmod(0o750)
    ensure_dev_certificate(tmp_path / "old")
    assert _mode(tmp_path / "old") == 0o750  # an operator's choice is kept


def test_the_development_key_is_written_0600_and_never_through_a_link(tmp_path: Path):
    data = tmp_path / "data"
    cert, key, _ = ensure_dev_certificate(data)
    assert _mode(key) == 0o600

    # A key left with a loose mode (restored from a backup), its certificate gone:
    # the new key is 0600, not whatever the old file was.
    cert.unlink()
    key.chmod(0o644)
    _, _, created = ensure_dev_certificate(data)
    assert created and _mode(key) == 0o600

    # A key that is a link to a file elsewhere: the link is replaced, the file untouched.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text("not yours\n")
    elsewhere.chmod(0o644)
    cert.unlink()
    key.unlink()
    key.symlink_to(elsewhere)
    ensure_dev_certificate(data)
    assert (elsewhere.read_text(), _mode(elsewhere)) == ("not yours\n", 0o644)
    assert not key.is_symlink() and _mode(key) == 0o600
    ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)  # a pair
    assert sorted(p.name for p in data.iterdir()) == ["server-cert.pem", "server-key.pem"]


def _first_start(data: Path, barrier, results) -> None:  # type: ignore[no-untyped-def]
    barrier.wait()
    cert, _, created = ensure_dev_certificate(data)
    results.put((created, fingerprint_of_pem_file(cert)))


def test_servers_starting_at_once_on_a_new_data_dir_share_one_matching_pair(tmp_path: Path):
    # Four servers (processes) started together on an empty data dir: one
    # makes the certificate, the others use it, and the key on disk is its
    # key. Unlocked, each wrote a pair of its own over the others'.
    import multiprocessing

    context = multiprocessing.get_context("fork")
    data = tmp_path / "data"
    barrier, results = context.Barrier(4), context.Queue()
    starts = [context.Process(target=_first_start, args=(data, barrier, results)) for _ in range(4)]
    for process in starts:
        process.start()
    outcomes = [results.get(timeout=TIMEOUT) for _ in starts]
    for process in starts:
        process.join(TIMEOUT)
        assert process.exitcode == 0
    assert sorted(created for created, _ in outcomes) == [False, False, False, True]
    assert {fp for _, fp in outcomes} == {fingerprint_of_pem_file(data / "server-cert.pem")}
    ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
        data / "server-cert.pem", data / "server-key.pem"
    )
    assert sorted(p.name for p in data.iterdir()) == ["server-cert.pem", "server-key.pem"]
