"""Modbus/TCP frames for the integration tests, written from the specifications
without using sluice's own code.

Limits come from the Modbus Application Protocol Specification V1.1b3 and the
Modbus Messaging on TCP/IP Implementation Guide V1.0b. The checker here is the
tests' independent opinion of what a well-formed request is.
"""

from __future__ import annotations

import dataclasses
import enum
import socket
import struct
import time

MBAP_HEADER_LEN = 7
# The MBAP length counts the unit id plus the PDU, and a PDU is at most 253 bytes.
MIN_MBAP_LENGTH = 2
MAX_MBAP_LENGTH = 254

EXCEPTION_BIT = 0x80

ILLEGAL_FUNCTION = 0x01
ILLEGAL_DATA_ADDRESS = 0x02
ILLEGAL_DATA_VALUE = 0x03
SERVER_DEVICE_BUSY = 0x06
GATEWAY_PATH_UNAVAILABLE = 0x0A
GATEWAY_TARGET_FAILED_TO_RESPOND = 0x0B

# Public function codes that the specification defines for Modbus/TCP.
KNOWN_FUNCTIONS = frozenset(
    [1, 2, 3, 4, 5, 6, 7, 8, 11, 12, 15, 16, 17, 20, 21, 22, 23, 24, 43]
)

# FC 8 sub-functions that the specification defines (section 6.8). The others
# are reserved.
DIAGNOSTIC_SUB_FUNCTIONS = (0, 1, 2, 3, 4, 10, 11, 12, 13, 14, 15, 16, 17, 18, 20)
FORCE_LISTEN_ONLY = 4

MEI_CANOPEN = 0x0D
MEI_READ_DEVICE_IDENTIFICATION = 0x0E


def build_frame(transaction_id: int, unit: int, pdu: bytes, protocol_id: int = 0) -> bytes:
    """Build an MBAP frame whose length field matches the PDU."""
    return struct.pack(">HHHB", transaction_id, protocol_id, len(pdu) + 1, unit) + pdu


def build_raw_frame(transaction_id: int, protocol_id: int, length: int, unit: int, pdu: bytes) -> bytes:
    """Build an MBAP frame with any length field, including a wrong one."""
    return struct.pack(">HHHB", transaction_id, protocol_id, length, unit) + pdu


def read_request_pdu(function: int, address: int, quantity: int) -> bytes:
    return struct.pack(">BHH", function, address, quantity)


def exception_frame(transaction_id: int, unit: int, function: int, code: int) -> bytes:
    """Return the exact bytes of an exception response."""
    return build_frame(transaction_id, unit, bytes([function | EXCEPTION_BIT, code]))


def holding_registers_response(transaction_id: int, unit: int, values: list[int]) -> bytes:
    """Return the exact bytes of an FC 3 response carrying `values`."""
    data = b"".join(struct.pack(">H", value) for value in values)
    return build_frame(transaction_id, unit, bytes([3, len(data)]) + data)


class Verdict(enum.Enum):
    """What a correct gateway does with one client frame."""

    # A request that gets exactly one response and is forwarded when a rule allows it.
    REQUEST = "request"
    # A well-formed request that by specification gets no response (FC 8
    # sub-function 4): forwarded when allowed, and the client gets no response.
    NO_RESPONSE = "no_response"
    # A frame whose PDU breaks its function's limits. Its response is an
    # exception with `exception_code`, and it is never forwarded.
    INVALID = "invalid"
    # A framing error after which the stream cannot be trusted: the gateway
    # closes the connection without a response.
    CLOSE = "close"


@dataclasses.dataclass(frozen=True)
class Frame:
    """One MBAP frame split from a client byte stream."""

    transaction_id: int
    protocol_id: int
    length: int
    unit: int
    # The PDU as sent: function code and data. Empty when the length is 1.
    pdu: bytes
    raw: bytes

    @property
    def function(self) -> int | None:
        return self.pdu[0] if self.pdu else None


@dataclasses.dataclass(frozen=True)
class Check:
    verdict: Verdict
    exception_code: int | None = None
    detail: str = ""


def split_frames(stream: bytes) -> tuple[list[Frame], bytes]:
    """Split a client byte stream into MBAP frames by their length fields.

    Returns the frames and the bytes left after the last frame that could be
    split. Splitting stops after a frame whose length is outside the MBAP
    limits, because its boundary cannot be trusted: that frame is returned
    with the rest of the stream as its PDU.
    """
    frames: list[Frame] = []
    offset = 0
    while len(stream) - offset >= MBAP_HEADER_LEN - 1:
        transaction_id, protocol_id, length = struct.unpack_from(">HHH", stream, offset)
        if not MIN_MBAP_LENGTH <= length <= MAX_MBAP_LENGTH:
            rest = stream[offset:]
            unit = rest[6] if len(rest) > 6 else 0
            frames.append(Frame(transaction_id, protocol_id, length, unit, rest[7:], rest))
            return frames, b""
        end = offset + 6 + length
        if end > len(stream):
            break
        raw = stream[offset:end]
        frames.append(Frame(transaction_id, protocol_id, length, raw[6], raw[7:], raw))
        offset = end
    return frames, stream[offset:]


