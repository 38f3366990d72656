"""Anomaly detectors and containment, seen from a client of the real binary:
scans, bursts and dangerous requests raise their kinds, normal polling raises
none, and a vendor that trips its containment is quarantined."""

import socket
from pathlib import Path

import pytest

import mbap
import pcap_replay
from harness import (
    LOOPBACK_SOURCES,
    acme_rules,
    device,
    listener,
    modbus_client,
    rule_file,
    wait_for,
)

REPO = Path(__file__).resolve().parents[2]
CORPUS = REPO.parent / "shared" / "corpus" / "pcap"

# Kinds the detectors raise. Protocol anomalies such as malformed_request
# come from the codec and are not counted here.
DETECTOR_KINDS = {
    "function_scan",
    "unit_scan",
    "address_sweep",
    "denial_burst",
    "rate_limited",
    "dangerous_function",
    "gated_write_denied",
    "new_source",
    "device_unreachable",
    "device_timeout",
    "exception_storm",
    "vendor_quarantined",
    "outside_windows",
}

READS_ONLY = {"device": "plc", "functions": ["read_holding_registers"], "addresses": ["0-9999"]}

ALLOW_EVERYTHING = {
    "device": "plc",
    "functions": list(range(1, 128)),
    "addresses": ["0-65535"],
    "sub_functions": list(mbap.DIAGNOSTIC_SUB_FUNCTIONS),
}


def anomalies(gateway, kinds=DETECTOR_KINDS) -> list[dict]:
    return [
        event
        for event in gateway.events()
        if event["event_type"] == "anomaly" and event["anomaly"]["kind"] in kinds
    ]


def kinds_of(gateway, kind: str) -> list[dict]:
    return anomalies(gateway, {kind})


def wait_for_decisions(gateway, count: int) -> None:
    gateway.wait_for_events(lambda event: event["event_type"] == "decision", count, "decisions")


def exchange(sock: socket.socket, reader: mbap.FrameReader, frame: bytes) -> bytes:
    sock.sendall(frame)
    answer = reader.read_frame()
    assert answer is not None, f"connection closed instead of answering {frame.hex()}"
    return answer


def test_function_code_scan_raises_once(start_gateway, plc_sim):
    gateway = start_gateway(
        [listener(device="plc")], [device("plc", plc_sim.address)], acme_rules(READS_ONLY)
    )
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
        reader = mbap.FrameReader(sock)
        for function in range(1, 21):
            pdu = bytes([function]) + b"\x00\x00\x00\x01"
            answer = exchange(sock, reader, mbap.build_frame(function, 1, pdu))
            assert answer[7] & 0x7F == function
    wait_for_decisions(gateway, 20)

    scans = kinds_of(gateway, "function_scan")
    assert [event["anomaly"]["detail"] for event in scans] == [
        "9 distinct function codes within 10000 ms"
    ]
    assert scans[0]["anomaly"]["severity"] == "high"
    assert scans[0]["vendor"] == "acme"
    assert scans[0]["listener"] == "north"
    assert scans[0]["src_ip"] == "127.0.0.1"
    assert isinstance(scans[0]["session_id"], int)


def test_unit_sweep_raises_unit_scan(start_gateway, plc_sim):
    gateway = start_gateway(
        [listener(device="plc")], [device("plc", plc_sim.address)], acme_rules(READS_ONLY)
    )
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
        reader = mbap.FrameReader(sock)
        for unit in range(1, 13):
            exchange(sock, reader, mbap.build_frame(unit, unit, mbap.read_request_pdu(3, 0, 1)))
    wait_for_decisions(gateway, 12)

    assert [event["anomaly"]["detail"] for event in kinds_of(gateway, "unit_scan")] == [
        "9 distinct unit ids within 10000 ms"
    ]


def test_denied_requests_raise_denial_burst(start_gateway, plc_sim):
    gateway = start_gateway(
        [listener(device="plc")], [device("plc", plc_sim.address)], acme_rules(READS_ONLY)
    )
    client = modbus_client(gateway.port)
    try:
        for _ in range(25):
            assert client.write_register(5, 1, device_id=1).exception_code == 0x01
    finally:
        client.close()
    wait_for_decisions(gateway, 25)

    assert [event["anomaly"]["detail"] for event in kinds_of(gateway, "denial_burst")] == [
        "21 denied requests within 10000 ms"
    ]


