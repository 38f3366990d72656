"""Modbus tags on an OPC UA listener: sluice decodes typed values from the
mirror of a simulated Modbus PLC and serves them in the namespace
urn:sluice:tags to an asyncua client. The listener has no OPC UA device, so
it serves only the tags. Writes are decided as OPC UA writes and as the
Modbus requests they become."""

from __future__ import annotations

import asyncio
import struct
import subprocess
from pathlib import Path

import pytest
from asyncua import Client, ua
from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256

import harness
from harness import modbus_client, vendor_rule_file, wait_for
from test_opcua import (
    PASSWORD,
    PLANT_NAMESPACE,
    REQUEST_TIMEOUT,
    SLUICE_URI,
    VENDOR_URI,
    CertificateAuthority,
    Changes,
    Plant,
    make_rsa_certificate,
    wait_async,
)
from test_opcua_services import browse_in_pages

TAGS = "urn:sluice:tags"
# Blocks are polled every 100 ms and are stale after 1 s. A stopped PLC
# turns tags bad within the stale time plus the device timeout and a poll,
# well inside this bound.
STATUS_TIMEOUT = 10.0
HOLDING_BLOCK = {"kind": "holding_register", "start": 0, "count": 200, "poll_ms": 100, "max_age_ms": 1000}
COIL_BLOCK = {"kind": "coil", "start": 0, "count": 20, "poll_ms": 100, "max_age_ms": 1000}

ORDERS = ["ABCD", "CDAB", "BADC", "DCBA"]


def words(big_endian: bytes, order: str) -> list[int]:
    """Return the registers that hold `big_endian` in register order `order`:
    CD* reverses the registers, *BA and BA* swap the bytes in each."""
    registers = [int.from_bytes(big_endian[i:i + 2], "big") for i in range(0, len(big_endian), 2)]
    if order in ("CDAB", "DCBA"):
        registers.reverse()
    if order in ("BADC", "DCBA"):
        registers = [((word & 0xFF) << 8) | (word >> 8) for word in registers]
    return registers


def tag(name: str, kind: str, address: int, data_type: str, **fields) -> dict:
    return {"device": "press-1", "name": name, "kind": kind, "address": address, "type": data_type, **fields}


# Each read tag with its registers (or coil), the value it must read and
# its OPC UA variant type. Register tags start at address 10.
READ_CASES: list[tuple[dict, list[int], object, ua.VariantType]] = [
    (tag("Press1.Running", "coil", 5, "bool"), [1], True, ua.VariantType.Boolean),
    (tag("Press1.DoorOpen", "holding_register", 10, "bool", bit=2), [0b0100], True, ua.VariantType.Boolean),
    (tag("Press1.Int16", "holding_register", 11, "int16"), [0xFFFE], -2, ua.VariantType.Int16),
    (tag("Press1.UInt16", "holding_register", 12, "uint16"), [0xFFFF], 65535, ua.VariantType.UInt16),
    (tag("Press1.Int32", "holding_register", 14, "int32"), words(struct.pack(">i", -123456), "ABCD"),
     -123456, ua.VariantType.Int32),
    (tag("Press1.UInt32", "holding_register", 16, "uint32"), words(struct.pack(">I", 3_000_000_000), "ABCD"),
     3_000_000_000, ua.VariantType.UInt32),
    (tag("Press1.Int64", "holding_register", 18, "int64"), words(struct.pack(">q", -1_234_567_890_123), "ABCD"),
     -1_234_567_890_123, ua.VariantType.Int64),
    (tag("Press1.UInt64", "holding_register", 22, "uint64"),
     words(struct.pack(">Q", 18_000_000_000_000_000_000), "ABCD"), 18_000_000_000_000_000_000, ua.VariantType.UInt64),
    (tag("Press1.Float32", "holding_register", 26, "float32"), words(struct.pack(">f", 1234.5), "ABCD"),
     1234.5, ua.VariantType.Float),
    (tag("Press1.Float64", "holding_register", 28, "float64"), words(struct.pack(">d", -98765.4321), "ABCD"),
     -98765.4321, ua.VariantType.Double),
    (tag("Press1.Recipe", "holding_register", 32, "string", length=8), words(b"PRESS-01", "ABCD"),
     "PRESS-01", ua.VariantType.String),
    (tag("Press1.Scaled", "holding_register", 36, "int16", scale=0.5, offset=-10.0), [300], 140.0,
     ua.VariantType.Double),
]
# Each order with a 32-bit integer, a 32-bit float and a 64-bit integer;
# the values have distinct bytes so that every order reads differently.
for index, order in enumerate(ORDERS):
    base = 40 + index * 8
    READ_CASES += [
        (tag(f"Press1.UInt32.{order}", "holding_register", base, "uint32", order=order),
         words(bytes.fromhex("11223344"), order), 0x11223344, ua.VariantType.UInt32),
        (tag(f"Press1.Float32.{order}", "holding_register", base + 2, "float32", order=order),
         words(struct.pack(">f", -0.15625), order), -0.15625, ua.VariantType.Float),
        (tag(f"Press1.Int64.{order}", "holding_register", base + 4, "int64", order=order),
         words(bytes.fromhex("0102030405060708"), order), 0x0102030405060708, ua.VariantType.Int64),
    ]

