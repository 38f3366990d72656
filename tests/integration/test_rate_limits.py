"""Token-bucket rate limits of a vendor and of a rule deny the excess with
exception 0x06 and let the rest through."""

import math
import time

from harness import LOOPBACK_SOURCES, device, listener, modbus_client, vendor_rule_file

SERVER_DEVICE_BUSY = 0x06


def start_rate_gateway(start_gateway, plc_sim, vendor_rate: dict | None, allows: list[dict]):
    vendor = {"name": "acme", "sources": LOOPBACK_SOURCES}
    if vendor_rate is not None:
        vendor["rate"] = vendor_rate
    rules = {"acme.toml": vendor_rule_file(vendor, allows)}
    return start_gateway([listener(device="plc")], [device("plc", plc_sim.address)], rules)


def timed_requests(count: int, send):
    """Call `send(i)` `count` times back to back.

    Returns the results and two durations: from the first send to the last
    response (the longest that the gateway's decisions can span) and from the
    first response to the last send (the shortest that they can span).
    """
    results = []
    sent_at = []
    responded_at = []
    for index in range(count):
        sent_at.append(time.monotonic())
        results.append(send(index))
        responded_at.append(time.monotonic())
    return results, responded_at[-1] - sent_at[0], sent_at[-1] - responded_at[0]


def exception_code(result) -> int | None:
    return result.exception_code if result.isError() else None


def test_vendor_rate_limits_reads(start_gateway, plc_sim):
    gateway = start_rate_gateway(
        start_gateway,
        plc_sim,
        {"requests_per_second": 5, "burst": 5},
        [{"device": "plc", "functions": ["read_holding_registers"], "addresses": ["0-99"]}],
    )

    client = modbus_client(gateway.port)
    try:
        results, longest, shortest = timed_requests(
            20, lambda index: client.read_holding_registers(index, count=1, device_id=1)
        )
    finally:
        client.close()

    codes = [exception_code(result) for result in results]
    allowed = [index for index, code in enumerate(codes) if code is None]
    # A full bucket of 5 tokens, then one more token every 200 ms.
    assert allowed[:5] == [0, 1, 2, 3, 4], codes
    assert 5 + math.floor(5 * shortest) <= len(allowed) <= 6 + math.floor(5 * longest), (
        f"{len(allowed)} of 20 reads allowed in {longest:.3f} s"
    )
    for index in allowed:
        assert results[index].registers == [index]
    assert [code for code in codes if code is not None] == [SERVER_DEVICE_BUSY] * (20 - len(allowed))

    denials = gateway.wait_for_events(
        lambda event: event.get("event_type") == "decision" and event.get("decision") == "deny",
        count=20 - len(allowed),
        what="rate limit denials",
    )
    assert len(denials) == 20 - len(allowed)
    for event in denials:
        assert event["reason"].startswith("rate limit of vendor acme"), event["reason"]
        assert event["modbus"]["exception"] == SERVER_DEVICE_BUSY
    assert [request["address"] for request in plc_sim.requests()] == allowed


def test_rule_rate_limits_writes_only(start_gateway, plc_sim):
    gateway = start_rate_gateway(
        start_gateway,
        plc_sim,
        None,
        [
            {"device": "plc", "functions": ["read_holding_registers"], "addresses": ["0-99"]},
            {
                "device": "plc",
                "functions": ["write_single_register"],
                "addresses": ["100-119"],
                "rate": {"writes_per_second": 2, "burst": 2},
            },
        ],
    )

    client = modbus_client(gateway.port)
    try:

        def write_then_read(index):
            written = client.write_register(100 + index, 1000 + index, device_id=1)
            read = client.read_holding_registers(index, count=1, device_id=1)
            return written, read

        results, longest, shortest = timed_requests(10, write_then_read)
    finally:
        client.close()

    write_codes = [exception_code(written) for written, _ in results]
    allowed_writes = [index for index, code in enumerate(write_codes) if code is None]
    # A full bucket of 2 write tokens, then one more every 500 ms.
    assert allowed_writes[:2] == [0, 1], write_codes
    assert 2 + math.floor(2 * shortest) <= len(allowed_writes) <= 3 + math.floor(2 * longest), (
        f"{len(allowed_writes)} of 10 writes allowed in {longest:.3f} s"
    )
    denied_codes = [code for code in write_codes if code is not None]
    assert denied_codes == [SERVER_DEVICE_BUSY] * (10 - len(allowed_writes))
    for index, (_, read) in enumerate(results):
        assert not read.isError(), f"read {index} was denied: {read}"
        assert read.registers == [index]

    denials = gateway.wait_for_events(
        lambda event: event.get("event_type") == "decision" and event.get("decision") == "deny",
        count=10 - len(allowed_writes),
        what="rule rate limit denials",
    )
    assert len(denials) == 10 - len(allowed_writes)
    for event in denials:
        assert event["reason"].startswith("rate limit of rule acme.toml#2"), event["reason"]
        assert event["modbus"]["function"] == 6
        assert event["modbus"]["exception"] == SERVER_DEVICE_BUSY
    plc_writes = [request["address"] for request in plc_sim.requests() if request["function"] == 6]
    assert plc_writes == [100 + index for index in allowed_writes]
