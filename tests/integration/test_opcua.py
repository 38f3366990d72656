"""OPC UA termination with real peers: an asyncua server plays the
plant's line controller (opcua_plant.py), an asyncua client is the vendor,
and sluice sits between them with a SignAndEncrypt Basic256Sha256 endpoint.
Writes depend on an operational state that sluice polls from the simulated
Modbus PLC."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from asyncua import Client, ua
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from asyncua.crypto.security_policies import (
    SecurityPolicyAes128Sha256RsaOaep,
    SecurityPolicyAes256Sha256RsaPss,
    SecurityPolicyBasic256Sha256,
)

import harness
from harness import modbus_client, vendor_rule_file, wait_for

PLANT_NAMESPACE = "urn:plant:line1"
SLUICE_URI = "urn:sluice:test-gw"
VENDOR_URI = "urn:acme:engineering-laptop"
PASSWORD = "correct horse battery staple"

# A state change on the PLC must reach the policy within this time; the
# state is polled every 100 ms.
STATE_TIMEOUT = 5.0
# Every OPC UA request of a test must complete within this time.
REQUEST_TIMEOUT = 10.0


def make_rsa_certificate(folder: Path, name: str, uri: str) -> tuple[Path, Path]:
    """Create a self-signed RSA 2048 application instance certificate for
    `uri` with the openssl command line tool; return (certificate, key)."""
    certificate = folder / f"{name}.pem"
    key = folder / f"{name}-key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256",
         "-keyout", str(key), "-out", str(certificate), "-days", "2", "-subj", f"/CN={name}",
         "-addext", f"subjectAltName=URI:{uri},DNS:localhost,IP:127.0.0.1",
         "-addext", "keyUsage=critical,digitalSignature,nonRepudiation,keyEncipherment,dataEncipherment,keyCertSign",
         "-addext", "extendedKeyUsage=serverAuth,clientAuth",
         "-addext", "basicConstraints=critical,CA:FALSE"],
        check=True, capture_output=True,
    )
    return certificate, key


def key_usage(*, certificate_authority: bool) -> x509.KeyUsage:
    """The key usage of a CA certificate, or of an application instance
    certificate."""
    application = not certificate_authority
    return x509.KeyUsage(
        digital_signature=application, content_commitment=application, key_encipherment=application,
        data_encipherment=application, key_agreement=False, key_cert_sign=certificate_authority,
        crl_sign=certificate_authority, encipher_only=False, decipher_only=False,
    )


def certificate_builder(subject: x509.Name, issuer: x509.Name, public_key, ca: bool) -> x509.CertificateBuilder:
    """A builder of a certificate valid from an hour ago for two days."""
    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(key_usage(certificate_authority=ca), critical=True)
    )


class CertificateAuthority:
    """A CA made with python `cryptography` that signs client application
    certificates and revocation lists."""

    def __init__(self, folder: Path, name: str):
        self.folder = folder
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.certificate = (
            certificate_builder(self.name, self.name, self.key.public_key(), ca=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        self.path = folder / f"{name}.pem"
        self.path.write_bytes(self.certificate.public_bytes(serialization.Encoding.PEM))

    def issue(self, name: str, uri: str) -> tuple[Path, Path, x509.Certificate]:
        """Sign an RSA 2048 application instance certificate for `uri`;
        return (certificate, key, parsed certificate)."""
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        certificate = (
            certificate_builder(subject, self.name, key.public_key(), ca=False)
            .add_extension(
                x509.SubjectAlternativeName([
                    x509.UniformResourceIdentifier(uri),
                    x509.DNSName("localhost"),
                ]),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )
        certificate_path = self.folder / f"{name}.pem"
        key_path = self.folder / f"{name}-key.pem"
        certificate_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return certificate_path, key_path, certificate

    def revocation_list(self, revoked: list[x509.Certificate]) -> Path:
        """Write a CRL that revokes `revoked` and is current for a day."""
        now = datetime.datetime.now(datetime.timezone.utc)
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.name)
            .last_update(now - datetime.timedelta(minutes=5))
            .next_update(now + datetime.timedelta(days=1))
            .add_extension(x509.CRLNumber(1), critical=False)
        )
        for certificate in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(certificate.serial_number)
                .revocation_date(now - datetime.timedelta(minutes=1))
                .build()
            )
        path = self.folder / "clients.crl"
        path.write_bytes(builder.sign(self.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
        return path


class Plant:
    """opcua_plant.py on a free loopback port, or on `port`."""

    def __init__(self, workdir: Path, port: int | None = None):
        self.port = port or harness.free_port()
        self.endpoint = f"opc.tcp://127.0.0.1:{self.port}/"
        self.process = harness.Process(
            [sys.executable, str(Path(__file__).with_name("opcua_plant.py")), str(self.port)],
            stderr_path=workdir / f"plant-{self.port}-{time.monotonic_ns()}.stderr",
        )
        line = self.process.read_line(timeout=30.0)
        if line != f"listening 127.0.0.1:{self.port}":
            self.process.stop()
            raise AssertionError(f"opcua_plant.py printed {line!r}")

    def read(self, node: str):
        """Read a node's value straight from the plant, bypassing sluice."""

        async def read_value():
            async with Client(self.endpoint, timeout=REQUEST_TIMEOUT) as client:
                index = await client.get_namespace_index(PLANT_NAMESPACE)
                return await client.get_node(ua.NodeId(node, index)).read_value()

        return asyncio.run(read_value())

    def write(self, node: str, value: float) -> None:
        """Write a Double straight to the plant, bypassing sluice."""

        async def write_value():
            async with Client(self.endpoint, timeout=REQUEST_TIMEOUT) as client:
                index = await client.get_namespace_index(PLANT_NAMESPACE)
                variant = ua.Variant(value, ua.VariantType.Double)
                await client.get_node(ua.NodeId(node, index)).write_value(ua.DataValue(variant))

        asyncio.run(write_value())

    def stop(self) -> None:
        self.process.stop()


