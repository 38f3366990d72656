"""The front guard of an OPC UA listener with real peers. Raw OPC UA
Connection Protocol bytes go over a socket. asyncua clients present
application certificates from the listener's CA, from another CA, and one
revoked by the CRL. The client messages of a recorded session are replayed."""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
import subprocess
import struct
from pathlib import Path

import pytest
from asyncua import ua
from asyncua.common.utils import Buffer
from asyncua.ua.ua_binary import header_from_binary, nodeid_from_binary, nodeid_to_binary, struct_from_binary

import harness
import pcap_replay
from harness import vendor_rule_file
from test_opcua import (
    PLANT_NAMESPACE,
    REQUEST_TIMEOUT,
    VENDOR_URI,
    CertificateAuthority,
    opcua_setup,
    run,
)

OPCUA_PCAP = Path(__file__).resolve().parents[2].parent / "shared" / "corpus" / "pcap" / "opcua_4840.pcap"
# Chunks of one request message the listener accepts in these tests.
MAX_CHUNK_COUNT = 16
# Intermediate chunks the flood test sends at most: well above the limit.
FLOOD_CHUNKS = 4 * MAX_CHUNK_COUNT

BAD_TCP_MESSAGE_TYPE_INVALID = 0x807E0000
BAD_COMMUNICATION_ERROR = 0x80050000
BAD_REQUEST_TOO_LARGE = 0x80B80000
BAD_SECURITY_CHECKS_FAILED = 0x80130000
BAD_CERTIFICATE_REVOKED = 0x801D0000
# Encoded type ids (four-byte NodeId form) of the user identity tokens.
USERNAME_TOKEN_TYPE = bytes([0x01, 0x00]) + struct.pack("<H", ua.ObjectIds.UserNameIdentityToken_Encoding_DefaultBinary) + b"\x01"
ANONYMOUS_TOKEN_TYPE = bytes([0x01, 0x00]) + struct.pack("<H", ua.ObjectIds.AnonymousIdentityToken_Encoding_DefaultBinary) + b"\x01"
# The token policy id async-opcua requires of anonymous tokens.
ANONYMOUS_POLICY_ID = "anonymous"
# The token policy id async-opcua requires of a plaintext password.
PLAINTEXT_PASSWORD_POLICY_ID = "userpass_none"
# The credentials of the recorded session's username token.
RECORDED_USER = "user1"
RECORDED_PASSWORD = "password"


@pytest.fixture
def front(sluice_bin, plc_sim, tmp_path):
    """sluice with an OPC UA listener that also offers security None, a CRL
    that revokes one vendor certificate, and a small chunk count limit."""

    def prepare(authority: CertificateAuthority, table: dict) -> dict:
        revoked_certificate, revoked_key, revoked = authority.issue("revoked-vendor", VENDOR_URI)
        table["crl"] = [str(authority.revocation_list([revoked]))]
        table["allow_none"] = True
        table["max_chunk_count"] = MAX_CHUNK_COUNT
        foreign = CertificateAuthority(authority.folder, "foreign-ca")
        foreign_certificate, foreign_key, _ = foreign.issue("foreign-vendor", VENDOR_URI)
        return {
            "revoked": (revoked_certificate, revoked_key),
            "foreign": (foreign_certificate, foreign_key),
        }

    with contextlib.contextmanager(opcua_setup)(sluice_bin, plc_sim, tmp_path, prepare=prepare) as state:
        yield state


def client_messages() -> list[bytes]:
    """The client-to-server messages of the recorded session, in order."""
    (stream,) = pcap_replay.read_client_streams(OPCUA_PCAP, port=4840)
    data = stream.data
    messages = []
    while data:
        size = struct.unpack_from("<I", data, 4)[0]
        messages.append(data[:size])
        data = data[size:]
    return messages


def connect(setup) -> socket.socket:
    return socket.create_connection(("127.0.0.1", setup["gateway"].port), timeout=REQUEST_TIMEOUT)


