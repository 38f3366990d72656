"""Denied requests get the contract's exception codes and never reach the PLC,
except in monitor mode, where they are forwarded and recorded as not enforced."""

from harness import acme_rules, device, listener, modbus_client

RULES = acme_rules(
    {"device": "plc", "functions": ["read_holding_registers"], "addresses": ["0-999"]},
    {
        "device": "plc",
        "functions": ["write_single_register"],
        "addresses": ["100-119"],
        "values": "0-5000",
    },
)

# An allowed read sent last: once the PLC logs it, every request forwarded
# before it on the single upstream connection has been logged too.
SENTINEL = {"unit": 1, "function": 3, "address": 999, "quantity": 1}


def read_sentinel(client):
    result = client.read_holding_registers(999, count=1, device_id=1)
    assert result.registers == [999]


def direct_registers(plc_sim, address, count):
    client = modbus_client(plc_sim.port)
    try:
        return client.read_holding_registers(address, count=count, device_id=1).registers
    finally:
        client.close()


def test_denied_writes_get_exceptions(start_gateway, plc_sim):
    gateway = start_gateway(
        [listener(device="plc")],
        [device("plc", plc_sim.address, max_connections=1)],
        RULES,
    )

    client = modbus_client(gateway.port)
    try:
        function_denied = client.write_coil(5, True, device_id=1)
        address_denied = client.write_register(200, 7, device_id=1)
        value_denied = client.write_register(105, 6000, device_id=1)
        read_sentinel(client)
    finally:
        client.close()

    assert function_denied.isError()
    assert function_denied.exception_code == 0x01
    assert address_denied.isError()
    assert address_denied.exception_code == 0x02
    assert value_denied.isError()
    assert value_denied.exception_code == 0x03

    assert plc_sim.wait_for_requests(1) == [SENTINEL]
    assert direct_registers(plc_sim, 105, 1) == [105]
    assert direct_registers(plc_sim, 200, 1) == [200]


def test_allowed_write_reaches_plc(start_gateway, plc_sim):
    gateway = start_gateway([listener(device="plc")], [device("plc", plc_sim.address)], RULES)

    client = modbus_client(gateway.port)
    try:
        written = client.write_register(119, 5000, device_id=1)
    finally:
        client.close()

    assert not written.isError(), written
    assert written.address == 119
    assert written.registers == [5000]
    assert plc_sim.wait_for_requests(1)[0]["function"] == 6
    assert direct_registers(plc_sim, 119, 1) == [5000]


def test_monitor_mode_forwards_denied_write(start_gateway, plc_sim):
    gateway = start_gateway(
        [listener(name="watch", device="plc", mode="monitor")],
        [device("plc", plc_sim.address)],
        acme_rules({"device": "plc", "functions": ["read_holding_registers"], "addresses": ["0-999"]}),
    )

    client = modbus_client(gateway.port)
    try:
        written = client.write_register(50, 1234, device_id=1)
    finally:
        client.close()

    assert not written.isError(), written
    assert written.registers == [1234]
    assert direct_registers(plc_sim, 50, 1) == [1234]

    (event,) = gateway.wait_for_events(
        lambda event: event.get("event_type") == "decision", what="decision events"
    )
    assert event["decision"] == "deny"
    assert event["enforced"] is False
    assert event["listener"] == "watch"
    assert event["vendor"] == "acme"
    assert event["device"] == "plc"
    assert event["modbus"]["function"] == 6
    assert event["modbus"]["function_name"] == "write_single_register"
    assert event["modbus"]["address"] == 50
    assert "rule" not in event