class AdminGateway(harness.StateGateway):
    """`sluice run` with states and a control socket in a short folder of
    its own, because Unix socket paths are limited to 108 bytes."""

    def __init__(self, sluice_bin, workdir, listeners, devices, states, rules, detect=None):
        self.workdir = workdir
        self.name = "test-gw"
        self.socket_folder = Path(tempfile.mkdtemp(prefix="sluice-ua-"))
        self.config_path = harness.write_state_config(workdir, listeners, devices, states, rules)
        admin = harness.toml_table("[admin]", {"socket": str(self.socket_folder / "control.sock")})
        if detect:
            admin += "\n" + harness.toml_table("[detect]", detect)
        self.config_path.write_text(self.config_path.read_text() + "\n" + admin)
        self.sluice_bin = sluice_bin
        self._launch(sluice_bin, len(listeners))

    def ctl(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [self.sluice_bin, "ctl", "--config", str(self.config_path), *args],
            capture_output=True, text=True, timeout=REQUEST_TIMEOUT,
        )

    def stop(self) -> None:
        super().stop()
        shutil.rmtree(self.socket_folder, ignore_errors=True)


def read_rule() -> dict:
    return {
        "device": "line1-ua",
        "services": ["browse", "read", "subscribe"],
        "nodes": [
            f"nsu={PLANT_NAMESPACE};s=Line1",
            f"nsu={PLANT_NAMESPACE};s=Line1.Press*",
            f"nsu={PLANT_NAMESPACE};s=Line1.Setpoint",
        ],
    }


def write_rule() -> dict:
    return {
        "device": "line1-ua",
        "services": ["write"],
        "nodes": [f"nsu={PLANT_NAMESPACE};s=Line1.Setpoint"],
        "values": "0-100",
        "when": {"state": {"press-1-mode": "maintenance"}},
    }


@pytest.fixture
def setup(request, sluice_bin, plc_sim, tmp_path):
    """The plant, the PLC for the state, and sluice with one OPC UA listener
    in the mode given as the fixture's parameter, `enforce` by default."""
    with contextlib.contextmanager(opcua_setup)(
        sluice_bin, plc_sim, tmp_path, getattr(request, "param", "enforce")
    ) as state:
        yield state