WRITE_TAG = tag("Press1.Setpoint", "holding_register", 100, "float32", access="read_write", unit="°C")
DENIED_TAG = tag("Press1.Limit", "holding_register", 110, "float32", access="read_write")
HIDDEN_TAG = tag("Oven.Secret", "holding_register", 120, "uint16")

READ_RULE = {"device": "press-1", "services": ["browse", "read", "subscribe"], "nodes": [f"nsu={TAGS};s=Press1.*"]}
WRITE_RULE = {
    "device": "press-1",
    "services": ["write"],
    "nodes": [f"nsu={TAGS};s=Press1.Setpoint", f"nsu={TAGS};s=Press1.Limit"],
    "values": "0-100",
}
# Only the setpoint's registers may be written over Modbus.
MODBUS_WRITE_RULE = {"device": "press-1", "functions": ["write_multiple_registers"], "addresses": ["100-101"]}


class TagGateway(harness.Gateway):
    """`sluice run` on a configuration with `[[tag]]` sections."""

    def __init__(self, sluice_bin, workdir: Path, listeners, devices, tags, rules):
        self.workdir = workdir
        self.name = "test-gw"
        self.config_path = harness.write_config(workdir, listeners, devices, rules)
        text = self.config_path.read_text()
        for entry in tags:
            text += "\n" + harness.toml_table("[[tag]]", entry)
        self.config_path.write_text(text)
        self._launch(sluice_bin, len(listeners))


@pytest.fixture
def tags_setup(sluice_bin, plc_sim, tmp_path):
    """sluice with one OPC UA listener without device, serving the tags of
    the simulated PLC; yields the test's state."""
    folder = tmp_path / "tags"
    folder.mkdir()
    yield from start_tags_gateway(sluice_bin, plc_sim, folder)


@pytest.fixture
def plant_setup(sluice_bin, plc_sim, tmp_path):
    """sluice with one OPC UA listener that mirrors the plant's OPC UA
    server and also serves the tags; yields the test's state."""
    folder = tmp_path / "plant"
    folder.mkdir()
    plant = Plant(folder)
    device = {"name": "line1-ua", "protocol": "opcua", "endpoint": plant.endpoint, "timeout_ms": 5000}
    plant_rule = {
        "device": "line1-ua",
        "services": ["browse", "read"],
        "nodes": [f"nsu={PLANT_NAMESPACE};s=Line1*"],
    }
    try:
        yield from start_tags_gateway(sluice_bin, plc_sim, folder, device, plant_rule)
    finally:
        plant.stop()


@pytest.fixture
def monitor_setup(sluice_bin, plc_sim, tmp_path):
    """The state of `tags_setup`, with the listener in monitor mode."""
    folder = tmp_path / "monitor"
    folder.mkdir()
    yield from start_tags_gateway(sluice_bin, plc_sim, folder, mode="monitor")


