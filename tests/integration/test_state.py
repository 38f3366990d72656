"""Rules gated by an operational state follow the register or coil that sluice
polls on the PLC, and fail closed when the state cannot be read."""

import pytest

import harness
from harness import acme_rules, device, listener, modbus_client, wait_for

ILLEGAL_FUNCTION = 0x01

# A state that changes on the PLC must reach the policy within this time.
# The states below are polled every 100 ms.
STATE_TIMEOUT = 5.0


@pytest.fixture
def start_state_gateway(sluice_bin, tmp_path):
    """A factory that starts `sluice run` on a configuration with `[[state]]` entries."""
    started: list[harness.StateGateway] = []

    def start(plc_address: str, states: list[dict], rules: dict[str, str]) -> harness.StateGateway:
        folder = tmp_path / f"gateway-{len(started)}"
        folder.mkdir()
        gateway = harness.StateGateway(
            sluice_bin,
            folder,
            [listener(device="press-1")],
            [device("press-1", plc_address, timeout_ms=500)],
            states,
            rules,
        )
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        gateway.stop()


@pytest.fixture
def plc_direct(plc_sim):
    """A pymodbus client connected straight to the plc-sim, bypassing sluice."""
    client = modbus_client(plc_sim.port)
    yield client
    client.close()


def mode_state(**fields) -> dict:
    return {
        "name": "press-1-mode",
        "device": "press-1",
        "holding_register": 900,
        "poll_ms": 100,
        "values": {0: "production", 1: "maintenance"},
        **fields,
    }


def key_switch_state() -> dict:
    return {
        "name": "key-switch",
        "device": "press-1",
        "coil": 5,
        "poll_ms": 100,
        "values": {0: "locked", 1: "unlocked"},
    }


def gated_write_rule(state: str, value: str) -> dict:
    return {
        "device": "press-1",
        "functions": ["write_single_register"],
        "addresses": ["100-119"],
        "values": "0-5000",
        "when": {"state": {state: value}},
    }


def state_changes(gateway) -> list[tuple[str, str, str, int | None]]:
    """Return (state, old, new, raw) of every state change event so far."""
    return [
        (event["detail"]["state"], event["detail"]["old"], event["detail"]["new"], event["detail"]["raw"])
        for event in gateway.events()
        if event.get("event_type") == "state" and event.get("action") == "change"
    ]


def wait_for_state(gateway, state: str, new: str) -> None:
    """Wait until the latest change event of `state` names `new` as its value."""

    def latest_is_new():
        changes = [change for change in state_changes(gateway) if change[0] == state]
        return bool(changes) and changes[-1][2] == new

    wait_for(
        latest_is_new,
        timeout=STATE_TIMEOUT,
        what=f"state {state} to change to {new}",
    )


def write_through(gateway_client, address: int, value: int):
    return gateway_client.write_register(address, value, device_id=1)


def plc_register(plc_direct, address: int) -> int:
    result = plc_direct.read_holding_registers(address, count=1, device_id=1)
    assert not result.isError(), result
    return result.registers[0]


def decision_for(gateway, result) -> dict:
    """Wait for the decision event of the request that got `result` and return it."""
    (event,) = gateway.wait_for_events(
        lambda event: event.get("event_type") == "decision"
        and event["modbus"]["transaction_id"] == result.transaction_id,
        what=f"decision event of transaction {result.transaction_id}",
    )
    return event


def test_register_state_gates_write(start_state_gateway, plc_sim, plc_direct):
    # Register 900 of the plc-sim contains 900 at start, a value that the state
    # does not name. The value 0 is production.
    assert not plc_direct.write_register(900, 0, device_id=1).isError()
    gateway = start_state_gateway(
        plc_sim.address,
        [mode_state()],
        acme_rules(gated_write_rule("press-1-mode", "maintenance")),
    )
    wait_for_state(gateway, "press-1-mode", "production")
    client = modbus_client(gateway.port)
    try:
        in_production = write_through(client, 105, 1234)
        assert in_production.isError()
        assert in_production.exception_code == ILLEGAL_FUNCTION
        assert plc_register(plc_direct, 105) == 105

        # Maintenance reaches the policy within one poll or a few.
        assert not plc_direct.write_register(900, 1, device_id=1).isError()
        wait_for(
            lambda: not write_through(client, 105, 1234).isError(),
            timeout=STATE_TIMEOUT,
            what="the gated write to be allowed in maintenance",
        )
        assert plc_register(plc_direct, 105) == 1234

        # The policy can see maintenance before its change event reaches the
        # audit log. Waiting for that event first makes the next wait find the
        # change back to production, not the change from the start.
        wait_for_state(gateway, "press-1-mode", "maintenance")
        assert not plc_direct.write_register(900, 0, device_id=1).isError()
        wait_for_state(gateway, "press-1-mode", "production")
        back_in_production = write_through(client, 105, 2345)
        assert back_in_production.isError()
        assert back_in_production.exception_code == ILLEGAL_FUNCTION
        assert plc_register(plc_direct, 105) == 1234
    finally:
        client.close()

    assert state_changes(gateway) == [
        ("press-1-mode", "unknown", "production", 0),
        ("press-1-mode", "production", "maintenance", 1),
        ("press-1-mode", "maintenance", "production", 0),
    ]
    for event in gateway.events():
        if event.get("event_type") == "state":
            assert event["device"] == "press-1"
            assert event["gateway"] == "test-gw"
    for denied in (in_production, back_in_production):
        reason = decision_for(gateway, denied)["reason"]
        assert reason == "state press-1-mode is production, rule requires maintenance"


