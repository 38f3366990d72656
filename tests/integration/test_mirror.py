"""The read-only mirror: sluice polls blocks of a device's tables and serves
reads inside a fresh block from memory, so those reads never reach the PLC."""

import socket
import subprocess
import struct

import pytest

import harness
from harness import acme_rules, device, listener, modbus_client, wait_for
from mbap import (
    GATEWAY_PATH_UNAVAILABLE,
    GATEWAY_TARGET_FAILED_TO_RESPOND,
    ILLEGAL_DATA_ADDRESS,
    ILLEGAL_FUNCTION,
    build_frame,
    read_request_pdu,
)
from test_metrics_scrape import MetricsGateway, scrape

# Blocks are polled every 100 ms; a value written on the PLC must show up in
# the mirror within this time.
MIRROR_TIMEOUT = 5.0

HOLDING_BLOCK = {"kind": "holding_register", "start": 0, "count": 200, "poll_ms": 100, "max_age_ms": 1000}
COIL_BLOCK = {"kind": "coil", "start": 0, "count": 100, "poll_ms": 100, "max_age_ms": 1000}
INPUT_BLOCK = {"kind": "input_register", "start": 1000, "count": 10, "poll_ms": 100, "max_age_ms": 1000}

# The reads that poll the blocks above, as the plc-sim logs them: the
# 200-register block is split at the specification's 125-register limit.
POLLS = [
    {"unit": 1, "function": 3, "address": 0, "quantity": 125},
    {"unit": 1, "function": 3, "address": 125, "quantity": 75},
    {"unit": 1, "function": 1, "address": 0, "quantity": 100},
    {"unit": 1, "function": 4, "address": 1000, "quantity": 10},
]

READ_RULE = {
    "device": "press-1",
    "functions": ["read_holding_registers", "read_input_registers", "read_coils"],
    "addresses": ["0-1999"],
}
WRITE_RULE = {
    "device": "press-1",
    "functions": ["write_single_register", "read_write_multiple_registers"],
    "addresses": ["0-1999"],
}


@pytest.fixture
def plc_direct(plc_sim):
    """A pymodbus client connected straight to the plc-sim, bypassing sluice."""
    client = modbus_client(plc_sim.port)
    yield client
    client.close()


def mirrored_device(plc_sim, blocks, **fields) -> dict:
    return device("press-1", plc_sim.address, timeout_ms=500, mirror=blocks, **fields)


def exchange(port: int, frame: bytes) -> bytes:
    """Send one request frame to 127.0.0.1:`port` and return the response frame."""
    with socket.create_connection(("127.0.0.1", port), timeout=5.0) as sock:
        sock.sendall(frame)
        header = receive(sock, 7)
        (length,) = struct.unpack(">H", header[4:6])
        return header + receive(sock, length - 1)


