"""MODBUS/TCP Security listeners against real TLS peers: pymodbus's TLS client
and `openssl s_client`, with certificates made by the openssl command line,
including the Modbus role extension."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import ssl
import subprocess
import threading
from pathlib import Path

import pytest
from pymodbus.client import ModbusTlsClient
from pymodbus.server import ModbusTlsServer
from pymodbus.simulator import DataType, SimData, SimDevice

from harness import (
    STOP_TIMEOUT, acme_rules, device, free_port, listener, modbus_client, send_hangup,
    vendor_rule_file, wait_for, write_config,
)

ROLE_OID = "1.3.6.1.4.1.50316.802.1"
READ_ALLOW = {
    "device": "plc",
    "functions": ["read_holding_registers"],
    "addresses": ["0-999"],
    "when": {"role": ["Operator"]},
}
CA_CONFIG = """\
[ca]
default_ca = vendors

[vendors]
dir = {dir}
database = $dir/index.txt
serial = $dir/serial
crlnumber = $dir/crlnumber
new_certs_dir = $dir/issued
default_md = sha256
default_days = 2
default_crl_days = 1
policy = any
copy_extensions = copy
unique_subject = no

[any]
commonName = supplied
"""
LEAF_EXTENSIONS = """\
basicConstraints = CA:FALSE
keyUsage = digitalSignature
extendedKeyUsage = serverAuth, clientAuth
"""


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


class Pki:
    """A vendors CA run with `openssl ca`, so it can revoke certificates and
    issue CRLs, plus a second, unrelated CA."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir()
        (folder / "issued").mkdir()
        (folder / "index.txt").write_text("")
        (folder / "serial").write_text("1000\n")
        (folder / "crlnumber").write_text("1000\n")
        (folder / "ca.cnf").write_text(CA_CONFIG.format(dir=folder))
        (folder / "leaf.ext").write_text(LEAF_EXTENSIONS)
        self.ca = folder / "ca.crt"
        self.crl = folder / "vendors.crl"
        self._self_signed("ca", "/CN=sluice vendors CA")
        self.issue("gateway", "/CN=127.0.0.1", san="IP:127.0.0.1,DNS:localhost")
        self.update_crl()

    def _self_signed(self, name: str, subject: str) -> None:
        openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "2", "-subj", subject,
                cwd=self.folder)

    def _request(self, name: str, subject: str, role: str | None, san: str | None) -> None:
        args = ["req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject]
        if role is not None:
            args += ["-addext", f"{ROLE_OID}=ASN1:UTF8String:{role}"]
        if san is not None:
            args += ["-addext", f"subjectAltName={san}"]
        openssl(*args, cwd=self.folder)

    def issue(self, name: str, subject: str, role: str | None = None, san: str | None = None,
              dates: tuple[str, str] | None = None) -> Path:
        """Issue a certificate from the vendors CA; `dates` gives its
        validity as openssl's YYYYMMDDHHMMSSZ start and end."""
        self._request(name, subject, role, san)
        args = ["ca", "-batch", "-notext", "-config", "ca.cnf", "-cert", "ca.crt", "-keyfile", "ca.key",
                "-in", f"{name}.csr", "-out", f"{name}.crt", "-extfile", "leaf.ext"]
        if dates is not None:
            args += ["-startdate", dates[0], "-enddate", dates[1]]
        openssl(*args, cwd=self.folder)
        return self.folder / f"{name}.crt"

    def issue_from_other_ca(self, name: str, subject: str) -> Path:
        self._self_signed("other-ca", "/CN=unrelated CA")
        self._request(name, subject, "Operator", None)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "other-ca.crt", "-CAkey", "other-ca.key",
                "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile", "leaf.ext",
                cwd=self.folder)
        return self.folder / f"{name}.crt"

    def revoke(self, name: str) -> None:
        openssl("ca", "-config", "ca.cnf", "-cert", "ca.crt", "-keyfile", "ca.key",
                "-revoke", f"{name}.crt", cwd=self.folder)
        self.update_crl()

    def update_crl(self) -> None:
        openssl("ca", "-gencrl", "-config", "ca.cnf", "-cert", "ca.crt", "-keyfile", "ca.key",
                "-out", str(self.crl), cwd=self.folder)

    def path(self, name: str, suffix: str) -> Path:
        return self.folder / f"{name}.{suffix}"


