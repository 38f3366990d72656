"""Malformed and hostile frames over raw sockets: exact replies or a close, and
nothing of them at the PLC."""

import socket
import struct
import time

import pytest

import mbap
from harness import acme_rules, device, listener

UNIT = 1

RULES = acme_rules(
    {"device": "plc", "functions": ["read_coils", "read_holding_registers"], "addresses": ["0-999"]},
    {
        "device": "plc",
        "functions": ["write_multiple_registers", "read_write_multiple_registers"],
        "addresses": ["0-99"],
        "values": "0-5000",
    },
    {"device": "plc", "functions": ["diagnostics"], "sub_functions": [0]},
)

SENTINEL_ADDRESS = 999
SENTINEL_LOG = {"unit": UNIT, "function": 3, "address": SENTINEL_ADDRESS, "quantity": 1}


@pytest.fixture
def gateway(start_gateway, plc_sim):
    # One upstream connection keeps the PLC's log in the order of the requests.
    return start_gateway(
        [listener(device="plc", limits={"frame_timeout_ms": 5000})],
        [device("plc", plc_sim.address, max_connections=1)],
        RULES,
    )


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def send_ignoring_reset(sock: socket.socket, data: bytes) -> None:
    """Send `data`; the gateway may close the connection before it has read all of it."""
    try:
        sock.sendall(data)
    except (BrokenPipeError, ConnectionResetError):
        pass


def assert_only_sentinel_after(gateway, plc_sim, forwarded: list[dict]) -> None:
    """Read the sentinel register on a new connection, then check the PLC log.

    The PLC responds to the sentinel after every request forwarded before it
    on the single upstream connection, so the log is complete once it shows the
    sentinel.
    """
    sock = connect(gateway.port)
    try:
        sock.sendall(mbap.build_frame(0x5E57, UNIT, mbap.read_request_pdu(3, SENTINEL_ADDRESS, 1)))
        answer = mbap.FrameReader(sock).read_frame()
    finally:
        sock.close()
    assert answer == mbap.holding_registers_response(0x5E57, UNIT, [SENTINEL_ADDRESS])
    assert plc_sim.wait_for_requests(len(forwarded) + 1) == forwarded + [SENTINEL_LOG]


def header(transaction_id: int, protocol_id: int, length: int) -> bytes:
    return struct.pack(">HHH", transaction_id, protocol_id, length)


CLOSE_CASES = {
    "protocol_id_1": mbap.build_frame(0x0001, UNIT, mbap.read_request_pdu(3, 0, 1), protocol_id=1),
    "length_ffff_flood": header(0x0002, 0, 0xFFFF) + bytes([UNIT]) + b"\xAA" * 80_000,
    "length_1": header(0x0004, 0, 1) + bytes([UNIT]),
    "length_0": header(0x0005, 0, 0) + bytes([UNIT]),
    "exception_bit_function": mbap.build_frame(0x0006, UNIT, bytes([0x83, 0, 0, 0, 1])),
}


@pytest.mark.parametrize("frame", CLOSE_CASES.values(), ids=CLOSE_CASES.keys())
def test_framing_error_closes(gateway, plc_sim, frame):
    sock = connect(gateway.port)
    try:
        send_ignoring_reset(sock, frame)
        received = mbap.FrameReader(sock).read_until_close()
    finally:
        sock.close()

    assert received == b""
    assert_only_sentinel_after(gateway, plc_sim, [])


def test_lone_header_half_close(gateway, plc_sim):
    sock = connect(gateway.port)
    try:
        sock.sendall(header(0x0003, 0, 6))
        sock.shutdown(socket.SHUT_WR)
        received = mbap.FrameReader(sock).read_until_close()
    finally:
        sock.close()

    assert received == b""
    assert_only_sentinel_after(gateway, plc_sim, [])


# Each case: transaction id, request PDU, function code of the reply, exception code.
EXCEPTION_CASES = {
    "fc3_quantity_0": (0x0101, mbap.read_request_pdu(3, 0, 0), 3, 0x03),
    "fc3_quantity_128": (0x0102, mbap.read_request_pdu(3, 0, 128), 3, 0x03),
    "fc3_quantity_9c85": (0x0103, mbap.read_request_pdu(3, 0, 0x9C85), 3, 0x03),
    "fc1_quantity_2001": (0x0104, mbap.read_request_pdu(1, 0, 2001), 1, 0x03),
    "fc16_byte_count_3": (0x0105, bytes([0x10, 0, 0, 0, 2, 3, 0, 1, 2]), 0x10, 0x03),
    # A write quantity of 122 needs 244 value bytes, more than a PDU can hold,
    # so the frame carries two value bytes and stays within the MBAP limit.
    "fc23_write_quantity_122": (
        0x0106,
        bytes([0x17, 0, 0, 0, 1, 0, 0, 0, 122, 2, 0, 0]),
        0x17,
        0x03,
    ),
    "fc8_force_listen_only": (0x0107, bytes([8, 0, 4, 0, 0]), 8, 0x01),
    "function_90": (0x0108, bytes([90, 0, 0, 0, 1]), 90, 0x01),
    "function_0": (0x0109, bytes([0, 0, 0, 0, 1]), 0, 0x01),
}


@pytest.mark.parametrize("case", EXCEPTION_CASES.values(), ids=EXCEPTION_CASES.keys())
def test_invalid_request_gets_exception(gateway, plc_sim, case):
    transaction_id, pdu, function, code = case
    sock = connect(gateway.port)
    try:
        sock.sendall(mbap.build_frame(transaction_id, UNIT, pdu))
        answer = mbap.FrameReader(sock).read_frame()
    finally:
        sock.close()

    assert answer == mbap.exception_frame(transaction_id, UNIT, function, code)
    assert_only_sentinel_after(gateway, plc_sim, [])


def test_two_requests_one_segment(gateway, plc_sim):
    # The FC 16 MBAP length covers three bytes past the end its byte count gives.
    overlong_write = mbap.build_frame(0x0201, UNIT, bytes([0x10, 0, 0, 0, 1, 2, 0, 7]) + b"\x00\x00\x00")
    read = mbap.build_frame(0x0202, UNIT, mbap.read_request_pdu(3, 5, 2))
    sock = connect(gateway.port)
    reader = mbap.FrameReader(sock)
    try:
        sock.sendall(overlong_write + read)
        first = reader.read_frame()
        second = reader.read_frame()
    finally:
        sock.close()

    assert first == mbap.exception_frame(0x0201, UNIT, 0x10, 0x03)
    assert second == mbap.holding_registers_response(0x0202, UNIT, [5, 6])
    assert_only_sentinel_after(
        gateway, plc_sim, [{"unit": UNIT, "function": 3, "address": 5, "quantity": 2}]
    )


def test_frame_split_byte_by_byte(gateway, plc_sim):
    frame = mbap.build_frame(0x0301, UNIT, mbap.read_request_pdu(3, 30, 3))
    sock = connect(gateway.port)
    reader = mbap.FrameReader(sock)
    try:
        for byte in frame:
            sock.sendall(bytes([byte]))
            # A short pause so that each byte travels in its own segment.
            time.sleep(0.01)
        answer = reader.read_frame()
    finally:
        sock.close()

    assert answer == mbap.holding_registers_response(0x0301, UNIT, [30, 31, 32])
    assert_only_sentinel_after(
        gateway, plc_sim, [{"unit": UNIT, "function": 3, "address": 30, "quantity": 3}]
    )
