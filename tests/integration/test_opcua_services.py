"""OPC UA services that sluice mirrors beyond Read, Write and Call, with real
peers: an asyncua server with history and a folder of many children plays
the line controller (opcua_services_plant.py), an asyncua client is the
vendor. Covers HistoryRead with continuation points, Browse and BrowseNext
past the client's maximum references per node, rules that name browse-path
prefixes, and monitoring modes."""

from __future__ import annotations

import asyncio
import datetime
import subprocess
import sys
import time
from pathlib import Path

import pytest
from asyncua import Client, ua
from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256

import harness
from harness import vendor_rule_file
from test_opcua import CertificateAuthority, Plant, make_rsa_certificate, wait_async

NAMESPACE = "urn:plant:line1"
SLUICE_URI = "urn:sluice:test-gw"
VENDOR_URI = "urn:acme:engineering-laptop"
PASSWORD = "correct horse battery staple"
REQUEST_TIMEOUT = 10.0

# The plant's history, as opcua_services_plant.py stores it.
HISTORY_START = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
FLOW_HISTORY = [10.0, 11.5, 13.0, 12.25, 9.75]
HISTORY_PAGE = 2
ALL_REFERENCES = 0x3F


class ServicesPlant(Plant):
    """opcua_services_plant.py on a free loopback port, or on `port`."""

    def __init__(self, workdir: Path, port: int | None = None):
        self.port = port or harness.free_port()
        self.endpoint = f"opc.tcp://127.0.0.1:{self.port}/"
        self.process = harness.Process(
            [sys.executable, str(Path(__file__).with_name("opcua_services_plant.py")), str(self.port)],
            stderr_path=workdir / f"plant-{self.port}-{time.monotonic_ns()}.stderr",
        )
        line = self.process.read_line(timeout=30.0)
        if line != f"listening 127.0.0.1:{self.port}":
            self.process.stop()
            raise AssertionError(f"opcua_services_plant.py printed {line!r}")


def node(identifier: str) -> str:
    return f"nsu={NAMESPACE};s={identifier}"


def acme_rules() -> list[dict]:
    return [
        {
            "device": "line1-ua",
            "services": ["browse", "read", "subscribe"],
            "nodes": [node("Line1"), node("Line1.Press*"), node("Line1.Valves*"), node("Line1.Flow"),
                      node("Line1.Level"), node("Line2")],
        },
        {"device": "line1-ua", "services": ["history_read"], "nodes": [node("Line1.Flow")]},
    ]


def beta_rules() -> list[dict]:
    """Rules that name a subtree by its browse path instead of node ids."""
    return [{
        "device": "line1-ua",
        "services": ["browse", "read"],
        "nodes": [f"nsu={NAMESPACE};path=/Line1/Press"],
    }]


@pytest.fixture
def setup(sluice_bin, tmp_path):
    """The plant and sluice with one SignAndEncrypt OPC UA listener. The
    vendors acme and beta sign in as acme-eng and beta-eng, both with
    PASSWORD."""
    folder = tmp_path / "opcua"
    folder.mkdir()
    plant = ServicesPlant(folder)
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
        "device": "line1-ua",
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

    devices = [{"name": "line1-ua", "protocol": "opcua", "endpoint": plant.endpoint, "timeout_ms": 5000}]
    acme = {"name": "acme", "opcua_users": [{"username": "acme-eng", "password_hash": password_hash}]}
    beta = {"name": "beta", "opcua_users": [{"username": "beta-eng", "password_hash": password_hash}]}
    rules = {
        "acme.toml": vendor_rule_file(acme, acme_rules()),
        "beta.toml": vendor_rule_file(beta, beta_rules()),
    }
    gateway_folder = folder / "gateway"
    gateway_folder.mkdir()
    gateway = harness.Gateway(sluice_bin, gateway_folder, [listener], devices, rules)
    state = {
        "folder": folder,
        "gateway": gateway,
        "plant": plant,
        "endpoint": f"opc.tcp://127.0.0.1:{gateway.port}/",
        "client_certificate": client_certificate,
        "client_key": client_key,
    }
    try:
        yield state
    finally:
        gateway.stop()
        state["plant"].stop()


def run(setup, session, user: str = "acme-eng"):
    """Run `session(client, namespace_index)` in a connected session of
    `user` on sluice's SignAndEncrypt endpoint."""

    async def connect_and_run():
        client = Client(setup["endpoint"], timeout=REQUEST_TIMEOUT)
        client.application_uri = VENDOR_URI
        client.set_user(user)
        client.set_password(PASSWORD)
        await client.set_security(
            SecurityPolicyBasic256Sha256,
            certificate=str(setup["client_certificate"]),
            private_key=str(setup["client_key"]),
            mode=ua.MessageSecurityMode.SignAndEncrypt,
        )
        async with client:
            index = await client.get_namespace_index(NAMESPACE)
            return await session(client, index)

    return asyncio.run(connect_and_run())


