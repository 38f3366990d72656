"""Session limits: connections over a vendor's or a listener's limit are
closed at once, and idle or half-sent connections are closed on time."""

import socket
import time

import mbap
from harness import LOOPBACK_SOURCES, device, listener, vendor_rule_file

READ_RULE = {"device": "plc", "functions": ["read_holding_registers"], "addresses": ["0-99"]}


def start_session_gateway(start_gateway, plc_sim, vendor: dict | None = None, **listener_fields):
    vendor_fields = {"name": "acme", "sources": LOOPBACK_SOURCES, **(vendor or {})}
    rules = {"acme.toml": vendor_rule_file(vendor_fields, [READ_RULE])}
    return start_gateway(
        [listener(name="north", device="plc", **listener_fields)],
        [device("plc", plc_sim.address)],
        rules,
    )


class Connection:
    """A raw client connection with a frame reader."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.port = self.sock.getsockname()[1]
        self.reader = mbap.FrameReader(self.sock)

    def read_registers(self, transaction_id: int, address: int, count: int) -> bytes | None:
        self.sock.sendall(mbap.build_frame(transaction_id, 1, mbap.read_request_pdu(3, address, count)))
        return self.reader.read_frame()

    def close(self) -> None:
        self.sock.close()


def session_events(gateway, port: int) -> list[dict]:
    return [
        event
        for event in gateway.events()
        if event.get("event_type") == "session" and event.get("src_port") == port
    ]


def assert_third_connection_rejected(gateway, plc_sim, reason: str) -> None:
    """Open three connections and check that the first two work and the third is closed at once."""
    admitted = [Connection(gateway.port) for _ in range(2)]
    third = None
    try:
        for index, connection in enumerate(admitted):
            answer = connection.read_registers(0x10 + index, index, 1)
            assert answer == mbap.holding_registers_response(0x10 + index, 1, [index])

        third = Connection(gateway.port)
        assert third.reader.read_until_close(timeout=5) == b""
    finally:
        for connection in admitted + ([third] if third else []):
            connection.close()

    (reject,) = gateway.wait_for_events(
        lambda event: event.get("event_type") == "session" and event.get("src_port") == third.port,
        what="session event of the third connection",
    )
    assert reject["action"] == "reject"
    assert reject["reason"] == reason
    assert reject["listener"] == "north"
    assert reject["vendor"] == "acme"
    assert reject["src_ip"] == "127.0.0.1"
    assert len(plc_sim.requests()) == 2


def test_vendor_max_sessions_rejects_third(start_gateway, plc_sim):
    gateway = start_session_gateway(start_gateway, plc_sim, vendor={"max_sessions": 2})
    assert_third_connection_rejected(gateway, plc_sim, "vendor acme already has 2 sessions")


def test_source_connection_limit_rejects_third(start_gateway, plc_sim):
    gateway = start_session_gateway(start_gateway, plc_sim, limits={"max_connections_per_source": 2})
    assert_third_connection_rejected(
        gateway, plc_sim, "source 127.0.0.1 already has 2 connections to listener north"
    )


def test_idle_connection_closed(start_gateway, plc_sim):
    gateway = start_session_gateway(start_gateway, plc_sim, limits={"idle_timeout_ms": 300})
    connection = Connection(gateway.port)
    try:
        started = time.monotonic()
        assert connection.read_registers(0x0001, 7, 1) == mbap.holding_registers_response(0x0001, 1, [7])
        assert connection.reader.read_until_close(timeout=5) == b""
        elapsed = time.monotonic() - started
    finally:
        connection.close()

    assert elapsed >= 0.3, f"closed after {elapsed:.3f} s, before the 300 ms idle timeout"
    events = gateway.wait_for_events(
        lambda event: event.get("event_type") == "session" and event.get("src_port") == connection.port,
        count=2,
        what="open and close events",
    )
    assert [event["action"] for event in events] == ["open", "close"]
    assert events[1]["reason"] == "idle timeout"
    assert events[1]["session_id"] == events[0]["session_id"]


def test_unfinished_frame_closes_connection(start_gateway, plc_sim):
    gateway = start_session_gateway(start_gateway, plc_sim, limits={"frame_timeout_ms": 300})
    frame = mbap.build_frame(0x0002, 1, mbap.read_request_pdu(3, 0, 1))
    connection = Connection(gateway.port)
    try:
        started = time.monotonic()
        # The MBAP header and the function code, without address and quantity.
        connection.sock.sendall(frame[:8])
        assert connection.reader.read_until_close(timeout=5) == b""
        elapsed = time.monotonic() - started
    finally:
        connection.close()

    assert elapsed >= 0.3, f"closed after {elapsed:.3f} s, before the 300 ms frame timeout"
    (anomaly,) = gateway.wait_for_events(
        lambda event: event.get("event_type") == "anomaly" and event.get("src_port") == connection.port,
        what="incomplete_frame anomaly",
    )
    assert anomaly["anomaly"]["kind"] == "incomplete_frame"
    assert anomaly["anomaly"]["detail"] == "frame not completed within 300 ms"
    assert anomaly["vendor"] == "acme"
    events = gateway.wait_for_events(
        lambda event: event.get("event_type") == "session" and event.get("src_port") == connection.port,
        count=2,
        what="open and close events",
    )
    assert [event["action"] for event in events] == ["open", "close"]
    assert events[1]["reason"] == "frame not completed in time"
    assert anomaly["session_id"] == events[0]["session_id"]
    assert plc_sim.requests() == []
