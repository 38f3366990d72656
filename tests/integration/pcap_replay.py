"""Extract Modbus/TCP client streams from pcap files and replay them.

Each TCP stream towards port 502 is reassembled by sequence number, split into
MBAP frames and sent frame by frame to a gateway, which must send exactly one
response to every request, with the request's transaction id.
"""

from __future__ import annotations

import dataclasses
import socket
import struct
from pathlib import Path

import dpkt

import mbap

MODBUS_PORT = 502

# Link-layer types of pcap files (tcpdump.org LINKTYPE_* values).
LINKTYPE_NULL = 0
LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101
LINKTYPE_RAW_OPENBSD = 12
LINKTYPE_LINUX_SLL = 113

# A transaction id for the request that ends each replayed connection. It may
# repeat an id of the capture, which is harmless because responses are
# matched in order.
SENTINEL_TRANSACTION_ID = 0xFEED
SENTINEL_ADDRESS = 4321


@dataclasses.dataclass
class ClientStream:
    """The reassembled client-to-server bytes of one TCP connection."""

    source: tuple[str, int]
    destination: tuple[str, int]
    data: bytes
    # True when a sequence gap was found. `data` then stops before the gap.
    truncated: bool


@dataclasses.dataclass
class ReplayResult:
    # The frames a correct gateway forwards to the PLC, in order, with the
    # sentinel reads included.
    forwarded: list[mbap.Frame]
    answered: int
    closed: int


def _ip_packet(linktype: int, buffer: bytes):
    if linktype == LINKTYPE_ETHERNET:
        frame = dpkt.ethernet.Ethernet(buffer)
        return frame.data
    if linktype == LINKTYPE_NULL:
        return dpkt.loopback.Loopback(buffer).data
    if linktype in (LINKTYPE_RAW, LINKTYPE_RAW_OPENBSD):
        version = buffer[0] >> 4
        return dpkt.ip.IP(buffer) if version == 4 else dpkt.ip6.IP6(buffer)
    if linktype == LINKTYPE_LINUX_SLL:
        return dpkt.sll.SLL(buffer).data
    raise ValueError(f"unsupported pcap link type {linktype}")


def _address_text(packet) -> tuple[str, str]:
    if isinstance(packet, dpkt.ip.IP):
        return socket.inet_ntop(socket.AF_INET, packet.src), socket.inet_ntop(socket.AF_INET, packet.dst)
    return socket.inet_ntop(socket.AF_INET6, packet.src), socket.inet_ntop(socket.AF_INET6, packet.dst)


def _reassemble(segments: dict[int, bytes], initial_sequence: int) -> tuple[bytes, bool]:
    """Join segments keyed by sequence number, dropping retransmitted bytes.

    Sequence numbers are taken modulo 2**32 relative to `initial_sequence`,
    so a stream that wraps around is still ordered correctly.
    """
    ordered = sorted(
        ((sequence - initial_sequence) % 2**32, payload) for sequence, payload in segments.items()
    )
    data = bytearray()
    for offset, payload in ordered:
        if offset > len(data):
            return bytes(data), True
        overlap = len(data) - offset
        if overlap < len(payload):
            data += payload[overlap:]
    return bytes(data), False


def read_client_streams(path: Path, port: int = MODBUS_PORT) -> list[ClientStream]:
    """Return the client-to-server streams towards `port` in one pcap file.

    Streams appear in the order of their first packet. The initial sequence
    number comes from the SYN when the capture has it, otherwise from the
    lowest sequence number seen.
    """
    keys: list[tuple] = []
    segments: dict[tuple, dict[int, bytes]] = {}
    syn_sequence: dict[tuple, int] = {}
    with path.open("rb") as handle:
        reader = dpkt.pcap.Reader(handle)
        linktype = reader.datalink()
        for _, buffer in reader:
            try:
                packet = _ip_packet(linktype, buffer)
            except (dpkt.UnpackError, IndexError):
                continue
            if not isinstance(packet, (dpkt.ip.IP, dpkt.ip6.IP6)):
                continue
            segment = packet.data
            if not isinstance(segment, dpkt.tcp.TCP) or segment.dport != port:
                continue
            source, destination = _address_text(packet)
            key = (source, segment.sport, destination, segment.dport)
            if key not in segments:
                keys.append(key)
                segments[key] = {}
            if segment.flags & dpkt.tcp.TH_SYN:
                # A new SYN on the same four-tuple starts a new connection,
                # and the SYN itself takes one sequence number.
                if key in syn_sequence and segments[key]:
                    raise ValueError(f"{path.name}: four-tuple {key} is reused")
                syn_sequence[key] = (segment.seq + 1) % 2**32
            payload = bytes(segment.data)
            if payload:
                # Keep the longest payload seen at a sequence number, since a
                # retransmission may carry more bytes than the first try.
                known = segments[key].get(segment.seq, b"")
                if len(payload) > len(known):
                    segments[key][segment.seq] = payload

    streams = []
    for key in keys:
        if not segments[key]:
            continue
        initial = syn_sequence.get(key, min(segments[key]))
        data, truncated = _reassemble(segments[key], initial)
        streams.append(ClientStream((key[0], key[1]), (key[2], key[3]), data, truncated))
    return streams


