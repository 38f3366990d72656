"""Replay the client side of real Modbus/TCP captures through sluice to the
simulated PLC."""

import hashlib
from pathlib import Path

import pytest

import mbap
import pcap_replay
from harness import acme_rules, device, listener

# The corpus sits in shared/ next to the checkout, in development and in CI.
REPO = Path(__file__).resolve().parents[2]
CORPUS = REPO.parent / "shared" / "corpus" / "pcap"

DEVICE_UNIT = 1

# Functions whose plc-sim log entry carries an address and a quantity taken
# straight from the request.
ADDRESSED_FUNCTIONS = (1, 2, 3, 4, 15, 16)

ALLOW_EVERYTHING = {
    "device": "plc",
    "functions": list(range(1, 128)),
    "addresses": ["0-65535"],
    "sub_functions": list(mbap.DIAGNOSTIC_SUB_FUNCTIONS),
}


def modbus_captures() -> list[Path]:
    if not CORPUS.is_dir():
        return []
    return [path for path in sorted(CORPUS.glob("*.pcap")) if pcap_replay.carries_modbus(path)]


CAPTURES = modbus_captures()


def test_corpus_digests():
    """The corpus is present and unchanged, so the replay tests see the same traffic."""
    sums = (CORPUS / "SHA256SUMS").read_text().split("\n")
    listed = [line.split() for line in sums if line.strip()]
    assert len(listed) == len(list(CORPUS.glob("*.pcap")))
    for digest, name in listed:
        assert hashlib.sha256((CORPUS / name).read_bytes()).hexdigest() == digest, name
    assert len(CAPTURES) > 0


def log_projection(entry: dict) -> dict:
    """Keep the log fields that a request determines independently of plc-sim's choices."""
    kept = {"unit": entry["unit"], "function": entry["function"]}
    if entry["function"] in ADDRESSED_FUNCTIONS:
        kept["address"] = entry["address"]
        kept["quantity"] = entry["quantity"]
    return kept


def expected_log_entry(frame: mbap.Frame) -> dict:
    entry = {"unit": DEVICE_UNIT, "function": frame.function}
    if frame.function in ADDRESSED_FUNCTIONS:
        address, quantity = frame.pdu[1] << 8 | frame.pdu[2], frame.pdu[3] << 8 | frame.pdu[4]
        entry["address"] = address
        entry["quantity"] = quantity
    return entry


@pytest.mark.parametrize("capture", CAPTURES, ids=[path.name for path in CAPTURES])
def test_replay_capture(start_gateway, plc_sim, capture):
    # One upstream connection keeps the PLC's log in the order of the replay.
    gateway = start_gateway(
        [listener(device="plc", limits={"frame_timeout_ms": 5000})],
        [device("plc", plc_sim.address, unit=DEVICE_UNIT, max_connections=1)],
        acme_rules(ALLOW_EVERYTHING),
    )
    streams = pcap_replay.read_client_streams(capture)
    assert streams, f"{capture.name} has no client stream towards port 502"

    expected_log: list[dict] = []
    for index, stream in enumerate(streams):
        label = f"{capture.name} stream {index} from {stream.source[0]}:{stream.source[1]}"
        assert not stream.truncated, f"{label} has a sequence gap"
        result = pcap_replay.replay_stream(gateway.port, stream, label)
        expected_log += [expected_log_entry(frame) for frame in result.forwarded]

    logged = [log_projection(entry) for entry in plc_sim.wait_for_requests(len(expected_log), timeout=30)]
    assert len(logged) == len(expected_log)
    assert logged == expected_log
