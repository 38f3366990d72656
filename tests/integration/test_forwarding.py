"""Allowed requests from real Modbus clients reach the PLC and come back exactly."""

import re
import subprocess
import threading

from harness import acme_rules, device, listener, modbus_client

READ_ALLOW = {
    "device": "plc",
    "functions": ["read_holding_registers", "read_input_registers"],
    "addresses": ["0-999"],
}

MBPOLL_VALUE = re.compile(r"^\[(\d+)\]:\s+(-?\d+)$")


def start_single_device(start_gateway, plc_sim, listener_fields=None, **device_fields):
    return start_gateway(
        [listener(device="plc", **(listener_fields or {}))],
        [device("plc", plc_sim.address, **device_fields)],
        acme_rules(READ_ALLOW),
    )


def test_fc3_read_pymodbus(start_gateway, plc_sim):
    gateway = start_single_device(start_gateway, plc_sim)

    client = modbus_client(gateway.port)
    try:
        result = client.read_holding_registers(10, count=5, device_id=1)
    finally:
        client.close()

    assert not result.isError(), result
    assert result.registers == [10, 11, 12, 13, 14]
    assert plc_sim.wait_for_requests(1) == [
        {"unit": 1, "function": 3, "address": 10, "quantity": 5}
    ]


def test_fc4_read_pymodbus(start_gateway, plc_sim):
    gateway = start_single_device(start_gateway, plc_sim)

    client = modbus_client(gateway.port)
    try:
        result = client.read_input_registers(997, count=3, device_id=1)
    finally:
        client.close()

    assert not result.isError(), result
    assert result.registers == [30997, 30998, 30999]


def test_fc3_read_mbpoll(start_gateway, plc_sim, mbpoll_bin):
    gateway = start_single_device(start_gateway, plc_sim)

    # mbpoll's -r is a 1-based reference, so -r 1 reads PDU addresses 0 to 4.
    completed = subprocess.run(
        [mbpoll_bin, "-m", "tcp", "-a", "1", "-r", "1", "-c", "5", "-t", "4", "-1",
         "-p", str(gateway.port), "127.0.0.1"],
        capture_output=True,
        text=True,
        timeout=30,
    )

    assert completed.returncode == 0, completed.stderr
    values = [
        (int(match.group(1)), int(match.group(2)))
        for match in map(MBPOLL_VALUE.match, completed.stdout.splitlines())
        if match
    ]
    assert values == [(1, 0), (2, 1), (3, 2), (4, 3), (5, 4)]
    assert plc_sim.wait_for_requests(1) == [
        {"unit": 1, "function": 3, "address": 0, "quantity": 5}
    ]


CLIENT_COUNT = 20
READS_PER_CLIENT = 25
REGISTERS_PER_READ = 8


def test_many_clients_share_one_connection(start_gateway, plc_sim):
    # All clients come from 127.0.0.1, so the per-source connection limit must
    # admit every one of them.
    gateway = start_single_device(
        start_gateway,
        plc_sim,
        listener_fields={"limits": {"max_connections_per_source": CLIENT_COUNT}},
        max_connections=1,
    )
    failures: list[str] = []
    results: dict[int, list[list[int]]] = {}
    start = threading.Barrier(CLIENT_COUNT)

    def run_client(index: int) -> None:
        # Client i owns addresses 40*i to 40*i+39 and reads them in five windows.
        base = 40 * index
        reads = []
        try:
            client = modbus_client(gateway.port, timeout=10)
        except AssertionError as error:
            failures.append(f"client {index}: {error}")
            return
        try:
            start.wait(timeout=30)
            for step in range(READS_PER_CLIENT):
                address = base + (step % 5) * REGISTERS_PER_READ
                result = client.read_holding_registers(address, count=REGISTERS_PER_READ, device_id=1)
                if result.isError():
                    failures.append(f"client {index} read {step} at {address}: {result}")
                    return
                reads.append((address, result.registers))
        except Exception as error:  # noqa: BLE001 - the thread reports any failure to the test
            failures.append(f"client {index}: {error!r}")
        finally:
            client.close()
        results[index] = reads

    threads = [threading.Thread(target=run_client, args=(index,)) for index in range(CLIENT_COUNT)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)

    assert not any(thread.is_alive() for thread in threads)
    assert failures == []
    for index in range(CLIENT_COUNT):
        reads = results[index]
        assert len(reads) == READS_PER_CLIENT
        for address, registers in reads:
            assert registers == list(range(address, address + REGISTERS_PER_READ)), (index, address)

    logged = plc_sim.wait_for_requests(CLIENT_COUNT * READS_PER_CLIENT)
    assert len(logged) == CLIENT_COUNT * READS_PER_CLIENT
    assert {entry["function"] for entry in logged} == {3}