def decisions(gateway, service: str) -> list[tuple[str, str, str]]:
    """The (decision, node id, status) of every decision event of `service`."""
    return [
        (event["decision"], event["opcua"]["node_id"], event["opcua"]["status"])
        for event in gateway.events()
        if event.get("event_type") == "decision" and event.get("opcua", {}).get("service") == service
    ]


def raw_details() -> ua.ReadRawModifiedDetails:
    details = ua.ReadRawModifiedDetails()
    details.IsReadModified = False
    details.StartTime = HISTORY_START
    details.EndTime = HISTORY_START + datetime.timedelta(days=1)
    details.NumValuesPerNode = 0
    details.ReturnBounds = False
    return details


async def history_read(client, details, nodes: list[ua.NodeId], points: list[bytes | None], release=False):
    """Send one HistoryRead request for `nodes` with their continuation points."""
    parameters = ua.HistoryReadParameters()
    parameters.HistoryReadDetails = details
    parameters.TimestampsToReturn = ua.TimestampsToReturn.Source
    parameters.ReleaseContinuationPoints = release
    for node_id, point in zip(nodes, points):
        value_id = ua.HistoryReadValueId()
        value_id.NodeId = node_id
        value_id.ContinuationPoint = point
        parameters.NodesToRead.append(value_id)
    return await client.uaclient.history_read(parameters)


def flow_samples(values: list[ua.DataValue]) -> list[tuple[float, datetime.datetime]]:
    return [(value.Value.Value, value.SourceTimestamp.replace(tzinfo=datetime.timezone.utc)) for value in values]


def expected_flow() -> list[tuple[float, datetime.datetime]]:
    return [
        (value, HISTORY_START + datetime.timedelta(seconds=offset))
        for offset, value in enumerate(FLOW_HISTORY)
    ]


def test_history_read_returns_device_values(setup):
    async def session(client, index):
        flow = client.get_node(ua.NodeId("Line1.Flow", index))
        return await flow.read_raw_history(HISTORY_START, HISTORY_START + datetime.timedelta(days=1))

    assert flow_samples(run(setup, session)) == expected_flow()
    # Five values in pages of two take three requests, each one decision.
    events = setup["gateway"].wait_for_events(
        lambda event: event.get("opcua", {}).get("service") == "history_read", count=3, what="history decisions"
    )
    assert len(events) == 3
    assert decisions(setup["gateway"], "history_read") == [("allow", node("Line1.Flow"), "Good")] * 3


def test_history_read_denies_only_forbidden_node(setup):
    async def session(client, index):
        flow = ua.NodeId("Line1.Flow", index)
        level = ua.NodeId("Line1.Level", index)
        first = await history_read(client, raw_details(), [flow, level], [None, None])
        released = await history_read(client, raw_details(), [flow], [first[0].ContinuationPoint], release=True)
        reused = await history_read(client, raw_details(), [flow], [first[0].ContinuationPoint])
        return first, released, reused

    first, released, reused = run(setup, session)
    assert first[0].StatusCode == ua.StatusCode(ua.StatusCodes.Good)
    assert flow_samples(first[0].HistoryData.DataValues) == expected_flow()[:HISTORY_PAGE]
    assert first[0].ContinuationPoint is not None
    assert first[1].StatusCode == ua.StatusCode(ua.StatusCodes.BadUserAccessDenied)
    assert first[1].ContinuationPoint is None
    assert released[0].StatusCode == ua.StatusCode(ua.StatusCodes.Good)
    assert reused[0].StatusCode == ua.StatusCode(ua.StatusCodes.BadContinuationPointInvalid)
    setup["gateway"].wait_for_events(
        lambda event: event.get("opcua", {}).get("service") == "history_read", count=2, what="history decisions"
    )
    assert decisions(setup["gateway"], "history_read") == [
        ("allow", node("Line1.Flow"), "Good"),
        ("deny", node("Line1.Level"), "BadUserAccessDenied"),
    ]