def opcua_setup(sluice_bin, plc_sim, tmp_path, mode: str = "enforce", prepare=None, acme_sources=None,
                extra_rules=None, detect=None):
    """Start the plant, the PLC state and sluice; yield the test's state.
    `prepare(authority, opcua_table)`, when given, may add keys to the
    listener's `opcua` table and returns extra state entries.
    `acme_sources`, when given, limits the vendor acme to those networks.
    `extra_rules` adds rule files by name; `detect` is the `[detect]` table."""
    folder = tmp_path / "opcua"
    folder.mkdir()
    plant = Plant(folder)
    server_certificate, server_key = make_rsa_certificate(folder, "sluice", SLUICE_URI)
    authority = CertificateAuthority(folder, "vendors-ca")
    client_certificate, client_key, client_x509 = authority.issue("vendor", VENDOR_URI)
    user_certificate, user_key = make_rsa_certificate(folder, "beta-user", "urn:beta:operator")

    password_hash = subprocess.run(
        [sluice_bin, "hash-password"], input=PASSWORD + "\n", capture_output=True, text=True,
        check=True, timeout=REQUEST_TIMEOUT,
    ).stdout.strip()

    listener = {
        "name": "ua",
        "protocol": "opcua",
        "bind": "127.0.0.1:0",
        "device": "line1-ua",
        "mode": mode,
        "opcua": {
            "application_uri": SLUICE_URI,
            "certificate": str(server_certificate),
            "private_key": str(server_key),
            "security_policies": ["Basic256Sha256", "Aes128_Sha256_RsaOaep", "Aes256_Sha256_RsaPss"],
            "client_ca": str(authority.path),
            # Tests that poll by connecting again open far more secure
            # channels per second than one client would.
            "open_rate": 1000,
            "open_burst": 1000,
        },
    }
    devices = [
        {"name": "line1-ua", "protocol": "opcua", "endpoint": plant.endpoint, "timeout_ms": 5000},
        harness.device("press-1", plc_sim.address, timeout_ms=500),
    ]
    states = [{
        "name": "press-1-mode",
        "device": "press-1",
        "holding_register": 900,
        "poll_ms": 100,
        "values": {0: "production", 1: "maintenance"},
    }]
    vendor = {"name": "acme", "opcua_users": [{"username": "acme-eng", "password_hash": password_hash}]}
    if acme_sources is not None:
        vendor["sources"] = acme_sources
    beta = {"name": "beta", "opcua_user_certificates": [str(user_certificate)]}
    beta_read = {
        "device": "line1-ua",
        "services": ["read"],
        "nodes": [f"nsu={PLANT_NAMESPACE};s=Line1.Press.Temperature"],
    }
    call_rule = {
        "device": "line1-ua",
        "services": ["call"],
        "nodes": [f"nsu={PLANT_NAMESPACE};s=Line1.Scale"],
    }
    rules = {
        "acme.toml": vendor_rule_file(vendor, [read_rule(), write_rule(), call_rule]),
        "beta.toml": vendor_rule_file(beta, [beta_read]),
    }
    rules.update(extra_rules or {})

    extra = prepare(authority, listener["opcua"]) if prepare else {}

    gateway_folder = folder / "gateway"
    gateway_folder.mkdir()
    gateway = AdminGateway(sluice_bin, gateway_folder, [listener], devices, states, rules, detect)
    plc = modbus_client(plc_sim.port)
    state = {
        "folder": folder,
        "gateway": gateway,
        "plant": plant,
        "plc": plc,
        "endpoint": f"opc.tcp://127.0.0.1:{gateway.port}/",
        "client_certificate": client_certificate,
        "client_key": client_key,
        "user_certificate": user_certificate,
        "user_key": user_key,
        "authority": authority,
        "client_x509": client_x509,
        **extra,
    }
    try:
        yield state
    finally:
        plc.close()
        gateway.stop()
        state["plant"].stop()


def vendor_client(setup, password: str = PASSWORD) -> Client:
    """An asyncua client for the vendor on sluice's SignAndEncrypt endpoint."""
    client = Client(setup["endpoint"], timeout=REQUEST_TIMEOUT)
    client.application_uri = VENDOR_URI
    client.set_user("acme-eng")
    client.set_password(password)
    return client


async def secure(client: Client, setup, policy=SecurityPolicyBasic256Sha256) -> Client:
    await client.set_security(
        policy,
        certificate=str(setup["client_certificate"]),
        private_key=str(setup["client_key"]),
        mode=ua.MessageSecurityMode.SignAndEncrypt,
    )
    return client


def run(setup, session, policy=SecurityPolicyBasic256Sha256):
    """Run `session(client, namespace_index)` in a connected vendor session."""

    async def connect_and_run():
        client = await secure(vendor_client(setup), setup, policy)
        async with client:
            index = await client.get_namespace_index(PLANT_NAMESPACE)
            return await session(client, index)

    return asyncio.run(connect_and_run())


def set_mode(setup, raw: int, name: str) -> None:
    """Set the press mode register on the PLC and wait until sluice reads it."""
    setup["plc"].write_register(900, raw)
    setup["gateway"].wait_for_events(
        lambda event: event.get("event_type") == "state" and (event.get("detail") or {}).get("new") == name,
        what=f"state change to {name}",
    )