def start_tags_gateway(sluice_bin, plc_sim, folder: Path, opcua_device=None, opcua_rule=None, mode="enforce"):
    """Start sluice with the tags, and with `opcua_device` mirrored when
    given; yield the test's state and stop sluice afterwards."""
    server_certificate, server_key = make_rsa_certificate(folder, "sluice", SLUICE_URI)
    authority = CertificateAuthority(folder, "vendors-ca")
    client_certificate, client_key, _ = authority.issue("vendor", VENDOR_URI)
    password_hash = subprocess.run(
        [sluice_bin, "hash-password"], input=PASSWORD + "\n", capture_output=True, text=True,
        check=True, timeout=REQUEST_TIMEOUT,
    ).stdout.strip()

    listener = {
        "name": "ua",
        "protocol": "opcua",
        "bind": "127.0.0.1:0",
        "mode": mode,
        "opcua": {
            "application_uri": SLUICE_URI,
            "certificate": str(server_certificate),
            "private_key": str(server_key),
            "security_policies": ["Basic256Sha256"],
            "client_ca": str(authority.path),
            "open_rate": 1000,
            "open_burst": 1000,
        },
    }
    devices = [harness.device("press-1", plc_sim.address, timeout_ms=500, mirror=[HOLDING_BLOCK, COIL_BLOCK])]
    allows = [READ_RULE, WRITE_RULE, MODBUS_WRITE_RULE]
    if opcua_device is not None:
        listener["device"] = opcua_device["name"]
        devices.append(opcua_device)
        allows.append(opcua_rule)
    tags = [case[0] for case in READ_CASES] + [WRITE_TAG, DENIED_TAG, HIDDEN_TAG]
    vendor = {"name": "acme", "opcua_users": [{"username": "acme-eng", "password_hash": password_hash}]}
    rules = {"acme.toml": vendor_rule_file(vendor, allows)}

    gateway_folder = folder / "gateway"
    gateway_folder.mkdir()
    gateway = TagGateway(sluice_bin, gateway_folder, [listener], devices, tags, rules)
    plc = modbus_client(plc_sim.port)
    try:
        yield {
            "gateway": gateway,
            "plc": plc,
            "plc_sim": plc_sim,
            "endpoint": f"opc.tcp://127.0.0.1:{gateway.port}/",
            "client_certificate": client_certificate,
            "client_key": client_key,
            "folder": folder,
        }
    finally:
        plc.close()
        gateway.stop()


def run(setup, session):
    """Run `session(client, namespace_index)` in a connected vendor session
    on sluice's SignAndEncrypt endpoint."""

    async def connect_and_run():
        client = Client(setup["endpoint"], timeout=REQUEST_TIMEOUT)
        client.application_uri = VENDOR_URI
        client.set_user("acme-eng")
        client.set_password(PASSWORD)
        await client.set_security(
            SecurityPolicyBasic256Sha256,
            certificate=str(setup["client_certificate"]),
            private_key=str(setup["client_key"]),
            mode=ua.MessageSecurityMode.SignAndEncrypt,
        )
        async with client:
            index = await client.get_namespace_index(TAGS)
            return await session(client, index)

    return asyncio.run(connect_and_run())


def set_plc(plc, case: tuple) -> None:
    """Write a read case's registers or coil straight to the PLC."""
    entry, registers = case[0], case[1]
    if entry["kind"] == "coil":
        assert not plc.write_coil(entry["address"], bool(registers[0]), device_id=1).isError()
    else:
        assert not plc.write_registers(entry["address"], registers, device_id=1).isError()


def plc_registers(plc, address: int, count: int) -> list[int]:
    result = plc.read_holding_registers(address, count=count, device_id=1)
    assert not result.isError()
    return result.registers


def write_float(setup, name: str, value: float) -> None:
    """Write a Float to a tag; raises the status error of a failed write."""

    async def session(client, index):
        await client.get_node(ua.NodeId(name, index)).write_value(ua.DataValue(ua.Variant(value, ua.VariantType.Float)))

    run(setup, session)