def check_frame(frame: Frame) -> Check:
    """Classify one client frame by the specification's MBAP and PDU limits."""
    if frame.protocol_id != 0:
        return Check(Verdict.CLOSE, detail=f"protocol id {frame.protocol_id:#06x}")
    if not MIN_MBAP_LENGTH <= frame.length <= MAX_MBAP_LENGTH:
        return Check(Verdict.CLOSE, detail=f"MBAP length {frame.length}")
    function = frame.pdu[0]
    if function >= EXCEPTION_BIT:
        return Check(Verdict.CLOSE, detail=f"function code {function:#04x} has the exception bit")
    if function == 0:
        return Check(Verdict.INVALID, ILLEGAL_FUNCTION, "function code 0")
    if function not in KNOWN_FUNCTIONS:
        # sluice keeps an undefined function code as sent, so a rule may
        # allow it by number. The MBAP limits are then the only ones that apply.
        return Check(Verdict.REQUEST, detail=f"undefined function code {function}")
    return _check_known_pdu(function, frame.pdu[1:])


def _invalid(detail: str) -> Check:
    return Check(Verdict.INVALID, ILLEGAL_DATA_VALUE, detail)


def _check_known_pdu(function: int, data: bytes) -> Check:
    if function in (1, 2, 3, 4):
        return _check_read(function, data)
    if function in (5, 6):
        return _check_write_single(function, data)
    if function in (7, 11, 12, 17):
        if data:
            return _invalid(f"FC {function} carries {len(data)} data bytes")
        return Check(Verdict.REQUEST)
    if function == 8:
        return _check_diagnostics(data)
    if function == 15:
        return _check_write_multiple(data, max_quantity=0x07B0, bytes_for=lambda q: (q + 7) // 8)
    if function == 16:
        return _check_write_multiple(data, max_quantity=0x007B, bytes_for=lambda q: 2 * q)
    if function == 20:
        return _check_read_file_record(data)
    if function == 21:
        return _check_write_file_record(data)
    if function == 22:
        if len(data) != 6:
            return _invalid(f"FC 22 data length {len(data)}")
        return Check(Verdict.REQUEST)
    if function == 23:
        return _check_read_write_multiple(data)
    if function == 24:
        if len(data) != 2:
            return _invalid(f"FC 24 data length {len(data)}")
        return Check(Verdict.REQUEST)
    return _check_encapsulated_interface(data)


def _check_read(function: int, data: bytes) -> Check:
    if len(data) != 4:
        return _invalid(f"FC {function} data length {len(data)}")
    address, quantity = struct.unpack(">HH", data)
    max_quantity = 0x07D0 if function in (1, 2) else 0x007D
    if not 1 <= quantity <= max_quantity:
        return _invalid(f"FC {function} quantity {quantity}")
    if address + quantity > 0x10000:
        return Check(Verdict.INVALID, ILLEGAL_DATA_ADDRESS, f"FC {function} ends past 65535")
    return Check(Verdict.REQUEST)


def _check_write_single(function: int, data: bytes) -> Check:
    if len(data) != 4:
        return _invalid(f"FC {function} data length {len(data)}")
    (value,) = struct.unpack_from(">H", data, 2)
    if function == 5 and value not in (0x0000, 0xFF00):
        return _invalid(f"FC 5 coil value {value:#06x}")
    return Check(Verdict.REQUEST)


def _check_diagnostics(data: bytes) -> Check:
    if len(data) < 2:
        return _invalid("FC 8 without sub-function")
    (sub_function,) = struct.unpack_from(">H", data)
    body = data[2:]
    if sub_function not in DIAGNOSTIC_SUB_FUNCTIONS:
        return Check(Verdict.INVALID, ILLEGAL_FUNCTION, f"FC 8 reserved sub-function {sub_function}")
    if sub_function == 0:
        return Check(Verdict.REQUEST)
    if len(body) != 2:
        return _invalid(f"FC 8 sub-function {sub_function} data length {len(body)}")
    (value,) = struct.unpack(">H", body)
    if sub_function == 1:
        valid = value in (0x0000, 0xFF00)
    elif sub_function == 3:
        valid = value & 0x00FF == 0
    else:
        valid = value == 0
    if not valid:
        return _invalid(f"FC 8 sub-function {sub_function} data {value:#06x}")
    if sub_function == FORCE_LISTEN_ONLY:
        return Check(Verdict.NO_RESPONSE)
    return Check(Verdict.REQUEST)


def _check_write_multiple(data: bytes, max_quantity: int, bytes_for) -> Check:
    if len(data) < 5:
        return _invalid(f"write multiple data length {len(data)}")
    address, quantity, byte_count = struct.unpack_from(">HHB", data)
    if not 1 <= quantity <= max_quantity:
        return _invalid(f"write multiple quantity {quantity}")
    if byte_count != bytes_for(quantity):
        return _invalid(f"byte count {byte_count} for quantity {quantity}")
    if len(data) != 5 + byte_count:
        return _invalid(f"{len(data) - 5} value bytes for byte count {byte_count}")
    if address + quantity > 0x10000:
        return Check(Verdict.INVALID, ILLEGAL_DATA_ADDRESS, "write multiple ends past 65535")
    return Check(Verdict.REQUEST)


def _check_read_write_multiple(data: bytes) -> Check:
    if len(data) < 9:
        return _invalid(f"FC 23 data length {len(data)}")
    read_address, read_quantity, write_address, write_quantity, byte_count = struct.unpack_from(
        ">HHHHB", data
    )
    if not 1 <= read_quantity <= 0x007D:
        return _invalid(f"FC 23 read quantity {read_quantity}")
    if not 1 <= write_quantity <= 0x0079:
        return _invalid(f"FC 23 write quantity {write_quantity}")
    if byte_count != 2 * write_quantity or len(data) != 9 + byte_count:
        return _invalid(f"FC 23 byte count {byte_count} for write quantity {write_quantity}")
    if read_address + read_quantity > 0x10000 or write_address + write_quantity > 0x10000:
        return Check(Verdict.INVALID, ILLEGAL_DATA_ADDRESS, "FC 23 ends past 65535")
    return Check(Verdict.REQUEST)


def _check_read_file_record(data: bytes) -> Check:
    if not data:
        return _invalid("FC 20 without byte count")
    byte_count = data[0]
    if not 0x07 <= byte_count <= 0xF5 or byte_count % 7 != 0 or len(data) != 1 + byte_count:
        return _invalid(f"FC 20 byte count {byte_count}")
    for offset in range(1, len(data), 7):
        if data[offset] != 6:
            return _invalid(f"FC 20 reference type {data[offset]}")
    return Check(Verdict.REQUEST)


def _check_write_file_record(data: bytes) -> Check:
    if not data:
        return _invalid("FC 21 without byte count")
    byte_count = data[0]
    if not 0x09 <= byte_count <= 0xFB or len(data) != 1 + byte_count:
        return _invalid(f"FC 21 byte count {byte_count}")
    offset = 1
    while offset < len(data):
        if len(data) - offset < 7 or data[offset] != 6:
            return _invalid("FC 21 sub-request header")
        (record_length,) = struct.unpack_from(">H", data, offset + 5)
        offset += 7 + 2 * record_length
    if offset != len(data):
        return _invalid("FC 21 record data overruns the byte count")
    return Check(Verdict.REQUEST)


def _check_encapsulated_interface(data: bytes) -> Check:
    if not data:
        return _invalid("FC 43 without MEI type")
    mei_type = data[0]
    if mei_type == MEI_CANOPEN:
        return Check(Verdict.REQUEST)
    if mei_type != MEI_READ_DEVICE_IDENTIFICATION:
        # NOTE: a reserved MEI type is treated as a malformed PDU (03), as sluice
        # does. The specification's own choice between 01 and 03 is not checked here.
        return _invalid(f"FC 43 MEI type {mei_type:#04x}")
    if len(data) != 3:
        return _invalid(f"FC 43/14 data length {len(data)}")
    if not 1 <= data[1] <= 4:
        return _invalid(f"FC 43/14 read device id code {data[1]}")
    return Check(Verdict.REQUEST)


class FrameReader:
    """Reads whole MBAP frames from a connected socket, with a deadline."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buffer = b""

    def read_frame(self, timeout: float = 10.0) -> bytes | None:
        """Return the next frame, or None when the peer closes the connection.

        A reset counts as a close. Raises TimeoutError when no whole frame
        arrives within `timeout` seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            if len(self.buffer) >= 6:
                (length,) = struct.unpack_from(">H", self.buffer, 4)
                end = 6 + length
                if len(self.buffer) >= end:
                    frame, self.buffer = self.buffer[:end], self.buffer[end:]
                    return frame
            chunk = self._receive(deadline)
            if not chunk:
                return None
            self.buffer += chunk

    def read_until_close(self, timeout: float = 10.0) -> bytes:
        """Return every byte received until the peer closes the connection.

        Raises TimeoutError when the connection is still open after `timeout`
        seconds.
        """
        deadline = time.monotonic() + timeout
        received = self.buffer
        self.buffer = b""
        while True:
            chunk = self._receive(deadline)
            if not chunk:
                return received
            received += chunk

    def _receive(self, deadline: float) -> bytes:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no complete frame and no close before the deadline")
        self.sock.settimeout(remaining)
        try:
            return self.sock.recv(65536)
        except ConnectionResetError:
            return b""
        except socket.timeout as error:
            raise TimeoutError("no complete frame and no close before the deadline") from error