def opcua_decisions(gateway, service: str) -> list[dict]:
    return [
        event for event in gateway.events()
        if event.get("event_type") == "decision" and event.get("opcua", {}).get("service") == service
    ]


def test_vendor_reads_allowed_nodes_with_exact_values(setup):
    async def session(client, index):
        temperature = await client.get_node(ua.NodeId("Line1.Press.Temperature", index)).read_value()
        setpoint = await client.get_node(ua.NodeId("Line1.Setpoint", index)).read_value()
        return temperature, setpoint

    assert run(setup, session) == (21.5, 40.0)


@pytest.mark.parametrize(
    "policy",
    [SecurityPolicyBasic256Sha256, SecurityPolicyAes128Sha256RsaOaep, SecurityPolicyAes256Sha256RsaPss],
    ids=["Basic256Sha256", "Aes128_Sha256_RsaOaep", "Aes256_Sha256_RsaPss"],
)
def test_every_policy_reads_with_sign_and_encrypt(setup, policy):
    async def session(client, index):
        return await client.get_node(ua.NodeId("Line1.Press.Temperature", index)).read_value()

    assert run(setup, session, policy) == 21.5


def test_endpoints_name_the_public_port(setup):
    async def endpoints():
        client = Client(setup["endpoint"], timeout=REQUEST_TIMEOUT)
        return await client.connect_and_get_server_endpoints()

    found = asyncio.run(endpoints())
    offered = sorted(
        (endpoint.EndpointUrl, endpoint.SecurityPolicyUri.split("#")[1], endpoint.SecurityMode.name)
        for endpoint in found
    )
    url = setup["endpoint"]
    assert offered == [
        (url, "Aes128_Sha256_RsaOaep", "SignAndEncrypt"),
        (url, "Aes256_Sha256_RsaPss", "SignAndEncrypt"),
        (url, "Basic256Sha256", "SignAndEncrypt"),
    ]


def test_anonymous_session_is_rejected(setup):
    # sluice offers no anonymous token policy, so async-opcua rejects the
    # token before it reaches the authenticator.
    async def connect():
        client = await secure(Client(setup["endpoint"], timeout=REQUEST_TIMEOUT), setup)
        client.application_uri = VENDOR_URI
        with pytest.raises(ua.uaerrors.BadIdentityTokenInvalid):
            await client.connect()
        client.disconnect_socket()

    asyncio.run(connect())


def test_browse_path_reaches_allowed_nodes_only(setup):
    async def session(client, index):
        line = client.get_node(ua.NodeId("Line1", index))
        temperature = await line.get_child([f"{index}:Press", f"{index}:Temperature"])
        with pytest.raises(ua.uaerrors.BadNoMatch):
            await line.get_child([f"{index}:Recipe"])
        return temperature.nodeid, index

    found, index = run(setup, session)
    assert found == ua.NodeId("Line1.Press.Temperature", index)


def test_read_of_forbidden_node_is_denied(setup):
    async def session(client, index):
        with pytest.raises(ua.uaerrors.BadUserAccessDenied):
            await client.get_node(ua.NodeId("Line1.Recipe", index)).read_value()
        # The allowed node in the same session still reads.
        return await client.get_node(ua.NodeId("Line1.Setpoint", index)).read_value()

    assert run(setup, session) == 40.0


def test_mixed_read_denies_only_forbidden_operation(setup):
    async def session(client, index):
        nodes = [
            ua.NodeId("Line1.Press.Temperature", index),
            ua.NodeId("Line1.Recipe", index),
        ]
        parameters = ua.ReadParameters()
        for node in nodes:
            item = ua.ReadValueId()
            item.NodeId = node
            item.AttributeId = ua.AttributeIds.Value
            parameters.NodesToRead.append(item)
        return await client.uaclient.read(parameters)

    results = run(setup, session)
    assert results[0].StatusCode.value == ua.StatusCodes.Good
    assert results[0].Value.Value == 21.5
    assert results[1].StatusCode.value == ua.StatusCodes.BadUserAccessDenied


def test_browse_hides_forbidden_nodes(setup):
    async def session(client, index):
        objects = await client.nodes.objects.get_children()
        line = client.get_node(ua.NodeId("Line1", index))
        children = await line.get_children()
        names = []
        for child in children:
            names.append((await child.read_browse_name()).Name)
        names.sort()
        object_ids = [node.nodeid for node in objects]
        return ua.NodeId("Line1", index) in object_ids, names

    line_visible, names = run(setup, session)
    assert line_visible
    assert names == ["Press", "Setpoint"]