def read_tag(setup, name: str, raise_on_bad_status: bool = True) -> ua.DataValue:
    async def session(client, index):
        return await client.get_node(ua.NodeId(name, index)).read_data_value(raise_on_bad_status)

    return run(setup, session)


def test_reads_every_type_and_order_exactly(tags_setup):
    for case in READ_CASES:
        set_plc(tags_setup["plc"], case)
    last = READ_CASES[-1]
    wait_for(
        lambda: read_tag(tags_setup, last[0]["name"]).Value.Value == last[2],
        timeout=STATUS_TIMEOUT, what="the last tag's value through the mirror",
    )

    async def session(client, index):
        values = []
        for case in READ_CASES:
            value = await client.get_node(ua.NodeId(case[0]["name"], index)).read_data_value()
            values.append((case[0]["name"], value.Value.Value, value.Value.VariantType, value.StatusCode.name))
        return values

    values = run(tags_setup, session)
    assert values == [(case[0]["name"], case[2], case[3], "Good") for case in READ_CASES]


def test_tag_node_attributes(tags_setup):
    async def session(client, index):
        node = client.get_node(ua.NodeId(WRITE_TAG["name"], index))
        units = await node.get_child([ua.QualifiedName("EngineeringUnits", 0)])
        return (
            await node.read_browse_name(),
            await node.read_data_type_as_variant_type(),
            await node.read_attribute(ua.AttributeIds.AccessLevel),
            await client.get_node(ua.NodeId("Press1.Int16", index)).read_attribute(ua.AttributeIds.AccessLevel),
            (await units.read_value()).DisplayName.Text,
            index,
        )

    name, variant_type, write_level, read_level, unit, index = run(tags_setup, session)
    assert name == ua.QualifiedName("Press1.Setpoint", index)
    assert variant_type == ua.VariantType.Float
    assert write_level.Value.Value == 3
    assert read_level.Value.Value == 1
    assert unit == "°C"


def test_browse_hides_tags_outside_rules(tags_setup):
    async def session(client, index):
        folder = await client.nodes.objects.get_child([ua.QualifiedName("Tags", index)])
        names = []
        for child in await folder.get_children():
            names.append((await child.read_browse_name()).Name)
        with pytest.raises(ua.uaerrors.BadNoMatch):
            await client.nodes.objects.get_child(
                [ua.QualifiedName("Tags", index), ua.QualifiedName("Oven.Secret", index)]
            )
        setpoint = await client.nodes.objects.get_child(
            [ua.QualifiedName("Tags", index), ua.QualifiedName("Press1.Setpoint", index)]
        )
        return names, setpoint.nodeid

    names, setpoint = run(tags_setup, session)
    names.sort()
    expected = sorted([case[0]["name"] for case in READ_CASES] + [WRITE_TAG["name"], DENIED_TAG["name"]])
    assert names == expected
    assert setpoint.Identifier == "Press1.Setpoint"


def test_browse_next_pages_tags_folder(tags_setup):
    async def session(client, index):
        folder = await client.nodes.objects.get_child([ua.QualifiedName("Tags", index)])
        return await browse_in_pages(client, folder.nodeid, 3)

    pages = run(tags_setup, session)
    expected = sorted([case[0]["name"] for case in READ_CASES] + [WRITE_TAG["name"], DENIED_TAG["name"]])
    assert [len(page) for page in pages] == [min(3, len(expected) - start) for start in range(0, len(expected), 3)]
    assert sorted(reference.BrowseName.Name for page in pages for reference in page) == expected


def test_read_of_tag_outside_rules_is_denied(tags_setup):
    with pytest.raises(ua.uaerrors.BadUserAccessDenied):
        read_tag(tags_setup, HIDDEN_TAG["name"])
    (event,) = tags_setup["gateway"].wait_for_events(
        lambda event: event.get("opcua", {}).get("node_id") == f"nsu={TAGS};s=Oven.Secret",
        what="the denied read's decision",
    )
    assert event["decision"] == "deny"
    assert event["device"] == "press-1"
    assert event["opcua"]["service"] == "read"
    assert event["opcua"]["status"] == "BadUserAccessDenied"


