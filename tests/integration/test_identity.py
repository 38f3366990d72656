"""A client whose source address matches no vendor is closed at accept."""

import socket

import pytest
from pymodbus.client import ModbusTcpClient
from pymodbus.exceptions import ModbusException

import mbap
from harness import acme_rules, device, listener

ALLOW_READS = {"device": "plc", "functions": ["read_holding_registers"], "addresses": ["0-999"]}


@pytest.fixture
def foreign_gateway(start_gateway, plc_sim):
    """A gateway whose only vendor may connect from 10.99.0.0/16, never from loopback."""
    return start_gateway(
        [listener(name="north", device="plc")],
        [device("plc", plc_sim.address)],
        acme_rules(ALLOW_READS, sources=["10.99.0.0/16"]),
    )


def test_unknown_source_closed_raw(foreign_gateway, plc_sim):
    sock = socket.create_connection(("127.0.0.1", foreign_gateway.port), timeout=10)
    client_port = sock.getsockname()[1]
    try:
        try:
            sock.sendall(mbap.build_frame(0x0101, 1, mbap.read_request_pdu(3, 0, 1)))
        except (BrokenPipeError, ConnectionResetError):
            pass
        received = mbap.FrameReader(sock).read_until_close()
    finally:
        sock.close()

    assert received == b""

    (reject,) = foreign_gateway.wait_for_events(
        lambda event: event.get("event_type") == "session" and event.get("src_port") == client_port,
        what="session events",
    )
    assert reject["action"] == "reject"
    assert reject["listener"] == "north"
    assert reject["src_ip"] == "127.0.0.1"
    assert "vendor" not in reject

    (anomaly,) = foreign_gateway.wait_for_events(
        lambda event: event.get("event_type") == "anomaly" and event.get("src_port") == client_port,
        what="anomaly events",
    )
    assert anomaly["anomaly"]["kind"] == "unknown_client"
    assert plc_sim.requests() == []


def test_unknown_source_pymodbus_no_response(foreign_gateway, plc_sim):
    # The TCP handshake may complete before the gateway closes the connection,
    # so pymodbus either fails to connect or gets no response to its request.
    client = ModbusTcpClient("127.0.0.1", port=foreign_gateway.port, timeout=3, retries=0)
    try:
        if client.connect():
            with pytest.raises((ModbusException, ConnectionError)):
                client.read_holding_registers(0, count=1, device_id=1)
    finally:
        client.close()

    foreign_gateway.wait_for_events(
        lambda event: event.get("event_type") == "session" and event.get("action") == "reject",
        what="session reject events",
    )
    assert plc_sim.requests() == []