def test_force_listen_only_raises_dangerous_function(start_gateway, plc_sim):
    gateway = start_gateway(
        [listener(device="plc")], [device("plc", plc_sim.address)], acme_rules(READS_ONLY)
    )
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
        reader = mbap.FrameReader(sock)
        answer = exchange(sock, reader, mbap.build_frame(7, 1, b"\x08\x00\x04\x00\x00"))
    assert answer == mbap.exception_frame(7, 1, 8, 0x01)

    found = gateway.wait_for_events(
        lambda event: event["event_type"] == "anomaly"
        and event["anomaly"]["kind"] == "dangerous_function",
        what="dangerous_function anomalies",
    )
    assert [event["anomaly"]["detail"] for event in found] == [
        "diagnostics sub-function 4: force listen only mode"
    ]
    assert found[0]["anomaly"]["severity"] == "high"


def test_normal_polling_raises_no_anomaly(start_gateway, plc_sim):
    gateway = start_gateway(
        [listener(device="plc")], [device("plc", plc_sim.address)], acme_rules(READS_ONLY)
    )
    client = modbus_client(gateway.port)
    try:
        for _ in range(100):
            assert client.read_holding_registers(100, count=10, device_id=1).registers == list(
                range(100, 110)
            )
    finally:
        client.close()
    wait_for_decisions(gateway, 100)

    assert anomalies(gateway) == []


def test_denial_burst_quarantines_vendor(start_gateway, plc_sim):
    rules = rule_file("acme", LOOPBACK_SOURCES, [READS_ONLY]) + (
        '\n[vendor.on_anomaly]\nkinds = ["denial_burst"]\ncount = 1\nwindow_ms = 60000\n'
    )
    gateway = start_gateway(
        [listener(device="plc")], [device("plc", plc_sim.address)], {"acme.toml": rules}
    )
    write = mbap.build_frame(1, 1, b"\x06\x00\x05\x00\x01")
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
        reader = mbap.FrameReader(sock)
        for _ in range(20):
            assert exchange(sock, reader, write) == mbap.exception_frame(1, 1, 6, 0x01)
        sock.sendall(write)
        assert reader.read_until_close() == mbap.exception_frame(1, 1, 6, 0x01)

    quarantined = gateway.wait_for_events(
        lambda event: event["event_type"] == "anomaly"
        and event["anomaly"]["kind"] == "vendor_quarantined",
        what="vendor_quarantined anomalies",
    )
    assert len(quarantined) == 1
    assert quarantined[0]["anomaly"]["severity"] == "critical"
    assert quarantined[0]["vendor"] == "acme"
    closes = gateway.wait_for_events(
        lambda event: event["event_type"] == "session" and event.get("action") == "close",
        what="session close events",
    )
    assert [event["reason"] for event in closes] == ["vendor quarantined"]

    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
        assert mbap.FrameReader(sock).read_until_close() == b""
    rejects = gateway.wait_for_events(
        lambda event: event["event_type"] == "session" and event.get("action") == "reject",
        what="session reject events",
    )
    assert [(event["vendor"], event["reason"]) for event in rejects] == [
        ("acme", "vendor quarantined")
    ]


def replay_capture(gateway, name: str) -> int:
    """Replay every client stream of capture `name`; returns the stream count."""
    streams = pcap_replay.read_client_streams(CORPUS / name)
    assert streams, f"{name} has no client stream towards port 502"
    for index, stream in enumerate(streams):
        pcap_replay.replay_stream(gateway.port, stream, f"{name} stream {index}")
    return len(streams)


def sentinel_answered(event: dict) -> bool:
    modbus = event.get("modbus") or {}
    return (
        event["event_type"] == "decision"
        and modbus.get("transaction_id") == pcap_replay.SENTINEL_TRANSACTION_ID
        and modbus.get("address") == pcap_replay.SENTINEL_ADDRESS
    )