def test_browse_of_forbidden_node_is_denied(setup):
    async def session(client, index):
        description = ua.BrowseDescription()
        description.NodeId = ua.NodeId("Line1.Recipe", index)
        description.BrowseDirection = ua.BrowseDirection.Forward
        description.ReferenceTypeId = ua.NodeId(ua.ObjectIds.HierarchicalReferences)
        description.IncludeSubtypes = True
        description.ResultMask = ua.BrowseResultMask.All
        parameters = ua.BrowseParameters()
        # The null view: the whole address space.
        parameters.View.Timestamp = ua.get_win_epoch()
        parameters.NodesToBrowse.append(description)
        return await client.uaclient.browse(parameters)

    (result,) = run(setup, session)
    assert result.StatusCode.value == ua.StatusCodes.BadUserAccessDenied
    assert result.References == []


def test_write_allowed_only_in_maintenance(setup):
    def write(value: float):
        async def session(client, index):
            node = client.get_node(ua.NodeId("Line1.Setpoint", index))
            await node.write_value(ua.DataValue(ua.Variant(value, ua.VariantType.Double)))

        return run(setup, session)

    set_mode(setup, 0, "production")
    with pytest.raises(ua.uaerrors.BadUserAccessDenied):
        write(55.0)
    assert setup["plant"].read("Line1.Setpoint") == 40.0

    set_mode(setup, 1, "maintenance")
    write(55.0)
    assert setup["plant"].read("Line1.Setpoint") == 55.0

    with pytest.raises(ua.uaerrors.BadUserAccessDenied):
        write(150.0)
    assert setup["plant"].read("Line1.Setpoint") == 55.0


def test_write_to_node_outside_rules_is_denied(setup):
    set_mode(setup, 1, "maintenance")

    async def session(client, index):
        node = client.get_node(ua.NodeId("Line1.Recipe", index))
        with pytest.raises(ua.uaerrors.BadUserAccessDenied):
            await node.write_value(ua.DataValue(ua.Variant("R-99", ua.VariantType.String)))

    run(setup, session)
    assert setup["plant"].read("Line1.Recipe") == "R-17"


def test_user_certificate_identifies_its_vendor(setup):
    async def session():
        client = await secure(Client(setup["endpoint"], timeout=REQUEST_TIMEOUT), setup)
        client.application_uri = VENDOR_URI
        await client.load_client_certificate(str(setup["user_certificate"]))
        await client.load_private_key(setup["user_key"])
        async with client:
            index = await client.get_namespace_index(PLANT_NAMESPACE)
            temperature = await client.get_node(ua.NodeId("Line1.Press.Temperature", index)).read_value()
            with pytest.raises(ua.uaerrors.BadUserAccessDenied):
                await client.get_node(ua.NodeId("Line1.Setpoint", index)).read_value()
            return temperature

    assert asyncio.run(session()) == 21.5
    decisions = setup["gateway"].wait_for_events(
        lambda event: event.get("vendor") == "beta" and event.get("event_type") == "decision",
        count=2,
        what="two decisions of vendor beta",
    )
    assert [event["decision"] for event in decisions] == ["allow", "deny"]
    assert decisions[0]["rule"] == "beta.toml#1"


def connect_with_wrong_password(setup) -> None:
    async def connect():
        client = await secure(vendor_client(setup, password="wrong"), setup)
        with pytest.raises(ua.uaerrors.BadUserAccessDenied):
            await client.connect()
        client.disconnect_socket()

    asyncio.run(connect())


def test_wrong_password_is_rejected(setup):
    connect_with_wrong_password(setup)
    rejections = setup["gateway"].wait_for_events(
        lambda event: event.get("event_type") == "session" and event.get("action") == "reject",
        what="session rejection",
    )
    assert rejections[0]["reason"] == "unknown user or wrong password"
    assert rejections[0]["listener"] == "ua"


def test_wrong_password_raises_auth_failure_anomaly(setup):
    connect_with_wrong_password(setup)
    (anomaly,) = setup["gateway"].wait_for_events(
        lambda event: event.get("event_type") == "anomaly", what="the authentication anomaly"
    )
    assert anomaly["anomaly"] == {
        "kind": "opcua_auth_failure",
        "severity": "medium",
        "detail": 'username "acme-eng": unknown user or wrong password',
    }
    assert anomaly["listener"] == "ua"