async def browse_in_pages(client, start: ua.NodeId, max_references: int) -> list[list[ua.ReferenceDescription]]:
    """Browse `start` forward over hierarchical references with at most
    `max_references` per response and follow BrowseNext to the end. Return
    the references of each response."""
    description = ua.BrowseDescription()
    description.NodeId = start
    description.BrowseDirection = ua.BrowseDirection.Forward
    description.ReferenceTypeId = ua.NodeId(ua.ObjectIds.HierarchicalReferences)
    description.IncludeSubtypes = True
    description.NodeClassMask = 0
    description.ResultMask = ALL_REFERENCES

    parameters = ua.BrowseParameters()
    # The null time stamp browses the current address space, not a view.
    parameters.View.Timestamp = ua.get_win_epoch()
    parameters.NodesToBrowse = [description]
    parameters.RequestedMaxReferencesPerNode = max_references

    (result,) = await client.uaclient.browse(parameters)
    result.StatusCode.check()
    pages = [result.References]

    # A folder of n references needs n / max_references pages; the bound
    # stops a server that never ends its continuation points.
    for _ in range(100):
        if not result.ContinuationPoint:
            return pages
        following = ua.BrowseNextParameters()
        # asyncua releases the points by default instead of continuing.
        following.ReleaseContinuationPoints = False
        following.ContinuationPoints = [result.ContinuationPoint]
        (result,) = await client.uaclient.browse_next(following)
        result.StatusCode.check()
        pages.append(result.References)
    raise AssertionError("BrowseNext did not end within 100 pages")


def names(references: list[ua.ReferenceDescription]) -> list[str]:
    return [reference.BrowseName.Name for reference in references]


def test_browse_next_returns_rest_of_folder(setup):
    async def session(client, index):
        return await browse_in_pages(client, ua.NodeId("Line1.Valves", index), 2)

    pages = run(setup, session)
    assert [len(page) for page in pages] == [2, 2, 1]
    valves = [name for page in pages for name in names(page)]
    assert valves == ["Valve1", "Valve2", "Valve3", "Valve4", "Valve5"]
    # BrowseNext continues the decided Browse and records nothing new.
    setup["gateway"].wait_for_events(
        lambda event: event.get("opcua", {}).get("service") == "browse", what="the browse decision"
    )
    assert decisions(setup["gateway"], "browse") == [("allow", node("Line1.Valves"), "Good")]


def test_browse_next_pages_objects_folder(setup):
    async def session(client, index):
        objects = ua.NodeId(ua.ObjectIds.ObjectsFolder)
        whole = await browse_in_pages(client, objects, 0)
        paged = await browse_in_pages(client, objects, 2)
        return whole, paged

    whole, paged = run(setup, session)
    assert len(whole) == 1
    assert all(len(page) <= 2 for page in paged)
    flat = [name for page in paged for name in names(page)]
    assert flat == names(whole[0])
    assert flat.count("Line1") == 1
    assert flat.count("Line2") == 1


class Changes:
    """An asyncua subscription handler that keeps every data change."""

    def __init__(self):
        self.values: list = []

    def datachange_notification(self, node, value, data) -> None:
        self.values.append(value)


def test_disabled_item_is_silent_until_reporting(setup):
    async def session(client, index):
        temperature = client.get_node(ua.NodeId("Line1.Press.Temperature", index))
        paused, watching = Changes(), Changes()
        paused_subscription = await client.create_subscription(100, paused)
        watching_subscription = await client.create_subscription(100, watching)
        await paused_subscription.subscribe_data_change(temperature)
        await watching_subscription.subscribe_data_change(temperature)
        await wait_async(lambda: paused.values == [21.5] and watching.values == [21.5], "the initial values")

        disabled = await paused_subscription.set_monitoring_mode(ua.MonitoringMode.Disabled)
        await asyncio.to_thread(setup["plant"].write, "Line1.Press.Temperature", 30.0)
        # The other subscription samples the same node, so its report of the
        # change shows that the sample reached sluice.
        await wait_async(lambda: watching.values == [21.5, 30.0], "the change on the sampling item")
        while_disabled = list(paused.values)

        reporting = await paused_subscription.set_monitoring_mode(ua.MonitoringMode.Reporting)
        await wait_async(lambda: paused.values == [21.5, 30.0], "the change after Reporting")
        return disabled, while_disabled, reporting, list(paused.values)

    disabled, while_disabled, reporting, after = run(setup, session)
    assert disabled == [ua.StatusCode(ua.StatusCodes.Good)]
    assert while_disabled == [21.5]
    assert reporting == [ua.StatusCode(ua.StatusCodes.Good)]
    assert after == [21.5, 30.0]