def carries_modbus(path: Path) -> bool:
    return any(stream.data for stream in read_client_streams(path))


def sentinel_frame() -> bytes:
    return mbap.build_frame(
        SENTINEL_TRANSACTION_ID, 1, mbap.read_request_pdu(3, SENTINEL_ADDRESS, 1)
    )


class ReplayError(AssertionError):
    pass


def _expect_answer(reader: mbap.FrameReader, frame: mbap.Frame, check: mbap.Check, where: str) -> None:
    answer = reader.read_frame()
    if answer is None:
        raise ReplayError(f"{where}: connection closed instead of answering {frame.raw.hex()}")
    transaction_id, protocol_id, _, unit = struct.unpack_from(">HHHB", answer)
    if transaction_id != frame.transaction_id:
        raise ReplayError(
            f"{where}: answer has transaction id {transaction_id:#06x}, "
            f"request {frame.raw.hex()} has {frame.transaction_id:#06x}"
        )
    if protocol_id != 0:
        raise ReplayError(f"{where}: answer has protocol id {protocol_id}")
    if unit != frame.unit:
        raise ReplayError(f"{where}: answer has unit {unit}, request has {frame.unit}")
    function = answer[7]
    if check.verdict is mbap.Verdict.INVALID:
        expected = mbap.exception_frame(frame.transaction_id, frame.unit, frame.function, check.exception_code)
        if answer != expected:
            raise ReplayError(
                f"{where}: {check.detail}: expected {expected.hex()}, received {answer.hex()}"
            )
    elif function & 0x7F != frame.function:
        raise ReplayError(f"{where}: answer function {function:#04x} for request {frame.raw.hex()}")


def replay_stream(port: int, stream: ClientStream, label: str) -> ReplayResult:
    """Send one client stream to 127.0.0.1:`port` and check every response.

    Frames are sent one at a time. A frame that the checker says must close
    the connection is followed by a new connection when its boundary is
    known, and ends the replay of the stream otherwise. Each connection ends
    with a sentinel FC 3 read whose answer proves that no extra answer is
    still queued.
    """
    frames, _ = mbap.split_frames(stream.data)
    result = ReplayResult(forwarded=[], answered=0, closed=0)
    sock = None
    reader = None
    for index, frame in enumerate(frames):
        where = f"{label} frame {index}"
        if sock is None:
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            reader = mbap.FrameReader(sock)
        check = mbap.check_frame(frame)
        try:
            sock.sendall(frame.raw)
        except (BrokenPipeError, ConnectionResetError) as error:
            raise ReplayError(f"{where}: connection lost before sending {frame.raw.hex()}") from error

        if check.verdict is mbap.Verdict.CLOSE:
            try:
                received = reader.read_until_close()
            except TimeoutError as error:
                raise ReplayError(f"{where}: {check.detail}: connection still open") from error
            if received:
                raise ReplayError(f"{where}: {check.detail}: received {received.hex()} before close")
            sock.close()
            sock = None
            result.closed += 1
            if not mbap.MIN_MBAP_LENGTH <= frame.length <= mbap.MAX_MBAP_LENGTH:
                return result
            continue

        if check.verdict is mbap.Verdict.NO_RESPONSE:
            result.forwarded.append(frame)
            continue
        _expect_answer(reader, frame, check, where)
        result.answered += 1
        if check.verdict is mbap.Verdict.REQUEST:
            result.forwarded.append(frame)

    if sock is not None:
        sentinel = sentinel_frame()
        sock.sendall(sentinel)
        result.forwarded.append(mbap.split_frames(sentinel)[0][0])
        answer = reader.read_frame()
        expected = mbap.holding_registers_response(SENTINEL_TRANSACTION_ID, 1, [SENTINEL_ADDRESS])
        if answer != expected:
            raise ReplayError(
                f"{label}: sentinel answer {answer.hex() if answer else 'none'}, expected {expected.hex()}"
            )
        sock.close()
    return result
