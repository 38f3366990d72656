"""The Prometheus endpoint of a running gateway counts a scripted session
exactly, and client input never becomes a label value."""

import socket
import struct
import urllib.request

from harness import (
    Gateway,
    acme_rules,
    connect_from,
    device,
    listener,
    modbus_client,
    write_config,
)

RULES = acme_rules(
    {"device": "plc", "functions": ["read_holding_registers"], "addresses": ["0-999"]},
    sources=["127.0.0.1/32"],
)


class MetricsGateway(Gateway):
    """`sluice run` with a `[metrics]` endpoint on a port the system picks."""

    def __init__(self, sluice_bin, workdir, listeners, devices, rules):
        self.workdir = workdir
        self.name = "test-gw"
        self.config_path = write_config(workdir, listeners, devices, rules)
        with self.config_path.open("a") as config:
            config.write('\n[metrics]\nbind = "127.0.0.1:0"\n')
        self._launch(sluice_bin, len(listeners) + 1)


def scrape(port: int) -> list[str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        content_type = response.headers["Content-Type"]
        assert content_type.startswith("application/openmetrics-text")
        return response.read().decode().splitlines()


def raw_request(port: int, pdu: bytes, transaction_id: int = 7) -> bytes:
    """Send one frame carrying `pdu` to unit 1 and return the reply frame."""
    frame = struct.pack(">HHHB", transaction_id, 0, len(pdu) + 1, 1) + pdu
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(frame)
        return connection.recv(260)


def request_line(function: str, decision: str, count: int) -> str:
    return (
        f'sluice_requests_total{{listener="north",vendor="acme",device="plc",'
        f'function="{function}",decision="{decision}"}} {count}'
    )


def test_scripted_session_counts_exactly(sluice_bin, plc_sim, tmp_path):
    gateway = MetricsGateway(
        sluice_bin,
        tmp_path,
        [listener(device="plc")],
        [device("plc", plc_sim.address, max_connections=1)],
        RULES,
    )
    try:
        client = modbus_client(gateway.ports["north"])
        try:
            for _ in range(3):
                assert client.read_holding_registers(10, count=2, device_id=1).registers == [10, 11]
            denied = client.write_register(100, 1, device_id=1)
            assert denied.exception_code == 0x01
            denied = client.write_register(101, 1, device_id=1)
            assert denied.exception_code == 0x01
        finally:
            client.close()

        # A function code from the client that the specification does not
        # define: it is denied and must be counted under "other".
        reply = raw_request(gateway.ports["north"], bytes([0x5A, 0xDE, 0xAD]))
        assert reply == struct.pack(">HHHBBB", 7, 0, 3, 1, 0xDA, 0x01)

        # A connection from a source that matches no vendor.
        stranger = connect_from("127.0.0.2", gateway.ports["north"])
        assert stranger.recv(1) == b""
        stranger.close()

        lines = scrape(gateway.ports["metrics"])
    finally:
        gateway.stop()

    assert request_line("read_holding_registers", "allow", 3) in lines
    assert request_line("write_single_register", "deny", 2) in lines
    assert request_line("other", "deny", 1) in lines
    assert 'sluice_sessions_rejected_total{listener="north",reason="unknown_source"} 1' in lines
    assert 'sluice_request_duration_seconds_count{device="plc"} 3' in lines
    assert 'sluice_build_info{version="0.1.0"} 1' in lines

    request_series = [line for line in lines if line.startswith("sluice_requests_total{")]
    assert len(request_series) == 3, request_series
    assert all("0x5a" not in line.lower() and "90" not in line for line in request_series)
    assert lines[-1] == "# EOF"
