"""A PLC that cannot be reached gets 0x0A, one that stays silent gets 0x0B, and
a dead device behind one route does not disturb the others."""

from harness import acme_rules, device, free_port, listener, modbus_client, wait_for

GATEWAY_PATH_UNAVAILABLE = 0x0A
GATEWAY_TARGET_FAILED_TO_RESPOND = 0x0B


def read_allow(device_name):
    return {"device": device_name, "functions": ["read_holding_registers"], "addresses": ["0-999"]}


def test_stopped_plc_gets_0a(start_gateway):
    gateway = start_gateway(
        [listener(device="plc")],
        [device("plc", f"127.0.0.1:{free_port()}", timeout_ms=300)],
        acme_rules(read_allow("plc")),
    )

    client = modbus_client(gateway.port)
    try:
        first = client.read_holding_registers(0, count=2, device_id=1)
        second = client.read_holding_registers(0, count=2, device_id=1)
    finally:
        client.close()

    assert first.isError()
    assert first.exception_code == GATEWAY_PATH_UNAVAILABLE
    assert second.isError()
    assert second.exception_code == GATEWAY_PATH_UNAVAILABLE


def test_silent_plc_gets_0b(start_gateway, silent_plc):
    gateway = start_gateway(
        [listener(device="plc")],
        [device("plc", silent_plc.address, timeout_ms=300)],
        acme_rules(read_allow("plc")),
    )

    client = modbus_client(gateway.port)
    try:
        result = client.read_holding_registers(3, count=2, device_id=1)
    finally:
        client.close()

    assert result.isError()
    assert result.exception_code == GATEWAY_TARGET_FAILED_TO_RESPOND
    # The request did reach the silent PLC: one 12-byte FC 3 frame.
    wait_for(lambda: silent_plc.received >= 12, what="the request at the silent PLC")
    assert silent_plc.received == 12


def test_dead_route_keeps_live_route(start_gateway, plc_sim):
    gateway = start_gateway(
        [listener(routes={1: "dead", 2: "live"})],
        [
            device("dead", f"127.0.0.1:{free_port()}", timeout_ms=300),
            device("live", plc_sim.address, unit=1),
        ],
        acme_rules(read_allow("dead"), read_allow("live")),
    )

    client = modbus_client(gateway.port)
    try:
        outcomes = []
        for round_index in range(3):
            address = 10 * round_index
            dead = client.read_holding_registers(address, count=3, device_id=1)
            live = client.read_holding_registers(address, count=3, device_id=2)
            outcomes.append((dead, live, address))
    finally:
        client.close()

    for dead, live, address in outcomes:
        assert dead.isError()
        assert dead.exception_code == GATEWAY_PATH_UNAVAILABLE
        assert not live.isError(), live
        assert live.registers == [address, address + 1, address + 2]

    # The live device got the three reads with its own unit id.
    assert plc_sim.wait_for_requests(3) == [
        {"unit": 1, "function": 3, "address": 0, "quantity": 3},
        {"unit": 1, "function": 3, "address": 10, "quantity": 3},
        {"unit": 1, "function": 3, "address": 20, "quantity": 3},
    ]


def test_unrouted_unit_gets_0a(start_gateway, plc_sim):
    gateway = start_gateway(
        [listener(routes={2: "live"})],
        [device("live", plc_sim.address)],
        acme_rules(read_allow("live")),
    )

    client = modbus_client(gateway.port)
    try:
        result = client.read_holding_registers(0, count=1, device_id=9)
    finally:
        client.close()

    assert result.isError()
    assert result.exception_code == GATEWAY_PATH_UNAVAILABLE
    assert plc_sim.requests() == []