def tls_listener(pki: Pki) -> dict:
    return {
        "name": "vendors",
        "protocol": "modbus-tls",
        "bind": "127.0.0.1:0",
        "device": "plc",
        "tls": {
            "cert": str(pki.path("gateway", "crt")),
            "key": str(pki.path("gateway", "key")),
            "client_ca": str(pki.ca),
            "crl": [str(pki.crl)],
        },
    }


def acme_certificate_rules() -> dict[str, str]:
    return {"acme.toml": vendor_rule_file({"name": "acme", "certificate_cn": ["acme-*"]}, [READ_ALLOW])}


@pytest.fixture
def pki(tmp_path) -> Pki:
    return Pki(tmp_path / "pki")


@pytest.fixture
def tls_gateway(start_gateway, plc_sim, pki):
    return start_gateway([tls_listener(pki)], [device("plc", plc_sim.address)], acme_certificate_rules())


def tls_client(pki: Pki, name: str, port: int) -> ModbusTlsClient:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    # pymodbus wraps the socket without a server name, so only the chain to
    # the CA is verified, not the name.
    context.check_hostname = False
    context.load_verify_locations(str(pki.ca))
    context.load_cert_chain(str(pki.path(name, "crt")), str(pki.path(name, "key")))
    client = ModbusTlsClient("127.0.0.1", port=port, sslctx=context, timeout=5, retries=0)
    if not client.connect():
        raise AssertionError(f"pymodbus could not connect over TLS to 127.0.0.1:{port}")
    return client


def s_client(port: int, *args: str) -> subprocess.CompletedProcess:
    """Run `openssl s_client` once with an empty standard input, so it
    finishes the handshake, sends close_notify and exits."""
    return subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost", *args],
        input=b"", capture_output=True, timeout=30,
    )


def rejection(gateway, reason: str) -> tuple[dict, dict]:
    """Wait for the session `reject` event with `reason` and the anomaly of
    the same connection; return both."""
    (event,) = gateway.wait_for_events(
        lambda e: e["event_type"] == "session" and e.get("action") == "reject" and e.get("reason") == reason,
        what=f"reject events with reason {reason!r}",
    )
    (anomaly,) = gateway.wait_for_events(
        lambda e: e["event_type"] == "anomaly" and e.get("src_port") == event["src_port"],
        what="the anomaly of the rejected connection",
    )
    return event, anomaly


def test_operator_reads_exact_registers_over_tls(tls_gateway, pki, plc_sim):
    pki.issue("operator", "/CN=acme-operator", role="Operator")
    client = tls_client(pki, "operator", tls_gateway.port)
    try:
        result = client.read_holding_registers(10, count=5, device_id=1)
    finally:
        client.close()

    assert not result.isError(), result
    assert result.registers == [10, 11, 12, 13, 14]
    assert plc_sim.wait_for_requests(1) == [{"unit": 1, "function": 3, "address": 10, "quantity": 5}]
    (opened,) = tls_gateway.wait_for_events(
        lambda e: e["event_type"] == "session" and e.get("action") == "open", what="session open events"
    )
    assert opened["vendor"] == "acme"
    assert opened["tls"]["subject_cn"] == "acme-operator"
    assert opened["tls"]["role"] == "Operator"
    assert opened["tls"]["sha256"] == hashlib.sha256(
        ssl.PEM_cert_to_DER_cert(pki.path("operator", "crt").read_text())
    ).hexdigest()
    # pymodbus closes the socket without a TLS close_notify.
    (closed,) = tls_gateway.wait_for_events(
        lambda e: e["event_type"] == "session" and e.get("action") == "close", what="session close events"
    )
    assert closed["reason"] == "client closed the connection"