def test_float_write_reaches_plc_registers(tags_setup):
    write_float(tags_setup, WRITE_TAG["name"], 42.5)
    assert plc_registers(tags_setup["plc"], 100, 2) == words(struct.pack(">f", 42.5), "ABCD")
    (event,) = tags_setup["gateway"].wait_for_events(
        lambda event: event.get("opcua", {}).get("service") == "write", what="the write's decision"
    )
    assert event["decision"] == "allow"
    assert event["rule"] == "acme.toml#2"
    assert event["detail"] == {"modbus_rule": "acme.toml#3"}
    assert event["opcua"] == {"service": "write", "node_id": f"nsu={TAGS};s=Press1.Setpoint", "status": "Good"}
    assert event["modbus"] == {
        "unit": 1, "function": 16, "function_name": "write_multiple_registers",
        "address": 100, "quantity": 2, "transaction_id": 0,
    }


def test_write_denied_by_modbus_rules_never_reaches_plc(tags_setup):
    with pytest.raises(ua.uaerrors.BadUserAccessDenied):
        write_float(tags_setup, DENIED_TAG["name"], 7.0)
    assert plc_registers(tags_setup["plc"], 110, 2) == [110, 111]
    writes = [request for request in tags_setup["plc_sim"].requests() if request["function"] == 16]
    assert writes == []
    (event,) = tags_setup["gateway"].wait_for_events(
        lambda event: event.get("opcua", {}).get("service") == "write", what="the write's decision"
    )
    assert event["decision"] == "deny"
    assert event["reason"].startswith("Modbus write denied: ")
    assert event["modbus"]["address"] == 110
    assert event["opcua"]["status"] == "BadUserAccessDenied"


def test_write_errors_have_exact_status(tags_setup):
    async def session(client, index):
        statuses = []
        for name, variant in [
            ("Press1.Setpoint", ua.Variant(42.5, ua.VariantType.Double)),
            ("Press1.Setpoint", ua.Variant(150.0, ua.VariantType.Float)),
            ("Press1.Int16", ua.Variant(1, ua.VariantType.Int16)),
        ]:
            try:
                await client.get_node(ua.NodeId(name, index)).write_value(ua.DataValue(variant))
                statuses.append("Good")
            except ua.UaStatusCodeError as error:
                statuses.append(ua.StatusCode(error.code).name)
        return statuses

    # A Double is not the tag's Float; 150 is outside the rule's values;
    # the int16 tag is read-only and no rule allows writing it.
    assert run(tags_setup, session) == ["BadTypeMismatch", "BadUserAccessDenied", "BadUserAccessDenied"]
    assert plc_registers(tags_setup["plc"], 100, 2) == [100, 101]


def test_stopped_plc_turns_status_bad_then_good(tags_setup, sluice_bin):
    name = "Press1.UInt16"
    wait_for(lambda: read_tag(tags_setup, name).StatusCode.is_good(), timeout=STATUS_TIMEOUT, what="a good value")
    port = tags_setup["plc_sim"].port
    tags_setup["plc_sim"].stop()
    wait_for(
        lambda: read_tag(tags_setup, name, False).StatusCode.name == "BadCommunicationError",
        timeout=STATUS_TIMEOUT, what="BadCommunicationError after the PLC stopped",
    )
    restarted = harness.Process(
        [sluice_bin, "plc-sim", "--bind", f"127.0.0.1:{port}"],
        stderr_path=tags_setup["folder"] / "plc-restarted.stderr",
    )
    try:
        assert restarted.read_line() == f"listening 127.0.0.1:{port}"
        value = wait_for(
            lambda: (lambda value: value if value.StatusCode.is_good() else None)(read_tag(tags_setup, name, False)),
            timeout=STATUS_TIMEOUT, what="a good value after the PLC returned",
        )
    finally:
        restarted.stop()
    # A restarted plc-sim starts again with n in holding register n.
    assert value.Value.Value == 12
    assert value.Value.VariantType == ua.VariantType.UInt16