def test_path_prefix_allows_subtree_only(setup):
    async def session(client, index):
        inside = await client.get_node(ua.NodeId("Line1.Press.Temperature", index)).read_value()
        press = await client.get_node(ua.NodeId("Line1.Press", index)).read_browse_name()
        denied = []
        for name in ["Line1", "Line1.Setpoint", "Line2.Speed"]:
            try:
                await client.get_node(ua.NodeId(name, index)).read_value()
            except ua.uaerrors.BadUserAccessDenied:
                denied.append(name)
        return inside, press.Name, denied

    stderr = setup["gateway"].workdir / "gateway.stderr"
    harness.wait_for(lambda: "browse path resolved" in stderr.read_text(), what="the browse path resolution")
    inside, press, denied = run(setup, session, user="beta-eng")
    assert inside == 21.5
    assert press == "Press"
    assert denied == ["Line1", "Line1.Setpoint", "Line2.Speed"]


def resolutions(setup) -> int:
    """The number of browse paths sluice has resolved, from its log."""
    stderr = setup["gateway"].workdir / "gateway.stderr"
    return stderr.read_text().count("browse path resolved")


async def read_outcomes(client, index, names: list[str]) -> dict[str, object]:
    """Read each node's value; map its name to the value or the error's name."""
    outcomes = {}
    for name in names:
        try:
            outcomes[name] = await client.get_node(ua.NodeId(name, index)).read_value()
        except ua.uaerrors.UaStatusCodeError as error:
            outcomes[name] = type(error).__name__
    return outcomes


def test_reload_resolves_changed_path(setup):
    harness.wait_for(lambda: resolutions(setup) >= 1, what="the first browse path resolution")
    names = ["Line1.Press.Temperature", "Line2.Speed"]

    async def session(client, index):
        return await read_outcomes(client, index, names)

    before = run(setup, session, user="beta-eng")
    rules = setup["gateway"].workdir / "rules" / "beta.toml"
    rules.write_text(rules.read_text().replace("path=/Line1/Press", "path=/Line2"))
    harness.send_hangup(setup["gateway"])
    harness.wait_for(lambda: resolutions(setup) >= 2, what="the browse path resolution after the reload")
    after = run(setup, session, user="beta-eng")

    assert before == {"Line1.Press.Temperature": 21.5, "Line2.Speed": "BadUserAccessDenied"}
    assert after == {"Line1.Press.Temperature": "BadUserAccessDenied", "Line2.Speed": 7.0}


def test_reconnect_resolves_path_again(setup):
    harness.wait_for(lambda: resolutions(setup) >= 1, what="the first browse path resolution")
    port = setup["plant"].port
    setup["plant"].stop()
    setup["plant"] = ServicesPlant(setup["folder"], port)
    harness.wait_for(lambda: resolutions(setup) >= 2, timeout=30.0, what="the browse path resolution after the reconnect")

    async def session(client, index):
        return await read_outcomes(client, index, ["Line1.Press.Temperature", "Line1.Setpoint"])

    outcomes = run(setup, session, user="beta-eng")
    assert outcomes == {"Line1.Press.Temperature": 21.5, "Line1.Setpoint": "BadUserAccessDenied"}


CHECK_GATEWAY_TOML = """\
[gateway]
name = "paths"
timezone = "UTC"
rules = "rules"

[[listener]]
name = "north"
protocol = "modbus"
bind = "127.0.0.1:0"
device = "plc"

[[device]]
name = "plc"
address = "127.0.0.1:1502"
unit = 1

[[device]]
name = "line1-ua"
protocol = "opcua"
endpoint = "opc.tcp://127.0.0.1:4840"

[audit]
path = "audit"
"""

CHECK_ACME_TOML = """\
[vendor]
name = "acme"
sources = ["127.0.0.0/8"]

[[allow]]
device = "line1-ua"
services = ["read"]
nodes = ["nsu=urn:plant:line1;path=/Line1//Press"]
"""


def test_check_points_at_empty_browse_name(sluice_bin, tmp_path):
    (tmp_path / "gateway.toml").write_text(CHECK_GATEWAY_TOML)
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "acme.toml").write_text(CHECK_ACME_TOML)

    completed = subprocess.run(
        [sluice_bin, "check", "--config", "gateway.toml"],
        cwd=tmp_path, capture_output=True, text=True, timeout=30,
    )

    assert completed.returncode == 1, completed.stderr
    lines = (completed.stdout + completed.stderr).splitlines()
    problems = [line for line in lines if line.startswith("rules/acme.toml:") or "acme.toml:" in line]
    assert len(problems) == 1, lines
    # Line 8 is the `nodes` line; column 43 is the second "/" of "//".
    location, message = problems[0].split(": ", 1)
    assert location.endswith("acme.toml:8:43")
    assert message.startswith('allow[1].nodes[1]: empty browse name in browse path "/Line1//Press"'), message