def test_role_not_allowed_gets_exception_01(tls_gateway, pki, plc_sim):
    pki.issue("viewer", "/CN=acme-viewer", role="Viewer")
    client = tls_client(pki, "viewer", tls_gateway.port)
    try:
        result = client.read_holding_registers(10, count=5, device_id=1)
    finally:
        client.close()

    assert result.isError()
    assert result.exception_code == 1
    (decision,) = tls_gateway.wait_for_events(
        lambda e: e["event_type"] == "decision", what="decision events"
    )
    assert decision["decision"] == "deny"
    assert decision["reason"] == "certificate role not in the rule's roles"
    assert decision["modbus"]["exception"] == 1
    assert plc_sim.requests() == []


def test_client_without_certificate_is_rejected(tls_gateway, pki):
    s_client(tls_gateway.port, "-CAfile", str(pki.ca))
    event, anomaly = rejection(tls_gateway, "no client certificate")
    assert event["listener"] == "vendors"
    assert anomaly["anomaly"]["kind"] == "tls_handshake_failed"


def test_tls_1_1_is_rejected(tls_gateway, pki):
    # OpenSSL 3 only sends a TLS 1.1 hello at security level 0.
    s_client(tls_gateway.port, "-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0", "-CAfile", str(pki.ca))
    event, anomaly = rejection(tls_gateway, "protocol version too old")
    assert anomaly["anomaly"]["kind"] == "tls_handshake_failed"


def test_certificate_of_other_ca_is_rejected(tls_gateway, pki):
    pki.issue_from_other_ca("stranger", "/CN=acme-stranger")
    s_client(tls_gateway.port, "-CAfile", str(pki.ca), "-cert", str(pki.path("stranger", "crt")),
             "-key", str(pki.path("stranger", "key")))
    event, anomaly = rejection(tls_gateway, "unknown CA")
    assert anomaly["anomaly"]["kind"] == "unknown_certificate"


def test_expired_certificate_is_rejected(tls_gateway, pki):
    pki.issue("expired", "/CN=acme-expired", role="Operator", dates=("20200101000000Z", "20200102000000Z"))
    s_client(tls_gateway.port, "-CAfile", str(pki.ca), "-cert", str(pki.path("expired", "crt")),
             "-key", str(pki.path("expired", "key")))
    event, anomaly = rejection(tls_gateway, "certificate expired")
    assert anomaly["anomaly"]["kind"] == "tls_handshake_failed"


def test_revoked_certificate_is_rejected(start_gateway, plc_sim, pki):
    pki.issue("revoked", "/CN=acme-revoked", role="Operator")
    pki.revoke("revoked")
    gateway = start_gateway([tls_listener(pki)], [device("plc", plc_sim.address)], acme_certificate_rules())
    s_client(gateway.port, "-CAfile", str(pki.ca), "-cert", str(pki.path("revoked", "crt")),
             "-key", str(pki.path("revoked", "key")))
    event, anomaly = rejection(gateway, "certificate revoked")
    assert anomaly["anomaly"]["kind"] == "certificate_revoked"


def test_certificate_matching_no_vendor_is_rejected(tls_gateway, pki):
    pki.issue("other", "/CN=beta-laptop", role="Operator")
    s_client(tls_gateway.port, "-CAfile", str(pki.ca), "-cert", str(pki.path("other", "crt")),
             "-key", str(pki.path("other", "key")))
    event, anomaly = rejection(tls_gateway, "no vendor matches certificate")
    assert event["tls"]["subject_cn"] == "beta-laptop"
    assert anomaly["anomaly"]["kind"] == "unknown_client"