def read_message(sock: socket.socket) -> bytes:
    """Read one whole message; b"" when the connection closed first."""
    header = read_exactly(sock, 8)
    if len(header) < 8:
        return b""
    size = struct.unpack_from("<I", header, 4)[0]
    return header + read_exactly(sock, size - 8)


def read_exactly(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        part = sock.recv(count - len(data))
        if not part:
            break
        data += part
    return data


def error_status(message: bytes) -> int:
    """The status code of an ERR message."""
    assert message[:4] == b"ERRF", message[:16]
    return struct.unpack_from("<I", message, 8)[0]


def assert_closed(sock: socket.socket) -> None:
    assert sock.recv(1) == b""


def rejection_events(setup, kind: str) -> tuple[dict, dict]:
    """Wait for the anomaly of `kind` and return it with the session reject
    event of the same connection."""
    gateway = setup["gateway"]
    (anomaly,) = gateway.wait_for_events(
        lambda event: (event.get("anomaly") or {}).get("kind") == kind, what=f"{kind} anomaly"
    )
    (reject,) = [
        event for event in gateway.events()
        if event.get("event_type") == "session" and event.get("action") == "reject"
        and event.get("src_port") == anomaly["src_port"]
    ]
    return anomaly, reject


def assert_no_session_opened(setup) -> None:
    assert [
        event for event in setup["gateway"].events()
        if event.get("event_type") == "session" and event.get("action") == "open"
    ] == []


def test_open_secure_channel_without_hello_is_rejected(front):
    open_request = client_messages()[1]
    with connect(front) as sock:
        sock.sendall(open_request)
        assert error_status(read_message(sock)) == BAD_TCP_MESSAGE_TYPE_INVALID
        assert_closed(sock)
    anomaly, reject = rejection_events(front, "opcua_not_hello")
    assert anomaly["anomaly"]["severity"] == "medium"
    assert anomaly["listener"] == "ua"
    assert anomaly["src_ip"] == "127.0.0.1"
    assert anomaly["detail"] == {"status": "0x807E0000"}
    assert reject["reason"] == anomaly["anomaly"]["detail"]
    assert_no_session_opened(front)


@pytest.mark.parametrize("size", [0, 4])
def test_hello_with_size_below_its_header_is_rejected(front, size):
    with connect(front) as sock:
        sock.sendall(b"HELF" + struct.pack("<I", size))
        assert error_status(read_message(sock)) == BAD_COMMUNICATION_ERROR
        assert_closed(sock)
    anomaly, _ = rejection_events(front, "opcua_message_size")
    assert anomaly["detail"] == {"status": "0x80050000"}
    assert_no_session_opened(front)


def open_channel(sock: socket.socket) -> tuple[int, int, int, int]:
    """Send the recorded HEL and OPN (security None); return the live
    secure channel id, token id, the OPN's sequence number and the
    MaxChunkCount of the server's ACK."""
    hello, open_request = client_messages()[:2]
    sock.sendall(hello)
    acknowledge = read_message(sock)
    assert acknowledge[:4] == b"ACKF"
    max_chunk_count = struct.unpack_from("<I", acknowledge, 24)[0]
    sock.sendall(open_request)
    response = read_message(sock)
    buffer = Buffer(response)
    header = header_from_binary(buffer)
    assert header.MessageType == ua.MessageType.SecureOpen
    struct_from_binary(ua.AsymmetricAlgorithmHeader, buffer)
    struct_from_binary(ua.SequenceHeader, buffer)
    reply = struct_from_binary(ua.OpenSecureChannelResponse, buffer)
    assert reply.ResponseHeader.ServiceResult.value == 0
    token = reply.Parameters.SecurityToken
    assert token.ChannelId == header.ChannelId
    request_buffer = Buffer(open_request)
    header_from_binary(request_buffer)
    struct_from_binary(ua.AsymmetricAlgorithmHeader, request_buffer)
    sequence = struct_from_binary(ua.SequenceHeader, request_buffer)
    return token.ChannelId, token.TokenId, sequence.SequenceNumber, max_chunk_count


def test_endless_intermediate_chunks_are_rejected(front):
    with connect(front) as sock:
        channel, token, sequence, server_limit = open_channel(sock)
        for index in range(FLOOD_CHUNKS):
            chunk = struct.pack("<IIII", channel, token, sequence + 1 + index, 1000) + bytes(64)
            sock.sendall(b"MSGC" + struct.pack("<I", 8 + len(chunk)) + chunk)
            readable, _, _ = select.select([sock], [], [], 0)
            if readable:
                break
        assert error_status(read_message(sock)) == BAD_REQUEST_TOO_LARGE
        assert_closed(sock)
    # The guard lowers its limit to the MaxChunkCount of the server's ACK
    # (5 for async-opcua 0.19), which the front passes on.
    assert 0 < server_limit < MAX_CHUNK_COUNT
    anomaly, _ = rejection_events(front, "opcua_chunk_flood")
    assert anomaly["anomaly"]["detail"] == (
        f"request message on channel {channel} token {token} has more than {server_limit} chunks"
    )
    assert anomaly["anomaly"]["severity"] == "high"
    assert anomaly["detail"] == {"status": "0x80B80000"}
    assert_no_session_opened(front)


async def read_temperature(client, index):
    return await client.get_node(ua.NodeId("Line1.Press.Temperature", index)).read_value()


def temperature_decision(setup) -> dict:
    """Wait for the one decision event about the temperature node."""
    (decision,) = setup["gateway"].wait_for_events(
        lambda event: event.get("event_type") == "decision"
        and (event.get("opcua") or {}).get("node_id") == f"nsu={PLANT_NAMESPACE};s=Line1.Press.Temperature",
        what="read decision",
    )
    return decision


def with_certificate(setup, pair: tuple[Path, Path]) -> dict:
    certificate, key = pair
    return {**setup, "client_certificate": certificate, "client_key": key}


def test_trusted_certificate_reads_with_address(front):
    assert run(front, read_temperature) == 21.5
    decision = temperature_decision(front)
    assert decision["decision"] == "allow"
    assert decision["src_ip"] == "127.0.0.1"
    assert isinstance(decision["src_port"], int)


def test_operations_outside_vendor_sources_are_denied(sluice_bin, plc_sim, tmp_path):
    setup = contextlib.contextmanager(opcua_setup)(sluice_bin, plc_sim, tmp_path, acme_sources=["192.0.2.0/24"])
    with setup as state:

        async def read_status(client, index):
            node = client.get_node(ua.NodeId("Line1.Press.Temperature", index))
            return (await node.read_data_value(raise_on_bad_status=False)).StatusCode.value

        assert run(state, read_status) == ua.StatusCodes.BadUserAccessDenied
        decision = temperature_decision(state)
        assert decision["decision"] == "deny"
        assert decision["reason"] == "source address outside the vendor's sources"
        assert decision["src_ip"] == "127.0.0.1"


def test_certificate_of_another_ca_is_rejected(front):
    with pytest.raises(Exception):
        run(with_certificate(front, front["foreign"]), read_temperature)
    anomaly, reject = rejection_events(front, "opcua_certificate_untrusted")
    assert anomaly["anomaly"]["severity"] == "high"
    assert anomaly["detail"]["status"] == "0x801A0000"
    assert anomaly["detail"]["certificate"]["subject"] == "CN=foreign-vendor"
    assert anomaly["detail"]["certificate"]["application_uri"] == VENDOR_URI
    assert reject["listener"] == "ua"
    assert_no_session_opened(front)


def test_reload_applies_a_new_crl(front):
    assert run(front, read_temperature) == 21.5
    front["authority"].revocation_list([front["client_x509"]])
    harness.send_hangup(front["gateway"])
    front["gateway"].wait_for_events(
        lambda event: event.get("event_type") == "config" and event.get("action") == "reload",
        what="reload",
    )
    with pytest.raises(Exception):
        run(front, read_temperature)
    anomaly, _ = rejection_events(front, "opcua_certificate_revoked")
    assert anomaly["detail"]["certificate"]["subject"] == "CN=vendor"


def test_revoked_certificate_is_rejected(front):
    with pytest.raises(Exception):
        run(with_certificate(front, front["revoked"]), read_temperature)
    anomaly, _ = rejection_events(front, "opcua_certificate_revoked")
    assert anomaly["detail"]["status"] == "0x801D0000"
    assert anomaly["detail"]["certificate"]["subject"] == "CN=revoked-vendor"
    assert_no_session_opened(front)


def patch_request(message: bytes, channel: int, token: int, authentication: ua.NodeId | None) -> bytes:
    """Put the live secure channel id, token id and, when known, session
    authentication token into a recorded MSG or CLO request."""
    body = bytearray(message)
    struct.pack_into("<II", body, 8, channel, token)
    if authentication is None or message[:3] != b"MSG":
        return bytes(body)
    start = 24
    buffer = Buffer(bytes(body[start:]))
    nodeid_from_binary(buffer)
    token_at = start + buffer.cur_pos
    nodeid_from_binary(buffer)
    token_end = start + buffer.cur_pos
    body[token_at:token_end] = nodeid_to_binary(authentication)
    struct.pack_into("<I", body, 4, len(body))
    return bytes(body)


def response_of(message: bytes) -> tuple[int, int, int]:
    """Decode a single-chunk MSG response with security None; return its
    request id, the numeric id of its type and its ServiceResult."""
    buffer = Buffer(message)
    header_from_binary(buffer)
    struct_from_binary(ua.SymmetricAlgorithmHeader, buffer)
    sequence = struct_from_binary(ua.SequenceHeader, buffer)
    type_id = nodeid_from_binary(buffer)
    header = struct_from_binary(ua.ResponseHeader, buffer)
    return sequence.RequestId, type_id.Identifier, header.ServiceResult.value


def anonymous_activation(message: bytes) -> bytes:
    """Replace the user identity token of the recorded ActivateSession
    request, a UserNameIdentityToken, with an AnonymousIdentityToken."""
    at = message.index(USERNAME_TOKEN_TYPE)
    (length,) = struct.unpack_from("<i", message, at + len(USERNAME_TOKEN_TYPE))
    end = at + len(USERNAME_TOKEN_TYPE) + 4 + length
    policy = ANONYMOUS_POLICY_ID.encode()
    body = struct.pack("<i", len(policy)) + policy
    anonymous = ANONYMOUS_TOKEN_TYPE + struct.pack("<i", len(body)) + body
    patched = bytearray(message[:at] + anonymous + message[end:])
    struct.pack_into("<I", patched, 4, len(patched))
    return bytes(patched)


def replay(setup, activation=lambda message: message) -> list[tuple[int, int, list[int]]]:
    """Replay the recorded session on a new connection, its ActivateSession
    request passed through `activation`; return the type id, ServiceResult
    and per-operation statuses of every response."""
    messages = client_messages()
    answers = []
    with connect(setup) as sock:
        channel, token, _, _ = open_channel(sock)
        authentication = None
        for message in messages[2:]:
            if struct.unpack_from("<H", message, 26)[0] == ua.ObjectIds.ActivateSessionRequest_Encoding_DefaultBinary:
                message = activation(message)
            sock.sendall(patch_request(message, channel, token, authentication))
            if message[:3] == b"CLO":
                assert_closed(sock)
                break
            response = read_message(sock)
            assert response[:4] == b"MSGF", response[:16]
            request_id, type_id, result = response_of(response)
            assert request_id == struct.unpack_from("<I", message, 20)[0]
            answers.append((type_id, result, read_statuses(response, type_id)))
            if type_id == ua.ObjectIds.CreateSessionResponse_Encoding_DefaultBinary:
                buffer = Buffer(response)
                header_from_binary(buffer)
                struct_from_binary(ua.SymmetricAlgorithmHeader, buffer)
                struct_from_binary(ua.SequenceHeader, buffer)
                created = struct_from_binary(ua.CreateSessionResponse, buffer)
                authentication = created.Parameters.AuthenticationToken
    return answers


def read_statuses(message: bytes, type_id: int) -> list[int]:
    """The status of every result of a ReadResponse; [] for other types."""
    if type_id != ua.ObjectIds.ReadResponse_Encoding_DefaultBinary:
        return []
    buffer = Buffer(message)
    header_from_binary(buffer)
    struct_from_binary(ua.SymmetricAlgorithmHeader, buffer)
    struct_from_binary(ua.SequenceHeader, buffer)
    read = struct_from_binary(ua.ReadResponse, buffer)
    return [result.StatusCode.value for result in read.Results]


def recorded_reads() -> int:
    """The number of Read requests in the recorded session."""
    return sum(
        1 for message in client_messages()
        if message[:3] == b"MSG"
        and struct.unpack_from("<H", message, 26)[0] == ua.ObjectIds.ReadRequest_Encoding_DefaultBinary
    )


def test_recorded_username_token_is_rejected(front):
    """The recorded session activates with a username token under the
    policy id of the server it was recorded against, which sluice does not
    offer, so its reads get ServiceFaults with BadSessionNotActivated."""
    fault = ua.ObjectIds.ServiceFault_Encoding_DefaultBinary
    assert replay(front) == [
        (ua.ObjectIds.GetEndpointsResponse_Encoding_DefaultBinary, ua.StatusCodes.Good, []),
        (ua.ObjectIds.CreateSessionResponse_Encoding_DefaultBinary, ua.StatusCodes.Good, []),
        (fault, ua.StatusCodes.BadIdentityTokenRejected, []),
        *[(fault, ua.StatusCodes.BadSessionNotActivated, [])] * recorded_reads(),
        (ua.ObjectIds.CloseSessionResponse_Encoding_DefaultBinary, ua.StatusCodes.Good, []),
    ]


def test_anonymous_replay_without_anonymous_vendor_is_rejected(front):
    fault = ua.ObjectIds.ServiceFault_Encoding_DefaultBinary
    assert replay(front, anonymous_activation) == [
        (ua.ObjectIds.GetEndpointsResponse_Encoding_DefaultBinary, ua.StatusCodes.Good, []),
        (ua.ObjectIds.CreateSessionResponse_Encoding_DefaultBinary, ua.StatusCodes.Good, []),
        (fault, ua.StatusCodes.BadIdentityTokenRejected, []),
        *[(fault, ua.StatusCodes.BadSessionNotActivated, [])] * recorded_reads(),
        (ua.ObjectIds.CloseSessionResponse_Encoding_DefaultBinary, ua.StatusCodes.Good, []),
    ]
    (rejection,) = front["gateway"].wait_for_events(
        lambda event: event.get("event_type") == "session" and event.get("action") == "reject",
        what="the rejected anonymous session",
    )
    assert rejection["reason"] == "anonymous sessions are not allowed"
    assert_no_session_opened(front)


def plaintext_password_activation(message: bytes) -> bytes:
    """Give the recorded username token the policy id async-opcua expects
    of a plaintext password on an endpoint without security, so that only
    sluice's own refusal can reject it."""
    at = message.index(USERNAME_TOKEN_TYPE) + len(USERNAME_TOKEN_TYPE) + 4
    (length,) = struct.unpack_from("<i", message, at)
    policy = PLAINTEXT_PASSWORD_POLICY_ID.encode()
    patched = bytearray(message[:at] + struct.pack("<i", len(policy)) + policy + message[at + 4 + length:])
    body_length_at = at - 4
    (body_length,) = struct.unpack_from("<i", patched, body_length_at)
    struct.pack_into("<i", patched, body_length_at, body_length + len(policy) - length)
    struct.pack_into("<I", patched, 4, len(patched))
    return bytes(patched)


@contextlib.contextmanager
def none_endpoint_setup(sluice_bin, plc_sim, tmp_path, rules: dict):
    """sluice offering security None too, with the extra rule files `rules`."""

    def prepare(authority: CertificateAuthority, table: dict) -> dict:
        table["allow_none"] = True
        return {}

    with contextlib.contextmanager(opcua_setup)(
        sluice_bin, plc_sim, tmp_path, prepare=prepare, extra_rules=rules
    ) as state:
        yield state


@pytest.fixture
def recorded_user_front(sluice_bin, plc_sim, tmp_path):
    """sluice offering security None, with a vendor whose username and
    password are those of the recorded session."""

    password_hash = subprocess.run(
        [sluice_bin, "hash-password"], input=RECORDED_PASSWORD + "\n", capture_output=True, text=True,
        check=True, timeout=10,
    ).stdout.strip()
    recorded = {"name": "recorded", "opcua_users": [{"username": RECORDED_USER, "password_hash": password_hash}]}
    recorded_read = {"device": "line1-ua", "services": ["read"], "nodes": [f"nsu={PLANT_NAMESPACE};s=Line1.*"]}
    rules = {"recorded.toml": vendor_rule_file(recorded, [recorded_read])}
    with none_endpoint_setup(sluice_bin, plc_sim, tmp_path, rules) as state:
        yield state


def test_password_on_endpoint_without_security_is_rejected(recorded_user_front):
    """A password on the endpoint without security would cross the network
    in clear, so sluice offers no username token there and rejects one even
    with valid credentials and the policy id async-opcua would accept."""
    fault = ua.ObjectIds.ServiceFault_Encoding_DefaultBinary
    assert replay(recorded_user_front, plaintext_password_activation) == [
        (ua.ObjectIds.GetEndpointsResponse_Encoding_DefaultBinary, ua.StatusCodes.Good, []),
        (ua.ObjectIds.CreateSessionResponse_Encoding_DefaultBinary, ua.StatusCodes.Good, []),
        (fault, ua.StatusCodes.BadIdentityTokenRejected, []),
        *[(fault, ua.StatusCodes.BadSessionNotActivated, [])] * recorded_reads(),
        (ua.ObjectIds.CloseSessionResponse_Encoding_DefaultBinary, ua.StatusCodes.Good, []),
    ]
    assert_no_session_opened(recorded_user_front)


@pytest.fixture
def anonymous_front(sluice_bin, plc_sim, tmp_path):
    """sluice offering security None, with the vendor guest for anonymous
    sessions, allowed to read the plant's Line1 nodes."""

    guest = {"name": "guest", "opcua_anonymous": True}
    guest_read = {"device": "line1-ua", "services": ["read"], "nodes": [f"nsu={PLANT_NAMESPACE};s=Line1.*"]}
    rules = {"guest.toml": vendor_rule_file(guest, [guest_read])}
    with none_endpoint_setup(sluice_bin, plc_sim, tmp_path, rules) as state:
        yield state


def test_anonymous_replay_completes_with_anonymous_vendor(anonymous_front):
    """With a vendor for anonymous sessions the recorded session activates.
    Its reads name nodes of the server it was recorded against
    (ns=1;s=Boolean.Variable and so on), which sluice does not have."""
    assert replay(anonymous_front, anonymous_activation) == [
        (ua.ObjectIds.GetEndpointsResponse_Encoding_DefaultBinary, ua.StatusCodes.Good, []),
        (ua.ObjectIds.CreateSessionResponse_Encoding_DefaultBinary, ua.StatusCodes.Good, []),
        (ua.ObjectIds.ActivateSessionResponse_Encoding_DefaultBinary, ua.StatusCodes.Good, []),
        *[(ua.ObjectIds.ReadResponse_Encoding_DefaultBinary, ua.StatusCodes.Good,
           [ua.StatusCodes.BadNodeIdUnknown])] * recorded_reads(),
        (ua.ObjectIds.CloseSessionResponse_Encoding_DefaultBinary, ua.StatusCodes.Good, []),
    ]
    opened = anonymous_front["gateway"].wait_for_events(
        lambda event: event.get("event_type") == "session" and event.get("action") == "open",
        what="the anonymous session",
    )
    assert [(event["vendor"], event["detail"]) for event in opened] == [("guest", {"identity": "anonymous"})]