@pytest.fixture
def sweep_setup(sluice_bin, plc_sim, tmp_path):
    """sluice with the OPC UA listener and a browse sweep threshold of 3."""
    with contextlib.contextmanager(opcua_setup)(
        sluice_bin, plc_sim, tmp_path, detect={"browse_sweep": 3}
    ) as state:
        yield state


def test_browse_of_four_nodes_raises_browse_sweep(sweep_setup):
    nodes = ["Line1", "Line1.Press", "Line1.Press.Temperature", "Line1.Setpoint"]

    async def session(client, index):
        for name in nodes[:3]:
            await client.get_node(ua.NodeId(name, index)).get_children()
            await client.get_node(ua.NodeId(name, index)).get_children()
        before = [event for event in sweep_setup["gateway"].events() if event.get("event_type") == "anomaly"]
        await client.get_node(ua.NodeId(nodes[3], index)).get_children()
        return before

    assert run(sweep_setup, session) == []
    (anomaly,) = sweep_setup["gateway"].wait_for_events(
        lambda event: event.get("event_type") == "anomaly", what="the browse sweep anomaly"
    )
    assert anomaly["anomaly"] == {
        "kind": "browse_sweep",
        "severity": "medium",
        "detail": "4 distinct nodes browsed within 10000 ms",
    }
    assert anomaly["vendor"] == "acme"
    assert anomaly["device"] == "line1-ua"
    assert isinstance(anomaly["session_id"], int)


def test_every_operation_is_a_decision_event(setup):
    async def session(client, index):
        await client.get_node(ua.NodeId("Line1.Press.Temperature", index)).read_value()
        with pytest.raises(ua.uaerrors.BadUserAccessDenied):
            await client.get_node(ua.NodeId("Line1.Recipe", index)).read_value()

    run(setup, session)
    gateway = setup["gateway"]
    wait_for(lambda: len(opcua_decisions(gateway, "read")) >= 2, what="two read decisions")
    allowed, denied = opcua_decisions(gateway, "read")[:2]

    assert allowed["decision"] == "allow"
    assert allowed["vendor"] == "acme"
    assert allowed["listener"] == "ua"
    assert allowed["device"] == "line1-ua"
    assert allowed["rule"] == "acme.toml#1"
    assert allowed["opcua"] == {
        "service": "read",
        "node_id": "nsu=urn:plant:line1;s=Line1.Press.Temperature",
        "status": "Good",
    }

    assert denied["decision"] == "deny"
    assert denied["reason"] == "node outside allowed nodes"
    assert denied["opcua"] == {
        "service": "read",
        "node_id": "nsu=urn:plant:line1;s=Line1.Recipe",
        "status": "BadUserAccessDenied",
    }
    assert "rule" not in denied


def test_device_session_reconnects_after_restart(setup):
    def read_temperature():
        async def session(client, index):
            node = client.get_node(ua.NodeId("Line1.Press.Temperature", index))
            return (await node.read_data_value(raise_on_bad_status=False)).StatusCode.value

        return run(setup, session)

    assert read_temperature() == ua.StatusCodes.Good
    port = setup["plant"].port
    setup["plant"].stop()
    assert wait_for(
        lambda: read_temperature() == ua.StatusCodes.BadNotConnected,
        what="reads to fail while the device is down",
    )

    setup["plant"] = Plant(setup["folder"], port)
    assert wait_for(
        lambda: read_temperature() == ua.StatusCodes.Good,
        timeout=30.0,
        what="reads to succeed after the device is back",
    )


def test_call_allowed_method_only(setup):
    async def session(client, index):
        line = client.get_node(ua.NodeId("Line1", index))
        doubled = await line.call_method(ua.NodeId("Line1.Scale", index), ua.Variant(4.0, ua.VariantType.Double))
        with pytest.raises(ua.uaerrors.BadUserAccessDenied):
            await line.call_method(ua.NodeId("Line1.Purge", index))
        return doubled

    assert run(setup, session) == 8.0
    calls = setup["gateway"].wait_for_events(
        lambda event: event.get("opcua", {}).get("service") == "call", count=2, what="two call decisions"
    )
    assert [(event["decision"], event["opcua"]["node_id"], event["opcua"]["status"]) for event in calls] == [
        ("allow", "nsu=urn:plant:line1;s=Line1.Scale", "Good"),
        ("deny", "nsu=urn:plant:line1;s=Line1.Purge", "BadUserAccessDenied"),
    ]
    assert calls[0]["rule"] == "acme.toml#3"