def test_stopped_plc_makes_state_unknown(start_state_gateway, plc_sim, plc_direct):
    assert not plc_direct.write_register(900, 1, device_id=1).isError()
    gateway = start_state_gateway(
        plc_sim.address,
        [mode_state(max_age_ms=300)],
        acme_rules(gated_write_rule("press-1-mode", "maintenance")),
    )
    wait_for_state(gateway, "press-1-mode", "maintenance")
    client = modbus_client(gateway.port)
    try:
        allowed = write_through(client, 110, 77)
        assert not allowed.isError(), allowed
        assert plc_register(plc_direct, 110) == 77

        plc_direct.close()
        plc_sim.stop()
        wait_for_state(gateway, "press-1-mode", "unknown")

        # An allowed request would get 0x0A now that the PLC is down, but the
        # policy denies this one first because the state it needs is unknown.
        denied = write_through(client, 110, 78)
        assert denied.isError()
        assert denied.exception_code == ILLEGAL_FUNCTION, (
            f"a write gated on an unknown state got exception {denied.exception_code:#04x}, expected 0x01"
        )
    finally:
        client.close()

    assert state_changes(gateway) == [
        ("press-1-mode", "unknown", "maintenance", 1),
        ("press-1-mode", "maintenance", "unknown", None),
    ]
    assert decision_for(gateway, denied)["reason"] == "state press-1-mode unknown"
    unknown = [
        event["anomaly"]
        for event in gateway.events()
        if event["event_type"] == "anomaly" and event["anomaly"]["kind"] == "state_unknown"
    ]
    assert unknown == [
        {
            "kind": "state_unknown",
            "severity": "medium",
            "detail": "state press-1-mode is unknown: no reading within 300 ms, "
            "or a value its map does not name",
        }
    ]


def test_coil_key_switch_gates_write(start_state_gateway, plc_sim, plc_direct):
    # Coil 5 of the plc-sim is off at start: the key switch is locked.
    gateway = start_state_gateway(
        plc_sim.address,
        [key_switch_state()],
        acme_rules(gated_write_rule("key-switch", "unlocked")),
    )
    wait_for_state(gateway, "key-switch", "locked")
    client = modbus_client(gateway.port)
    try:
        locked = write_through(client, 119, 500)
        assert locked.isError()
        assert locked.exception_code == ILLEGAL_FUNCTION
        assert plc_register(plc_direct, 119) == 119

        assert not plc_direct.write_coil(5, True, device_id=1).isError()
        wait_for(
            lambda: not write_through(client, 119, 500).isError(),
            timeout=STATE_TIMEOUT,
            what="the gated write to be allowed with the key switch unlocked",
        )
        assert plc_register(plc_direct, 119) == 500

        # As above: the unlocked event must be in the log before the wait for
        # locked can tell the new change from the first one.
        wait_for_state(gateway, "key-switch", "unlocked")
        assert not plc_direct.write_coil(5, False, device_id=1).isError()
        wait_for_state(gateway, "key-switch", "locked")
        locked_again = write_through(client, 119, 600)
        assert locked_again.isError()
        assert locked_again.exception_code == ILLEGAL_FUNCTION
        assert plc_register(plc_direct, 119) == 500
    finally:
        client.close()

    assert state_changes(gateway) == [
        ("key-switch", "unknown", "locked", 0),
        ("key-switch", "locked", "unlocked", 1),
        ("key-switch", "unlocked", "locked", 0),
    ]
    for denied in (locked, locked_again):
        assert decision_for(gateway, denied)["reason"] == "state key-switch is locked, rule requires unlocked"
