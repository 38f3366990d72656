"""Decision and session events carry the contract's exact fields."""

import re
import socket

import mbap
from harness import acme_rules, device, listener

TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}(Z|\+00:00)$")


def test_allowed_read_events(start_gateway, plc_sim):
    gateway = start_gateway(
        [listener(name="scada", device="plc")],
        [device("plc", plc_sim.address)],
        acme_rules(
            {"device": "plc", "functions": ["read_holding_registers"], "addresses": ["0-999"]},
            {"device": "plc", "functions": ["write_single_register"], "addresses": ["100-119"]},
        ),
        name="edge-07",
    )

    sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=10)
    client_port = sock.getsockname()[1]
    reader = mbap.FrameReader(sock)
    try:
        sock.sendall(mbap.build_frame(0x2A17, 1, mbap.read_request_pdu(3, 20, 4)))
        answer = reader.read_frame()
    finally:
        sock.close()

    assert answer == mbap.holding_registers_response(0x2A17, 1, [20, 21, 22, 23])

    def from_client(event):
        return event.get("src_port") == client_port

    (decision,) = gateway.wait_for_events(
        lambda event: from_client(event) and event.get("event_type") == "decision",
        what="decision events",
    )
    assert decision["gateway"] == "edge-07"
    assert decision["listener"] == "scada"
    assert decision["vendor"] == "acme"
    assert decision["device"] == "plc"
    assert decision["src_ip"] == "127.0.0.1"
    assert decision["src_port"] == client_port
    assert decision["modbus"] == {
        "unit": 1,
        "function": 3,
        "function_name": "read_holding_registers",
        "address": 20,
        "quantity": 4,
        "transaction_id": 0x2A17,
    }
    assert decision["decision"] == "allow"
    assert decision["rule"] == "acme.toml#1"
    assert decision.get("enforced", True) is True
    assert "reason" not in decision
    assert TIMESTAMP.match(decision["timestamp"]), decision["timestamp"]

    sessions = gateway.wait_for_events(
        lambda event: from_client(event) and event.get("event_type") == "session",
        count=2,
        what="session events",
    )
    assert [event["action"] for event in sessions] == ["open", "close"]
    for event in sessions:
        assert event["session_id"] == decision["session_id"]
        assert event["listener"] == "scada"
        assert event["vendor"] == "acme"
        assert event["src_ip"] == "127.0.0.1"

    ids = [event["id"] for event in gateway.events()]
    assert len(ids) == len(set(ids))


def test_denied_write_event(start_gateway, plc_sim):
    gateway = start_gateway(
        [listener(name="scada", device="plc")],
        [device("plc", plc_sim.address)],
        acme_rules(
            {"device": "plc", "functions": ["read_holding_registers"], "addresses": ["0-999"]},
            {"device": "plc", "functions": ["write_single_register"], "addresses": ["100-119"]},
        ),
    )

    sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=10)
    client_port = sock.getsockname()[1]
    reader = mbap.FrameReader(sock)
    try:
        sock.sendall(mbap.build_frame(0x0302, 1, bytes([6, 0x01, 0x2C, 0x00, 0x07])))
        answer = reader.read_frame()
    finally:
        sock.close()

    # Address 300 is outside 100-119, the only range that names FC 6.
    assert answer == mbap.exception_frame(0x0302, 1, 6, 0x02)

    (decision,) = gateway.wait_for_events(
        lambda event: event.get("src_port") == client_port and event.get("event_type") == "decision",
        what="decision events",
    )
    assert decision["decision"] == "deny"
    assert decision["modbus"]["function"] == 6
    assert decision["modbus"]["function_name"] == "write_single_register"
    assert decision["modbus"]["address"] == 300
    assert decision["modbus"]["transaction_id"] == 0x0302
    assert decision.get("enforced", True) is True
    assert "rule" not in decision
    assert isinstance(decision["reason"], str)
    assert decision["reason"] != ""
    assert plc_sim.requests() == []