class Changes:
    """An asyncua subscription handler that keeps every data change."""

    def __init__(self):
        self.values: list = []

    def datachange_notification(self, node, value, data) -> None:
        self.values.append(value)


def test_subscription_reports_device_changes(setup):
    async def session(client, index):
        changes = Changes()
        subscription = await client.create_subscription(100, changes)
        await subscription.subscribe_data_change(client.get_node(ua.NodeId("Line1.Setpoint", index)))
        with pytest.raises(ua.uaerrors.BadUserAccessDenied):
            await subscription.subscribe_data_change(client.get_node(ua.NodeId("Line1.Recipe", index)))
        await wait_async(lambda: changes.values == [40.0], "the initial value")
        await asyncio.to_thread(setup["plant"].write, "Line1.Setpoint", 42.0)
        await wait_async(lambda: changes.values == [40.0, 42.0], "the changed value")
        await subscription.delete()
        return changes.values

    assert run(setup, session) == [40.0, 42.0]
    events = setup["gateway"].wait_for_events(
        lambda event: event.get("opcua", {}).get("service") == "subscribe", count=2, what="two subscribe decisions"
    )
    subscribes = [(event["decision"], event["opcua"]["node_id"], event["opcua"]["status"]) for event in events]
    assert subscribes == [
        ("allow", "nsu=urn:plant:line1;s=Line1.Setpoint", "Good"),
        ("deny", "nsu=urn:plant:line1;s=Line1.Recipe", "BadUserAccessDenied"),
    ]


class Samples:
    """An asyncua subscription handler that keeps every node id, value and
    status code it is notified of."""

    def __init__(self):
        self.samples: list[tuple[str, object, int]] = []

    def datachange_notification(self, node, value, data) -> None:
        status = data.monitored_item.Value.StatusCode.value
        self.samples.append((node.nodeid.Identifier, value, status))

    def of(self, name: str) -> list[tuple[object, int]]:
        return [(value, status) for node, value, status in self.samples if node == name]


def reload_rules(setup, edit) -> None:
    """Rewrite acme.toml with `edit(text)`, send SIGHUP and wait for the
    reload event."""
    gateway = setup["gateway"]
    path = gateway.config_path.parent / "rules" / "acme.toml"
    path.write_text(edit(path.read_text()))
    reloads = len([event for event in gateway.events() if event.get("action") == "reload"])
    harness.send_hangup(gateway)
    gateway.wait_for_events(
        lambda event: event.get("event_type") == "config" and event.get("action") == "reload",
        count=reloads + 1,
        what="the reload",
    )


def without_setpoint_subscribe(text: str) -> str:
    """Move Line1.Setpoint out of the browse/read/subscribe rule into a rule
    of its own with browse and read only."""
    setpoint = f'"nsu={PLANT_NAMESPACE};s=Line1.Setpoint"'
    read_nodes = f'nodes = ["nsu={PLANT_NAMESPACE};s=Line1", "nsu={PLANT_NAMESPACE};s=Line1.Press*", {setpoint}]'
    assert read_nodes in text
    text = text.replace(read_nodes, f'nodes = ["nsu={PLANT_NAMESPACE};s=Line1", "nsu={PLANT_NAMESPACE};s=Line1.Press*"]')
    setpoint_rule = {"device": "line1-ua", "services": ["browse", "read"], "nodes": [f"nsu={PLANT_NAMESPACE};s=Line1.Setpoint"]}
    return text + "\n" + harness.toml_table("[[allow]]", setpoint_rule)


@pytest.fixture
def guest_setup(sluice_bin, plc_sim, tmp_path):
    """sluice with the OPC UA listener and the vendor guest for anonymous
    sessions, which may subscribe to Line1.Setpoint."""
    guest = {"name": "guest", "opcua_anonymous": True}
    subscribe = {"device": "line1-ua", "services": ["subscribe"], "nodes": [f"nsu={PLANT_NAMESPACE};s=Line1.Setpoint"]}
    rules = {"guest.toml": harness.vendor_rule_file(guest, [subscribe])}
    with contextlib.contextmanager(opcua_setup)(sluice_bin, plc_sim, tmp_path, extra_rules=rules) as state:
        yield state