def receive(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise AssertionError(f"connection closed after {len(data)} of {size} bytes")
        data += chunk
    return data


def read_holding(client, address: int, count: int):
    return client.read_holding_registers(address, count=count, device_id=1)


def wait_for_register(client, address: int, value: int) -> None:
    """Wait until a read through `client` returns `value` at `address`."""

    def seen():
        result = read_holding(client, address, 1)
        return not result.isError() and result.registers == [value]

    wait_for(seen, timeout=MIRROR_TIMEOUT, what=f"register {address} = {value} through the mirror")


def wait_for_coil(client, address: int, value: bool) -> None:
    """Wait until a read through `client` returns `value` for coil `address`."""

    def seen():
        result = client.read_coils(address, count=1, device_id=1)
        return not result.isError() and result.bits[:1] == [value]

    wait_for(seen, timeout=MIRROR_TIMEOUT, what=f"coil {address} = {value} through the mirror")


def client_reads(plc_sim) -> list[dict]:
    """Return the reads in the plc-sim log that are not mirror polls."""
    return [request for request in plc_sim.requests() if request["function"] in (1, 2, 3, 4, 23) and request not in POLLS]


def decision_for(gateway, result) -> dict:
    (event,) = gateway.wait_for_events(
        lambda event: event.get("event_type") == "decision"
        and event["modbus"]["transaction_id"] == result.transaction_id,
        what=f"decision event of transaction {result.transaction_id}",
    )
    return event


def wait_for_block_state(gateway, action: str, block: str) -> None:
    gateway.wait_for_events(
        lambda event: event.get("event_type") == "state"
        and event.get("action") == action
        and event["detail"]["block"] == block,
        what=f"{action} of {block}",
    )


def test_reads_inside_blocks_never_reach_plc(start_gateway, plc_sim, plc_direct):
    blocks = [HOLDING_BLOCK, COIL_BLOCK, INPUT_BLOCK]
    gateway = start_gateway(
        [listener(device="press-1")],
        [mirrored_device(plc_sim, [{**block, "stale": "exception"} for block in blocks])],
        acme_rules(READ_RULE),
    )
    assert not plc_direct.write_register(10, 4242, device_id=1).isError()
    assert not plc_direct.write_coil(4, True, device_id=1).isError()
    client = modbus_client(gateway.port)
    try:
        # The blocks are polled on their own, so each must show its write.
        wait_for_register(client, 10, 4242)
        wait_for_coil(client, 4, True)
        registers = read_holding(client, 5, 10)
        across_pieces = read_holding(client, 120, 10)
        coils = client.read_coils(0, count=10, device_id=1)
        inputs = client.read_input_registers(1002, count=3, device_id=1)
    finally:
        client.close()

    assert registers.registers == [5, 6, 7, 8, 9, 4242, 11, 12, 13, 14]
    assert across_pieces.registers == list(range(120, 130))
    # Coils n <= 99 with n % 3 == 0 start on; coil 4 was switched on.
    assert coils.bits[:10] == [True, False, False, True, True, False, True, False, False, True]
    # Input register n starts at 30000 + n % 1000.
    assert inputs.registers == [30002, 30003, 30004]
    assert client_reads(plc_sim) == []
    logged = plc_sim.requests()
    for poll in POLLS:
        assert poll in logged, poll

    event = decision_for(gateway, registers)
    assert event["decision"] == "allow"
    assert event["served_by"] == "mirror"
    assert event["rule"] == "acme.toml#1"
    assert event["modbus"]["address"] == 5
    assert event["modbus"]["quantity"] == 10
    assert "exception" not in event["modbus"]


def test_served_response_bytes_equal_plc_response(start_gateway, plc_sim, plc_direct):
    gateway = start_gateway(
        [listener(device="press-1")],
        [mirrored_device(plc_sim, [{**HOLDING_BLOCK, "stale": "exception"}, {**COIL_BLOCK, "stale": "exception"}])],
        acme_rules(READ_RULE),
    )
    client = modbus_client(gateway.port)
    try:
        wait_for_register(client, 0, 0)
    finally:
        client.close()

    for function, address, quantity in [(3, 7, 125), (3, 199, 1), (1, 0, 100), (1, 93, 7)]:
        frame = build_frame(0x1234, 1, read_request_pdu(function, address, quantity))
        from_plc = exchange(plc_sim.port, frame)
        from_mirror = exchange(gateway.port, frame)
        assert from_mirror == from_plc, (function, address, quantity)
    assert client_reads(plc_sim) == [
        {"unit": 1, "function": 3, "address": 7, "quantity": 125},
        {"unit": 1, "function": 3, "address": 199, "quantity": 1},
        {"unit": 1, "function": 1, "address": 93, "quantity": 7},
    ]


def test_read_outside_blocks_is_forwarded(start_gateway, plc_sim):
    gateway = start_gateway(
        [listener(device="press-1")],
        [mirrored_device(plc_sim, [{**HOLDING_BLOCK, "stale": "exception"}])],
        acme_rules(READ_RULE),
    )
    client = modbus_client(gateway.port)
    try:
        wait_for_register(client, 0, 0)
        straddling = read_holding(client, 195, 10)
    finally:
        client.close()

    assert straddling.registers == list(range(195, 205))
    assert client_reads(plc_sim) == [{"unit": 1, "function": 3, "address": 195, "quantity": 10}]
    event = decision_for(gateway, straddling)
    assert event["decision"] == "allow"
    assert "served_by" not in event


def test_stale_block_forwards_when_configured(start_gateway, plc_sim):
    gateway = start_gateway(
        [listener(device="press-1")],
        [mirrored_device(plc_sim, [{**HOLDING_BLOCK, "stale": "forward"}])],
        acme_rules(READ_RULE),
    )
    wait_for_block_state(gateway, "mirror_fresh", "holding_register:0-199")
    plc_sim.stop()
    wait_for_block_state(gateway, "mirror_stale", "holding_register:0-199")

    client = modbus_client(gateway.port)
    try:
        result = read_holding(client, 0, 2)
    finally:
        client.close()

    # Forwarded to a PLC that is down: the pool cannot connect.
    assert result.isError()
    assert result.exception_code == GATEWAY_PATH_UNAVAILABLE
    event = decision_for(gateway, result)
    assert event["decision"] == "allow"
    assert "served_by" not in event
    assert "upstream" in event["detail"]


def test_stale_block_answers_exception_when_configured(start_gateway, plc_sim):
    # A long max_age_ms keeps the failed poll, not the age, as the reason.
    gateway = start_gateway(
        [listener(device="press-1")],
        [mirrored_device(plc_sim, [{**HOLDING_BLOCK, "stale": "exception", "max_age_ms": 60000}])],
        acme_rules(READ_RULE),
    )
    wait_for_block_state(gateway, "mirror_fresh", "holding_register:0-199")
    plc_sim.stop()
    wait_for_block_state(gateway, "mirror_stale", "holding_register:0-199")

    client = modbus_client(gateway.port)
    try:
        result = read_holding(client, 0, 2)
    finally:
        client.close()

    assert result.isError()
    assert result.exception_code == GATEWAY_TARGET_FAILED_TO_RESPOND
    event = decision_for(gateway, result)
    assert event["decision"] == "allow"
    assert event["served_by"] == "mirror"
    assert event["modbus"]["exception"] == GATEWAY_TARGET_FAILED_TO_RESPOND
    assert event["detail"] == {"mirror": "mirror block holding_register:0-199: the latest poll failed"}
    (unreachable,) = gateway.wait_for_events(
        lambda event: event.get("anomaly", {}).get("kind") == "device_unreachable",
        what="device_unreachable anomaly",
    )
    assert unreachable["device"] == "press-1"


def test_mirror_only_listener_sends_plc_only_polls(start_gateway, plc_sim):
    gateway = start_gateway(
        [listener(device="press-1", mirror_only=True)],
        [mirrored_device(plc_sim, [{**HOLDING_BLOCK, "stale": "forward"}])],
        acme_rules(READ_RULE, WRITE_RULE),
    )
    client = modbus_client(gateway.port)
    try:
        wait_for_register(client, 3, 3)
        inside = read_holding(client, 100, 5)
        write = client.write_register(5, 1, device_id=1)
        outside = read_holding(client, 300, 2)
        straddling = read_holding(client, 190, 20)
        other_table = client.read_input_registers(0, count=1, device_id=1)
        read_write = client.readwrite_registers(
            read_address=0, read_count=1, write_address=5, values=[9], device_id=1
        )
    finally:
        client.close()

    assert inside.registers == [100, 101, 102, 103, 104]
    assert write.exception_code == ILLEGAL_FUNCTION
    assert outside.exception_code == GATEWAY_PATH_UNAVAILABLE
    assert straddling.exception_code == GATEWAY_PATH_UNAVAILABLE
    assert other_table.exception_code == GATEWAY_PATH_UNAVAILABLE
    assert read_write.exception_code == ILLEGAL_FUNCTION
    assert [r for r in plc_sim.requests() if r not in POLLS] == []

    expected_reasons = [
        (write, "mirror_only listener: function 6 (write_single_register) is never forwarded to a device"),
        (outside, "mirror_only listener: holding_register 300-301 lies in no single mirror block"),
        (straddling, "mirror_only listener: holding_register 190-209 lies in no single mirror block"),
        (other_table, "mirror_only listener: input_register 0-0 lies in no single mirror block"),
        (read_write, "mirror_only listener: function 23 (read_write_multiple_registers) is never forwarded to a device"),
    ]
    for result, reason in expected_reasons:
        event = decision_for(gateway, result)
        assert event["decision"] == "deny", reason
        assert event["reason"] == reason
        assert event["modbus"]["exception"] == result.exception_code
    assert decision_for(gateway, inside)["served_by"] == "mirror"


def test_mirror_only_listener_refuses_stale_reads(start_gateway, plc_sim):
    gateway = start_gateway(
        [listener(device="press-1", mirror_only=True)],
        [mirrored_device(plc_sim, [{**HOLDING_BLOCK, "stale": "forward", "max_age_ms": 60000}])],
        acme_rules(READ_RULE),
    )
    wait_for_block_state(gateway, "mirror_fresh", "holding_register:0-199")
    plc_sim.stop()
    wait_for_block_state(gateway, "mirror_stale", "holding_register:0-199")

    client = modbus_client(gateway.port)
    try:
        result = read_holding(client, 0, 2)
    finally:
        client.close()

    assert result.exception_code == GATEWAY_TARGET_FAILED_TO_RESPOND
    event = decision_for(gateway, result)
    assert event["decision"] == "deny"
    assert event["reason"] == "mirror_only listener: mirror block holding_register:0-199: the latest poll failed"


def test_denied_read_on_mirrored_block_stays_denied(start_gateway, plc_sim):
    narrow = {**READ_RULE, "addresses": ["0-49"]}
    gateway = start_gateway(
        [listener(device="press-1")],
        [mirrored_device(plc_sim, [{**HOLDING_BLOCK, "stale": "exception"}])],
        acme_rules(narrow),
    )
    client = modbus_client(gateway.port)
    try:
        wait_for_register(client, 0, 0)
        denied = read_holding(client, 100, 10)
    finally:
        client.close()

    assert denied.exception_code == ILLEGAL_DATA_ADDRESS
    event = decision_for(gateway, denied)
    assert event["decision"] == "deny"
    assert "served_by" not in event
    assert client_reads(plc_sim) == []


def test_reload_replaces_mirror_pollers(start_gateway, plc_sim):
    gateway = start_gateway(
        [listener(device="press-1")],
        [mirrored_device(plc_sim, [{**HOLDING_BLOCK, "stale": "exception"}])],
        acme_rules(READ_RULE),
    )
    wait_for_block_state(gateway, "mirror_fresh", "holding_register:0-199")

    new_block = {"kind": "holding_register", "start": 500, "count": 20, "poll_ms": 100, "stale": "exception"}
    harness.write_config(
        gateway.workdir,
        [listener(device="press-1")],
        [mirrored_device(plc_sim, [new_block])],
        acme_rules(READ_RULE),
    )
    harness.send_hangup(gateway)
    gateway.wait_for_events(
        lambda event: event.get("event_type") == "config" and event.get("action") == "reload",
        what="reload event",
    )
    wait_for_block_state(gateway, "mirror_fresh", "holding_register:500-519")

    def polls_of(address: int) -> int:
        return sum(1 for r in plc_sim.requests() if r["function"] == 3 and r["address"] == address)

    old_polls = polls_of(0)
    new_polls = polls_of(500)
    # Five more polls of the new block span about 500 ms, five periods of the old one.
    wait_for(lambda: polls_of(500) >= new_polls + 5, timeout=MIRROR_TIMEOUT, what="five more polls of the new block")
    assert polls_of(0) == old_polls

    client = modbus_client(gateway.port)
    try:
        served = read_holding(client, 505, 2)
        old_block = read_holding(client, 10, 1)
    finally:
        client.close()
    assert served.registers == [505, 506]
    assert decision_for(gateway, served)["served_by"] == "mirror"
    assert old_block.registers == [10]
    assert "served_by" not in decision_for(gateway, old_block)


def check_config(sluice_bin, folder, listeners, devices) -> subprocess.CompletedProcess:
    harness.write_config(folder, listeners, devices, acme_rules(READ_RULE))
    return subprocess.run(
        [sluice_bin, "check", "--config", "gateway.toml"],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_check_reports_overlapping_blocks(sluice_bin, tmp_path):
    blocks = [
        {"kind": "holding_register", "start": 0, "count": 200},
        {"kind": "holding_register", "start": 150, "count": 10},
    ]
    completed = check_config(
        sluice_bin, tmp_path, [listener(device="press-1")], [device("press-1", "127.0.0.1:1502", mirror=blocks)]
    )

    assert completed.returncode == 1
    # Line 18 holds the device's mirror list; column 103 is the second block's start.
    assert completed.stdout.splitlines() == [
        "gateway.toml:18:103: device[1].mirror: holding_register block 150-159 overlaps block 0-199"
        " at gateway.toml:18:48; a block of one table may not overlap another"
    ]


def test_check_warns_mirror_only_without_blocks(sluice_bin, tmp_path):
    completed = check_config(
        sluice_bin,
        tmp_path,
        [listener(device="press-1", mirror_only=True)],
        [device("press-1", "127.0.0.1:1502")],
    )

    assert completed.returncode == 0, completed.stdout + completed.stderr
    # Line 12 is the listener's mirror_only key; column 15 is its value.
    assert completed.stdout.splitlines() == [
        "gateway.toml:12:15: listener[1].mirror_only: device \"press-1\" has no mirror blocks,"
        " so every request to it is denied; add a mirror list to the device",
        "gateway.toml: configuration valid",
    ]


def test_metrics_count_hits_and_block_age(sluice_bin, plc_sim, tmp_path):
    gateway = MetricsGateway(
        sluice_bin,
        tmp_path,
        [listener(device="press-1")],
        [mirrored_device(plc_sim, [{**HOLDING_BLOCK, "stale": "exception"}])],
        acme_rules(READ_RULE),
    )
    try:
        wait_for_block_state(gateway, "mirror_fresh", "holding_register:0-199")
        client = modbus_client(gateway.ports["north"])
        try:
            for address in (0, 50, 150):
                assert read_holding(client, address, 2).registers == [address, address + 1]
            assert read_holding(client, 199, 2).registers == [199, 200]
        finally:
            client.close()
        lines = scrape(gateway.ports["metrics"])
    finally:
        gateway.stop()

    assert 'sluice_mirror_reads_total{device="press-1",result="hit"} 3' in lines
    assert 'sluice_mirror_reads_total{device="press-1",result="outside"} 1' in lines
    assert 'sluice_mirror_reads_total{device="press-1",result="stale"} 0' in lines
    # Only the forwarded read waited for the device.
    assert 'sluice_request_duration_seconds_count{device="press-1"} 1' in lines
    (age,) = [line for line in lines if line.startswith("sluice_mirror_block_age_seconds{")]
    labels, value = age.rsplit(" ", 1)
    assert labels == 'sluice_mirror_block_age_seconds{device="press-1",block="holding_register:0-199"}'
    assert 0.0 <= float(value) < 1.0


def test_mirror_only_denies_in_monitor_mode(start_gateway, plc_sim):
    gateway = start_gateway(
        [listener(device="press-1", mirror_only=True, mode="monitor")],
        [mirrored_device(plc_sim, [{**HOLDING_BLOCK, "stale": "forward"}])],
        acme_rules(READ_RULE),
    )
    client = modbus_client(gateway.port)
    try:
        wait_for_register(client, 3, 3)
        write = client.write_register(5, 1, device_id=1)
    finally:
        client.close()

    assert write.exception_code == ILLEGAL_FUNCTION
    assert [r for r in plc_sim.requests() if r not in POLLS] == []
    event = decision_for(gateway, write)
    assert event["decision"] == "deny"
    assert "enforced" not in event
    # Monitor mode let the rules' denial through; the mirror_only denial
    # names both reasons and is enforced.
    assert event["reason"] == (
        "mirror_only listener: function 6 (write_single_register) is never forwarded to a device;"
        " rules: function 6 (write_single_register) not allowed"
    )