def server_certificate_sha256(port: int, pki: Pki, name: str) -> str:
    """Connect with the certificate `name` and return the SHA-256 of the
    certificate the gateway presented."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(str(pki.ca))
    context.load_cert_chain(str(pki.path(name, "crt")), str(pki.path(name, "key")))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            return hashlib.sha256(tls.getpeercert(binary_form=True)).hexdigest()


def pem_sha256(path: Path) -> str:
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(path.read_text())).hexdigest()


def test_reload_replaces_certificate_and_crl_keeping_sessions(tls_gateway, pki, plc_sim):
    pki.issue("operator", "/CN=acme-operator", role="Operator")
    pki.issue("engineer", "/CN=acme-engineer", role="Operator")
    old_server = pem_sha256(pki.path("gateway", "crt"))
    assert server_certificate_sha256(tls_gateway.port, pki, "engineer") == old_server

    client = tls_client(pki, "operator", tls_gateway.port)
    try:
        before = client.read_holding_registers(1, count=2, device_id=1)
        assert before.registers == [1, 2]

        pki.issue("gateway", "/CN=127.0.0.1", san="IP:127.0.0.1,DNS:localhost")
        pki.revoke("operator")
        send_hangup(tls_gateway)
        (reload,) = tls_gateway.wait_for_events(
            lambda e: e["event_type"] == "config" and e.get("action") == "reload", what="reload events"
        )
        assert reload["detail"]["closed_sessions"] == []

        after = client.read_holding_registers(3, count=2, device_id=1)
        assert not after.isError(), after
        assert after.registers == [3, 4]
    finally:
        client.close()

    new_server = pem_sha256(pki.path("gateway", "crt"))
    assert new_server != old_server
    assert server_certificate_sha256(tls_gateway.port, pki, "engineer") == new_server

    s_client(tls_gateway.port, "-CAfile", str(pki.ca), "-cert", str(pki.path("operator", "crt")),
             "-key", str(pki.path("operator", "key")))
    event, anomaly = rejection(tls_gateway, "certificate revoked")
    assert anomaly["anomaly"]["kind"] == "certificate_revoked"


def test_check_reports_key_of_another_certificate(sluice_bin, tmp_path, pki):
    pki.issue("other", "/CN=other")
    listener_fields = tls_listener(pki)
    listener_fields["tls"]["key"] = str(pki.path("other", "key"))
    config = write_config(tmp_path, [listener_fields], [device("plc", "127.0.0.1:1502")],
                          acme_certificate_rules())
    checked = subprocess.run([sluice_bin, "check", "--config", str(config)],
                             capture_output=True, text=True, timeout=30)

    assert checked.returncode == 1
    lines = config.read_text().splitlines()
    line = next(number for number, text in enumerate(lines, 1) if text.startswith("tls = "))
    # The position is that of the key's string value, its opening quote.
    column = lines[line - 1].index('key = "') + len("key = ") + 1
    assert checked.stdout.splitlines() == [
        f"{config}:{line}:{column}: listener[1].tls.key: the private key does not match the "
        f"certificate; give the private key of {pki.path('gateway', 'crt')}"
    ]


def test_check_explains_role(sluice_bin, tmp_path, pki):
    config = write_config(tmp_path, [tls_listener(pki)], [device("plc", "127.0.0.1:1502")],
                          acme_certificate_rules())
    # The vendor is identified by certificate alone, so the query needs no
    # source address.
    query = "vendor=acme device=plc function=read_holding_registers address=0"

    def explain(role: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sluice_bin, "check", "--config", str(config), "--explain", f"{query} role={role}"],
            capture_output=True, text=True, timeout=30,
        )

    allowed = explain("Operator")
    denied = explain("Viewer")

    assert allowed.stdout.splitlines()[0] == "allow acme.toml#1"
    assert denied.stdout.splitlines()[0] == "deny (exception 01): certificate role not in the rule's roles"
    assert "note:" not in allowed.stdout


class PymodbusTlsPlc:
    """pymodbus's MODBUS/TCP Security server on loopback, in its own thread:
    unit 1 with holding register n = 1000 + n, and a client certificate of
    the vendors CA required."""

    def __init__(self, pki: Pki):
        self.port = free_port()
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(pki.path("plc", "crt")), str(pki.path("plc", "key")))
        context.load_verify_locations(str(pki.ca))
        context.verify_mode = ssl.CERT_REQUIRED
        self._context = context
        self._loop = asyncio.new_event_loop()
        self._server: ModbusTlsServer | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        wait_for(self._accepts, what=f"pymodbus TLS server on 127.0.0.1:{self.port}")

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        registers = SimData(address=0, values=[1000 + n for n in range(100)], datatype=DataType.REGISTERS)
        self._server = ModbusTlsServer(
            SimDevice(1, simdata=[registers]), address=("127.0.0.1", self.port), sslctx=self._context
        )
        await self._server.serve_forever()

    def _accepts(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return True
        except OSError:
            return False

    def stop(self) -> None:
        if self._server is not None:
            asyncio.run_coroutine_threadsafe(self._server.shutdown(), self._loop).result(STOP_TIMEOUT)
        self._thread.join(timeout=STOP_TIMEOUT)


def test_device_over_tls_reads_pymodbus_server(start_gateway, pki):
    pki.issue("plc", "/CN=plc", san="IP:127.0.0.1")
    pki.issue("sluice", "/CN=sluice")
    plc = PymodbusTlsPlc(pki)
    try:
        tls = {
            "ca": str(pki.ca),
            "cert": str(pki.path("sluice", "crt")),
            "key": str(pki.path("sluice", "key")),
            "server_name": "127.0.0.1",
        }
        allow = {"device": "plc", "functions": ["read_holding_registers"], "addresses": ["0-99"]}
        gateway = start_gateway(
            [listener(device="plc")], [device("plc", f"127.0.0.1:{plc.port}", tls=tls)], acme_rules(allow)
        )
        client = modbus_client(gateway.port)
        try:
            result = client.read_holding_registers(10, count=3, device_id=1)
        finally:
            client.close()
    finally:
        plc.stop()

    assert not result.isError(), result
    assert result.registers == [1010, 1011, 1012]


def test_silent_clients_hit_timeout_and_source_limit(start_gateway, plc_sim, pki):
    fields = tls_listener(pki)
    fields["tls"]["handshake_timeout_ms"] = 300
    fields["tls"]["max_handshakes_per_source"] = 1
    gateway = start_gateway([fields], [device("plc", plc_sim.address)], acme_certificate_rules())

    # Connections are accepted in the order they were made, so the first one
    # has taken the source's only handshake slot when the second arrives.
    first = socket.create_connection(("127.0.0.1", gateway.port), timeout=10)
    second = socket.create_connection(("127.0.0.1", gateway.port), timeout=10)
    first_port, second_port = first.getsockname()[1], second.getsockname()[1]
    try:
        limited, limited_anomaly = rejection(gateway, "handshake limit of 1 per source reached")
        timed_out, timed_out_anomaly = rejection(gateway, "handshake timeout after 300 ms")
    finally:
        first.close()
        second.close()

    assert limited["src_port"] == second_port
    assert timed_out["src_port"] == first_port
    assert limited_anomaly["anomaly"]["kind"] == "tls_handshake_failed"
    assert timed_out_anomaly["anomaly"]["kind"] == "tls_handshake_failed"


def test_drain_does_not_wait_for_handshakes(start_gateway, plc_sim, pki):
    fields = tls_listener(pki)
    fields["tls"]["handshake_timeout_ms"] = 120000
    fields["tls"]["max_handshakes_per_source"] = 1
    gateway = start_gateway([fields], [device("plc", plc_sim.address)], acme_certificate_rules())
    silent = socket.create_connection(("127.0.0.1", gateway.port), timeout=10)
    probe = socket.create_connection(("127.0.0.1", gateway.port), timeout=10)
    try:
        # The probe is rejected only while the silent connection has the
        # source's handshake slot, so its handshake task is running.
        rejection(gateway, "handshake limit of 1 per source reached")
        gateway.process.popen.terminate()
        # Far below the handshake timeout of 120 s and the drain deadline.
        assert gateway.process.popen.wait(timeout=8) == 0
    finally:
        silent.close()
        probe.close()