def test_reload_revokes_monitored_item_without_subscribe_right(guest_setup):
    setup = guest_setup
    plant = setup["plant"]

    async def session(client, index):
        samples = Samples()
        subscription = await client.create_subscription(100, samples)
        await subscription.subscribe_data_change(client.get_node(ua.NodeId("Line1.Setpoint", index)))
        await wait_async(lambda: samples.of("Line1.Setpoint") == [(40.0, ua.StatusCodes.Good)], "the initial value")

        # The guest's item on the same node keeps its right throughout and
        # shows when the sampler has read the node again.
        guest = await secure(Client(setup["endpoint"], timeout=REQUEST_TIMEOUT), setup)
        guest.application_uri = VENDOR_URI
        async with guest:
            witness = Samples()
            guest_subscription = await guest.create_subscription(100, witness)
            await guest_subscription.subscribe_data_change(guest.get_node(ua.NodeId("Line1.Setpoint", index)))
            await wait_async(lambda: len(witness.of("Line1.Setpoint")) == 1, "the guest's initial value")

            # A reload that keeps the right changes nothing.
            await asyncio.to_thread(reload_rules, setup, lambda text: text + "\n# reviewed\n")
            await asyncio.to_thread(plant.write, "Line1.Setpoint", 41.0)
            await wait_async(lambda: len(samples.of("Line1.Setpoint")) == 2, "the value after the first reload")
            kept = samples.of("Line1.Setpoint")

            await asyncio.to_thread(reload_rules, setup, without_setpoint_subscribe)
            await wait_async(lambda: len(samples.of("Line1.Setpoint")) == 3, "the access denied notification")
            revoked = samples.of("Line1.Setpoint")

            await asyncio.to_thread(plant.write, "Line1.Setpoint", 42.0)
            await wait_async(lambda: (42.0, ua.StatusCodes.Good) in witness.of("Line1.Setpoint"), "42.0 at the guest")
            await guest_subscription.delete()
        await subscription.delete()
        return kept, revoked, samples.of("Line1.Setpoint")

    kept, revoked, final = run(setup, session)
    assert kept == [(40.0, ua.StatusCodes.Good), (41.0, ua.StatusCodes.Good)]
    assert revoked == [
        (40.0, ua.StatusCodes.Good),
        (41.0, ua.StatusCodes.Good),
        (None, ua.StatusCodes.BadUserAccessDenied),
    ]
    assert final == revoked
    (denied,) = setup["gateway"].wait_for_events(
        lambda event: event.get("opcua", {}).get("service") == "subscribe" and event.get("decision") == "deny",
        what="the subscribe decision after the reload",
    )
    assert denied["opcua"] == {
        "service": "subscribe",
        "node_id": f"nsu={PLANT_NAMESPACE};s=Line1.Setpoint",
        "status": "BadUserAccessDenied",
    }
    assert denied["vendor"] == "acme"
    assert denied["reason"] == "node outside allowed nodes"


async def wait_async(condition, what: str, timeout: float = harness.POLL_TIMEOUT) -> None:
    """Poll `condition` inside a running event loop until it holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(harness.POLL_INTERVAL)


@pytest.mark.parametrize("setup", ["monitor"], indirect=True)
def test_monitor_mode_forwards_denied_read(setup):
    async def session(client, index):
        return await client.get_node(ua.NodeId("Line1.Recipe", index)).read_value()

    assert run(setup, session) == "R-17"
    (denied,) = setup["gateway"].wait_for_events(
        lambda event: event.get("opcua", {}).get("node_id") == "nsu=urn:plant:line1;s=Line1.Recipe",
        what="the decision on Line1.Recipe",
    )
    assert denied["decision"] == "deny"
    assert denied["enforced"] is False
    assert denied["opcua"]["status"] == "Good"


def test_quarantine_ends_open_session_access(setup):
    async def session(client, index):
        node = client.get_node(ua.NodeId("Line1.Press.Temperature", index))
        before = await node.read_value()
        quarantined = await asyncio.to_thread(setup["gateway"].ctl, "quarantine", "acme")
        assert quarantined.returncode == 0, quarantined.stderr
        with pytest.raises(ua.uaerrors.BadUserAccessDenied):
            await node.read_value()
        return before

    assert run(setup, session) == 21.5
    (denied,) = setup["gateway"].wait_for_events(
        lambda event: event.get("reason") == "vendor quarantined",
        what="the decision denied by the quarantine",
    )
    assert denied["opcua"]["status"] == "BadUserAccessDenied"