def test_subscription_reports_register_change(tags_setup):
    name = "Press1.UInt16"
    wait_for(lambda: read_tag(tags_setup, name).StatusCode.is_good(), timeout=STATUS_TIMEOUT, what="a good value")

    async def session(client, index):
        changes = Changes()
        subscription = await client.create_subscription(100, changes)
        await subscription.subscribe_data_change(client.get_node(ua.NodeId(name, index)))
        with pytest.raises(ua.uaerrors.BadUserAccessDenied):
            await subscription.subscribe_data_change(client.get_node(ua.NodeId(HIDDEN_TAG["name"], index)))
        await wait_async(lambda: changes.values == [12], "the initial value")
        await asyncio.to_thread(tags_setup["plc"].write_register, 12, 4321, device_id=1)
        await wait_async(lambda: changes.values == [12, 4321], "the changed value", timeout=STATUS_TIMEOUT)
        await subscription.delete()
        return changes.values

    assert run(tags_setup, session) == [12, 4321]


def test_device_listener_serves_plant_and_tags(plant_setup):
    async def session(client, index):
        plant_index = await client.get_namespace_index(PLANT_NAMESPACE)
        names = []
        for child in await client.nodes.objects.get_children():
            names.append(await child.read_browse_name())
        temperature = await client.get_node(ua.NodeId("Line1.Press.Temperature", plant_index)).read_value()
        tag_value = await client.get_node(ua.NodeId("Press1.UInt16", index)).read_data_value()
        return names, temperature, tag_value, index, plant_index

    wait_for(lambda: read_tag(plant_setup, "Press1.UInt16").StatusCode.is_good(), timeout=STATUS_TIMEOUT,
             what="a good value")
    names, temperature, tag_value, index, plant_index = run(plant_setup, session)
    assert ua.QualifiedName("Tags", index) in names
    assert ua.QualifiedName("Line1", plant_index) in names
    assert index != plant_index
    assert temperature == 21.5
    assert tag_value.Value.Value == 12
    assert tag_value.Value.VariantType == ua.VariantType.UInt16


def test_monitor_mode_forwards_denied_write(monitor_setup):
    write_float(monitor_setup, DENIED_TAG["name"], 7.0)
    assert plc_registers(monitor_setup["plc"], 110, 2) == words(struct.pack(">f", 7.0), "ABCD")
    (event,) = monitor_setup["gateway"].wait_for_events(
        lambda event: event.get("opcua", {}).get("service") == "write", what="the write's decision"
    )
    assert event["decision"] == "deny"
    assert event["enforced"] is False
    assert event["reason"].startswith("Modbus write denied: ")
    assert event["opcua"]["status"] == "Good"


class Statuses:
    """An asyncua subscription handler that keeps the status name and value
    of every data change."""

    def __init__(self):
        self.changes: list[tuple[str, object]] = []

    def datachange_notification(self, node, value, data) -> None:
        self.changes.append((data.monitored_item.Value.StatusCode.name, value))


def test_subscription_reports_lost_plc(tags_setup):
    name = "Press1.UInt16"
    wait_for(lambda: read_tag(tags_setup, name).StatusCode.is_good(), timeout=STATUS_TIMEOUT, what="a good value")

    async def session(client, index):
        statuses = Statuses()
        subscription = await client.create_subscription(100, statuses)
        await subscription.subscribe_data_change(client.get_node(ua.NodeId(name, index)))
        await wait_async(lambda: statuses.changes == [("Good", 12)], "the initial value")
        await asyncio.to_thread(tags_setup["plc_sim"].stop)
        await wait_async(
            lambda: statuses.changes == [("Good", 12), ("BadCommunicationError", None)],
            "BadCommunicationError after the PLC stopped", timeout=STATUS_TIMEOUT,
        )
        await subscription.delete()
        return statuses.changes

    assert run(tags_setup, session) == [("Good", 12), ("BadCommunicationError", None)]
