"""Event streaming to real collectors: `sluice collect` as its own process,
stopped and started again while traffic goes on, and Debian's rsyslogd
receiving syslog over TLS."""

import json
import socket
import subprocess

import mbap
from harness import (
    CollectorGateway,
    CollectServer,
    Rsyslog,
    connect_from,
    device,
    free_port,
    listener,
    make_certificates,
    modbus_client,
    rule_file,
    toml_table,
    wait_for,
)

DELIVERY_TIMEOUT = 60.0


def rules_for_loopback_one():
    """Vendor acme owns only 127.0.0.1, so 127.0.0.2 is an unknown client."""
    allow = {"device": "plc", "functions": ["read_holding_registers"], "addresses": ["0-999"]}
    return {"acme.toml": rule_file("acme", ["127.0.0.1/32"], [allow])}


def make_traffic(port: int, rounds: int) -> None:
    """Allowed reads, denied function 90, malformed reads and unknown clients."""
    for round_number in range(rounds):
        client = modbus_client(port)
        try:
            result = client.read_holding_registers(round_number, count=2, device_id=1)
            assert not result.isError(), result
        finally:
            client.close()

        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        reader = mbap.FrameReader(sock)
        try:
            sock.sendall(mbap.build_frame(1, 1, bytes([90])))
            assert reader.read_frame() == mbap.exception_frame(1, 1, 90, mbap.ILLEGAL_FUNCTION)
            # Quantity 0 breaks the read's limits: a malformed request.
            sock.sendall(mbap.build_frame(2, 1, mbap.read_request_pdu(3, 0, 0)))
            assert reader.read_frame() == mbap.exception_frame(2, 1, 3, mbap.ILLEGAL_DATA_VALUE)
        finally:
            sock.close()

        stranger = connect_from("127.0.0.2", port)
        stranger.settimeout(10)
        try:
            assert stranger.recv(1) == b""
        except ConnectionResetError:
            pass
        finally:
            stranger.close()


def collector_section(fields: dict) -> str:
    return toml_table("[[collector]]", fields)


def test_every_audited_event_reaches_a_restarted_collector(sluice_bin, plc_sim, tmp_path):
    certificates = make_certificates(tmp_path)
    collect_dir = tmp_path / "collect"
    collect_dir.mkdir()
    collect = CollectServer(sluice_bin, collect_dir, certificates)
    port = collect.port
    gateway_dir = tmp_path / "gateway"
    gateway_dir.mkdir()
    gateway = CollectorGateway(
        sluice_bin,
        gateway_dir,
        [listener(name="scada", device="plc")],
        [device("plc", plc_sim.address)],
        rules_for_loopback_one(),
        collector_section(
            {
                "name": "soc",
                "transport": "https",
                "url": f"https://127.0.0.1:{port}/events",
                "events": "all",
                "spool": "spool/soc",
                "tls": {"ca": str(certificates["ca"])},
                "batch_max": 20,
                "timeout_ms": 2000,
            }
        ),
    )
    try:
        make_traffic(gateway.port, 5)
        wait_for(lambda: len(collect.ids()) > 0, timeout=DELIVERY_TIMEOUT, what="first delivered events")

        collect.stop()
        make_traffic(gateway.port, 5)
        collect = CollectServer(sluice_bin, collect_dir, certificates, port=port)
        make_traffic(gateway.port, 5)

        # Every kind of event the traffic made is in the audit log.
        audited = gateway.events()
        kinds = {event["anomaly"]["kind"] for event in audited if event["event_type"] == "anomaly"}
        assert {"unknown_client", "malformed_request"} <= kinds
        assert any(event.get("decision") == "deny" for event in audited)
        assert any(event["event_type"] == "seal" for event in audited)
        expected = {event["id"] for event in audited}

        def all_delivered():
            missing = expected - set(collect.ids())
            return not missing

        wait_for(all_delivered, timeout=DELIVERY_TIMEOUT, what="every audited event id in the collector's file")
        stored = [json.loads(line) for line in collect.out.read_text().splitlines()]
        by_id = {event["id"]: event for event in stored}
        for event in audited:
            if event["event_type"] != "seal":
                continue
            assert by_id[event["id"]]["detail"] == event["detail"]
    finally:
        gateway.stop()
        collect.stop()


def test_rsyslog_receives_anomalies_as_json(sluice_bin, plc_sim, tmp_path):
    certificates = make_certificates(tmp_path)
    syslog_dir = tmp_path / "rsyslog"
    syslog_dir.mkdir()
    rsyslog = Rsyslog(syslog_dir, certificates, free_port())
    gateway = None
    try:
        rsyslog.wait_listening()
        gateway_dir = tmp_path / "gateway"
        gateway_dir.mkdir()
        gateway = CollectorGateway(
            sluice_bin,
            gateway_dir,
            [listener(name="scada", device="plc")],
            [device("plc", plc_sim.address)],
            rules_for_loopback_one(),
            collector_section(
                {
                    "name": "siem",
                    "transport": "syslog-tls",
                    "address": f"127.0.0.1:{rsyslog.port}",
                    "tls": {"ca": str(certificates["ca"])},
                }
            ),
        )
        make_traffic(gateway.port, 3)
        anomalies = gateway.wait_for_events(
            lambda event: event["event_type"] == "anomaly", count=6, what="anomalies"
        )
        expected = {event["id"] for event in gateway.events() if event["event_type"] in ("anomaly", "seal")}
        assert len(anomalies) >= 6

        def received():
            events = [json.loads(line) for line in rsyslog.messages()]
            ids = {event["id"] for event in events}
            return events if expected <= ids else None

        events = wait_for(received, timeout=DELIVERY_TIMEOUT, what="the anomaly ids in rsyslog's output")
        sent_types = {event["event_type"] for event in events}
        assert sent_types <= {"anomaly", "seal"}
        kinds = {event["anomaly"]["kind"] for event in events if event["event_type"] == "anomaly"}
        assert {"unknown_client", "malformed_request"} <= kinds
    finally:
        if gateway is not None:
            gateway.stop()
        rsyslog.stop()


def test_collect_rejects_a_body_that_is_not_an_event_array(sluice_bin, tmp_path):
    certificates = make_certificates(tmp_path)
    collect = CollectServer(sluice_bin, tmp_path, certificates)
    body = '{"id": "x"}'
    try:
        result = subprocess.run(
            ["openssl", "s_client", "-quiet", "-connect", f"127.0.0.1:{collect.port}",
             "-CAfile", str(certificates["ca"]), "-verify_return_error"],
            input=(
                "POST /events HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n{body}"
            ).encode(),
            capture_output=True,
            timeout=30,
        )
        assert result.stdout.startswith(b"HTTP/1.1 400 Bad Request\r\n"), result.stdout
        assert b"the body is not a JSON array" in result.stdout
        assert collect.ids() == []
    finally:
        collect.stop()
