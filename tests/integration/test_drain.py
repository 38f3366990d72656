"""SIGTERM drains the gateway: a request in flight still gets its response,
the audit log is sealed and verifies, and the process exits 0."""

import socket
import struct
import subprocess

from harness import (
    Gateway,
    acme_rules,
    device,
    listener,
    wait_for,
    write_config,
)

RULES = acme_rules(
    {"device": "plc", "functions": ["read_holding_registers"], "addresses": ["0-999"]},
)

# The request waits for the silent PLC until this timeout, so it is still in
# flight when SIGTERM arrives.
TIMEOUT_MS = 1500


class SealedGateway(Gateway):
    """`sluice run` on a configuration whose audit log has a sealing key."""

    def __init__(self, sluice_bin, workdir, listeners, devices, rules):
        self.workdir = workdir
        self.name = "test-gw"
        self.config_path = write_config(workdir, listeners, devices, rules)
        init = subprocess.run(
            [sluice_bin, "audit", "init", "--config", str(self.config_path)],
            check=True,
            capture_output=True,
            text=True,
            timeout=30,
        )
        self.verification_key = init.stdout.strip()
        self._launch(sluice_bin, len(listeners))


def read_frame(connection: socket.socket) -> bytes:
    header = b""
    while len(header) < 7:
        chunk = connection.recv(7 - len(header))
        assert chunk, "connection closed before a response header"
        header += chunk
    (length,) = struct.unpack(">H", header[4:6])
    body = b""
    while len(body) < length - 1:
        chunk = connection.recv(length - 1 - len(body))
        assert chunk, "connection closed inside a response"
        body += chunk
    return header + body


def test_sigterm_answers_in_flight_and_seals(sluice_bin, silent_plc, tmp_path):
    gateway = SealedGateway(
        sluice_bin,
        tmp_path,
        [listener(device="plc")],
        [device("plc", silent_plc.address, timeout_ms=TIMEOUT_MS)],
        RULES,
    )
    try:
        connection = socket.create_connection(("127.0.0.1", gateway.port), timeout=10)
        request = struct.pack(">HHHBBHH", 0x4242, 0, 6, 1, 3, 10, 2)
        connection.sendall(request)
        wait_for(lambda: silent_plc.received >= 12, what="the request at the silent PLC")

        gateway.process.popen.terminate()
        response = read_frame(connection)
        assert response == struct.pack(">HHHBBB", 0x4242, 0, 3, 1, 0x83, 0x0B)
        assert connection.recv(1) == b""
        connection.close()

        assert gateway.process.popen.wait(timeout=30) == 0
    finally:
        gateway.stop()

    events = gateway.events()
    assert events[-1]["event_type"] == "seal"
    stops = [event for event in events if event["event_type"] == "system" and event.get("action") == "stop"]
    assert len(stops) == 1
    session_close = [
        event for event in events if event["event_type"] == "session" and event.get("action") == "close"
    ]
    assert [event["reason"] for event in session_close] == ["gateway shutting down"]

    verify = subprocess.run(
        [sluice_bin, "audit", "verify", "--config", str(gateway.config_path), "--key-file", "-"],
        input=gateway.verification_key + "\n",
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