def test_scan_capture_raises_function_scan(start_gateway, plc_sim):
    gateway = start_gateway(
        [listener(device="plc", limits={"frame_timeout_ms": 5000})],
        [device("plc", plc_sim.address, max_connections=1)],
        acme_rules(ALLOW_EVERYTHING),
    )
    replay_capture(gateway, "modbus_test_data_part2_fcscan.pcap")

    found = gateway.wait_for_events(
        lambda event: event["event_type"] == "anomaly"
        and event["anomaly"]["kind"] == "function_scan",
        what="function_scan anomalies",
    )
    assert found[0]["anomaly"]["severity"] == "high"


def test_polling_capture_raises_no_anomaly(start_gateway, plc_sim):
    gateway = start_gateway(
        [listener(device="plc", limits={"frame_timeout_ms": 5000})],
        [device("plc", plc_sim.address, max_connections=1)],
        acme_rules(ALLOW_EVERYTHING),
    )
    streams = replay_capture(gateway, "modbus_fc3_poll.pcap")
    gateway.wait_for_events(sentinel_answered, streams, "sentinel decisions")

    assert anomalies(gateway) == []


def test_connection_outside_every_window_raises_once(start_gateway, plc_sim):
    # The only rule of the vendor is limited to a maintenance visit that is
    # long over, so nothing it sends can be allowed.
    past_visit = dict(READS_ONLY, when={"window": ["2020-01-06T08:00/2020-01-06T12:00"]})
    gateway = start_gateway(
        [listener(device="plc")], [device("plc", plc_sim.address)], acme_rules(past_visit)
    )
    client = modbus_client(gateway.port)
    try:
        denied = client.read_holding_registers(100, count=1, device_id=1)
        assert denied.exception_code == 0x01
    finally:
        client.close()
    wait_for_decisions(gateway, 1)

    raised = kinds_of(gateway, "outside_windows")
    assert len(raised) == 1
    assert raised[0]["vendor"] == "acme"
    assert raised[0]["anomaly"]["severity"] == "medium"
    assert raised[0]["anomaly"]["detail"] == (
        "vendor acme connected while none of its rules' time windows is open"
    )


def test_unconditional_rule_raises_no_window_anomaly(start_gateway, plc_sim):
    gateway = start_gateway(
        [listener(device="plc")], [device("plc", plc_sim.address)], acme_rules(READS_ONLY)
    )
    client = modbus_client(gateway.port)
    try:
        assert client.read_holding_registers(100, count=1, device_id=1).registers == [100]
    finally:
        client.close()
    wait_for_decisions(gateway, 1)

    assert kinds_of(gateway, "outside_windows") == []


# Every anomaly kind each capture of the corpus raises when replayed through
# a rule that allows everything. Clean polling and write traffic raises
# none; the diagnostics capture and the function-code scan raise what their
# README entries describe.
CAPTURE_KINDS = {
    "ModbusTCP_pipelined.pcap": set(),
    "bro_modbusBig.pcap": set(),
    "bro_modbusSmall.pcap": set(),
    "mb2_mixed_ics.pcap": set(),
    "modbus_fc3_poll.pcap": set(),
    "modbus_test_2.pcap": set(),
    "modbus_test_multiclient_gw.pcap": set(),
    "modbus_test_data_part1.pcap": {"bad_length", "dangerous_function", "malformed_request"},
    "modbus_test_data_part2_fcscan.pcap": {
        "dangerous_function",
        "exception_storm",
        "function_scan",
        "malformed_request",
    },
}


def anomaly_kinds(gateway) -> set[str]:
    return {event["anomaly"]["kind"] for event in gateway.events() if event["event_type"] == "anomaly"}


@pytest.mark.parametrize("name", sorted(CAPTURE_KINDS))
def test_capture_raises_exact_kinds(start_gateway, plc_sim, name):
    gateway = start_gateway(
        [listener(device="plc", limits={"frame_timeout_ms": 5000})],
        [device("plc", plc_sim.address, max_connections=1)],
        acme_rules(ALLOW_EVERYTHING),
    )
    streams = replay_capture(gateway, name)
    expected = CAPTURE_KINDS[name]

    if expected:
        # Kinds are only ever added, so waiting until the set matches and
        # then comparing once more catches both a missing and an extra kind.
        wait_for(lambda: anomaly_kinds(gateway) >= expected, what=f"anomaly kinds {sorted(expected)}")
    else:
        gateway.wait_for_events(sentinel_answered, streams, "sentinel decisions")
    assert anomaly_kinds(gateway) == expected
