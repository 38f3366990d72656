//! Sans-IO guard over the client-to-server byte stream of one OPC UA TCP
//! connection (OPC 10000-6, 7.1 Connection Protocol and 6.7 Secure
//! Conversation). It cuts the stream into message chunks, checks each header
//! before buffering its body, and returns whole validated chunks or the
//! violation to report in an Error message. It decrypts nothing, so the
//! secure channel layer behind it still checks signatures and sequences.

use bytes::{BufMut, Bytes, BytesMut};
use thiserror::Error;

/// Length of the message header shared by every message type: type, chunk
/// type and message size.
pub const HEADER_LEN: usize = 8;
/// Hello header plus its five UInt32 fields and the EndpointUrl length.
pub const HELLO_MIN_LEN: usize = HEADER_LEN + 5 * 4 + 4;
/// Maximum encoded length of the Hello EndpointUrl (OPC 10000-6, Hello
/// message).
pub const MAX_ENDPOINT_URL_LEN: usize = 0x1000;
/// Length of an Acknowledge message: the header and five UInt32 fields.
pub const ACKNOWLEDGE_LEN: usize = HEADER_LEN + 5 * 4;
/// Maximum length of an Error message reason (OPC 10000-6, Error message).
pub const MAX_REASON_LEN: usize = 0x1000;
/// Maximum length of the SecurityPolicyUri of an asymmetric security header
/// (OPC 10000-6, 6.7.2.3).
pub const MAX_SECURITY_POLICY_URI_LEN: usize = 0xFF;
/// Smallest buffer sizes a Hello may announce: 1024 bytes for ECC policies,
/// 8192 for all others (OPC 10000-6, Hello message). The guard accepts the ECC
/// minimum because it cannot know the policy yet.
pub const MIN_HELLO_BUFFER_SIZE: u32 = 0x400;
/// Secure conversation header and asymmetric security header of an OPN
/// with three null strings, plus the 8-byte sequence header.
pub const OPEN_MIN_LEN: usize = HEADER_LEN + 4 + 3 * 4 + 8;
/// Secure conversation header and symmetric security header (TokenId) of a
/// MSG or CLO, plus the 8-byte sequence header.
pub const SYMMETRIC_MIN_LEN: usize = HEADER_LEN + 4 + 4 + 8;
/// Open multi-chunk messages the guard tracks at once. One channel has at
/// most two valid tokens while a token is renewed.
pub const MAX_OPEN_MESSAGES: usize = 4;

/// OPC UA status codes the guard sends, from the OPC Foundation
/// StatusCode.csv table.
pub mod status {
    pub const BAD_COMMUNICATION_ERROR: u32 = 0x8005_0000;
    pub const BAD_TCP_SERVER_TOO_BUSY: u32 = 0x807D_0000;
    pub const BAD_TCP_MESSAGE_TYPE_INVALID: u32 = 0x807E_0000;
    pub const BAD_TCP_MESSAGE_TOO_LARGE: u32 = 0x8080_0000;
    pub const BAD_TCP_ENDPOINT_URL_INVALID: u32 = 0x8083_0000;
    pub const BAD_REQUEST_TOO_LARGE: u32 = 0x80B8_0000;
    pub const BAD_SECURITY_CHECKS_FAILED: u32 = 0x8013_0000;
    pub const BAD_SECURITY_POLICY_REJECTED: u32 = 0x8055_0000;
    pub const BAD_CERTIFICATE_INVALID: u32 = 0x8012_0000;
    pub const BAD_CERTIFICATE_POLICY_CHECK_FAILED: u32 = 0x8114_0000;
    pub const BAD_CERTIFICATE_TIME_INVALID: u32 = 0x8014_0000;
    pub const BAD_CERTIFICATE_ISSUER_TIME_INVALID: u32 = 0x8015_0000;
    pub const BAD_CERTIFICATE_USE_NOT_ALLOWED: u32 = 0x8018_0000;
    pub const BAD_CERTIFICATE_UNTRUSTED: u32 = 0x801A_0000;
    pub const BAD_CERTIFICATE_REVOCATION_UNKNOWN: u32 = 0x801B_0000;
    pub const BAD_CERTIFICATE_REVOKED: u32 = 0x801D_0000;
}

/// Message types of the Connection Protocol and of Secure Conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageType {
    Hello,
    Acknowledge,
    Error,
    ReverseHello,
    OpenSecureChannel,
    Message,
    CloseSecureChannel,
}

impl MessageType {
    /// Parses the three ASCII bytes that open every message.
    pub fn from_code(code: [u8; 3]) -> Option<Self> {
        Some(match &code {
            b"HEL" => MessageType::Hello,
            b"ACK" => MessageType::Acknowledge,
            b"ERR" => MessageType::Error,
            b"RHE" => MessageType::ReverseHello,
            b"OPN" => MessageType::OpenSecureChannel,
            b"MSG" => MessageType::Message,
            b"CLO" => MessageType::CloseSecureChannel,
            _ => return None,
        })
    }

    /// Returns the three ASCII bytes of the type.
    pub fn code(self) -> &'static str {
        match self {
            MessageType::Hello => "HEL",
            MessageType::Acknowledge => "ACK",
            MessageType::Error => "ERR",
            MessageType::ReverseHello => "RHE",
            MessageType::OpenSecureChannel => "OPN",
            MessageType::Message => "MSG",
            MessageType::CloseSecureChannel => "CLO",
        }
    }

    /// Smallest valid message size of the type, header included.
    fn min_len(self) -> usize {
        match self {
            MessageType::Hello => HELLO_MIN_LEN,
            MessageType::OpenSecureChannel => OPEN_MIN_LEN,
            MessageType::Message | MessageType::CloseSecureChannel => SYMMETRIC_MIN_LEN,
            // Types a client never sends; the header alone.
            _ => HEADER_LEN,
        }
    }
}

/// The fourth header byte: whether a chunk ends its message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChunkType {
    /// `F`: the final (or only) chunk.
    Final,
    /// `C`: an intermediate chunk, more follow.
    Intermediate,
    /// `A`: the final chunk of an aborted message.
    Abort,
}

impl ChunkType {
    fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            b'F' => Some(ChunkType::Final),
            b'C' => Some(ChunkType::Intermediate),
            b'A' => Some(ChunkType::Abort),
            _ => None,
        }
    }
}

/// Limits of one connection. The defaults are those of a server that
/// announces a 64 KiB receive buffer and accepts 64 chunks per request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FramingLimits {
    /// Largest chunk the client may send, header included: our
    /// ReceiveBufferSize.
    pub max_chunk_size: u32,
    /// Most chunks of one request message, the final chunk included.
    pub max_chunk_count: u32,
    /// Most bytes of one request message on the wire, headers, padding and
    /// signatures of all its chunks included. The server's MaxMessageSize
    /// counts only the decrypted body, so this sits above it.
    pub max_message_size: u32,
}

impl Default for FramingLimits {
    fn default() -> Self {
        FramingLimits {
            max_chunk_size: 0x1_0000,
            max_chunk_count: 64,
            max_message_size: 64 * 0x1_0000,
        }
    }
}

/// The fields of a Hello message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub protocol_version: u32,
    pub receive_buffer_size: u32,
    pub send_buffer_size: u32,
    pub max_message_size: u32,
    pub max_chunk_count: u32,
    /// Empty when the client sent a null string.
    pub endpoint_url: String,
}

/// The fields of the server's Acknowledge message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Acknowledge {
    pub protocol_version: u32,
    /// Largest chunk the server accepts.
    pub receive_buffer_size: u32,
    pub send_buffer_size: u32,
    /// Largest request body the server accepts; 0 for no limit.
    pub max_message_size: u32,
    /// Maximum number of chunks per request the server accepts; 0 for no
    /// limit.
    pub max_chunk_count: u32,
}

impl Acknowledge {
    /// Parses one complete ACK message, header included. Returns `None` for
    /// any other message or a size that does not match the fields.
    pub fn parse(message: &[u8]) -> Option<Self> {
        let mut reader = Reader::new(message);
        if reader.take(4)? != b"ACKF" || reader.u32()? as usize != message.len() {
            return None;
        }
        let ack = Acknowledge {
            protocol_version: reader.u32()?,
            receive_buffer_size: reader.u32()?,
            send_buffer_size: reader.u32()?,
            max_message_size: reader.u32()?,
            max_chunk_count: reader.u32()?,
        };
        reader.is_empty().then_some(ack)
    }

    /// Parses the ACK at the start of the server-to-client stream, which may
    /// hold more bytes after it. Returns `None` until all 28 bytes are there,
    /// and for any other first message.
    pub fn parse_prefix(stream: &[u8]) -> Option<Self> {
        stream.get(..ACKNOWLEDGE_LEN).and_then(Self::parse)
    }
}

/// The asymmetric security header of an OpenSecureChannel request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AsymmetricHeader {
    /// 0 for a new channel, the channel's id for a renewal.
    pub secure_channel_id: u32,
    pub security_policy_uri: String,
    /// The sender's DER certificate followed by its chain, as sent.
    pub sender_certificate: Option<Bytes>,
    /// SHA-1 thumbprint of the server certificate the client encrypted for.
    pub receiver_thumbprint: Option<Bytes>,
}

/// The parsed content of a validated chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameDetail {
    Hello(Hello),
    OpenSecureChannel(AsymmetricHeader),
    /// MSG or CLO: the symmetric security header in clear text.
    Symmetric {
        secure_channel_id: u32,
        token_id: u32,
    },
}

/// One validated message chunk, ready to pass on unchanged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub message_type: MessageType,
    pub chunk_type: ChunkType,
    pub detail: FrameDetail,
    /// The whole chunk, header included.
    pub bytes: Bytes,
}

/// The class of a framing violation, with its stable event kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ViolationKind {
    /// The first message was not a Hello.
    NotHello,
    /// A second Hello on the same connection.
    HelloRepeated,
    /// An unknown message type, or one a client never sends.
    MessageType,
    /// A chunk type byte that is invalid for the message type.
    ChunkType,
    /// A message size below the type's minimum or above the chunk limit.
    MessageSize,
    /// Too many chunks or bytes in one request message.
    ChunkFlood,
    /// An EndpointUrl longer than the limit or not UTF-8.
    EndpointUrl,
    /// A body whose fields do not fit its message size.
    Malformed,
}

impl ViolationKind {
    /// Returns the `anomaly.kind` of events about this violation.
    pub fn as_str(self) -> &'static str {
        match self {
            ViolationKind::NotHello => "opcua_not_hello",
            ViolationKind::HelloRepeated => "opcua_hello_repeated",
            ViolationKind::MessageType => "opcua_message_type",
            ViolationKind::ChunkType => "opcua_chunk_type",
            ViolationKind::MessageSize => "opcua_message_size",
            ViolationKind::ChunkFlood => "opcua_chunk_flood",
            ViolationKind::EndpointUrl => "opcua_endpoint_url",
            ViolationKind::Malformed => "opcua_malformed",
        }
    }
}

/// A violated rule of the Connection Protocol. The connection sends
/// `error_message()` and closes.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{detail}")]
pub struct Violation {
    pub kind: ViolationKind,
    /// The OPC UA status code of the Error message.
    pub status: u32,
    /// Lowercase description with the offending value and the limit.
    pub detail: String,
}

impl Violation {
    fn new(kind: ViolationKind, status: u32, detail: String) -> Self {
        Violation {
            kind,
            status,
            detail,
        }
    }

    /// Encodes the Error message that reports this violation to the client.
    pub fn error_message(&self) -> Bytes {
        encode_error(self.status, &self.detail)
    }
}

/// Encodes an Error message (ERR, OPC 10000-6 Connection Protocol): status code and
/// reason, the reason cut to `MAX_REASON_LEN` bytes at a character boundary.
pub fn encode_error(status: u32, reason: &str) -> Bytes {
    let mut end = reason.len().min(MAX_REASON_LEN);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let reason = &reason.as_bytes()[..end];
    let size = HEADER_LEN + 4 + 4 + reason.len();
    let mut message = BytesMut::with_capacity(size);
    message.put_slice(b"ERRF");
    // Both fit: size is at most 16 + 4096.
    message.put_u32_le(size as u32);
    message.put_u32_le(status);
    message.put_i32_le(reason.len() as i32);
    message.put_slice(reason);
    message.freeze()
}

/// Counts of what one connection passed, for events and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FrameCounters {
    pub hello: u64,
    pub open_secure_channel: u64,
    /// MSG chunks of every chunk type.
    pub message_chunks: u64,
    /// MSG chunks of type `C`.
    pub intermediate_chunks: u64,
    /// MSG chunks of type `A`.
    pub abort_chunks: u64,
    pub close_secure_channel: u64,
    /// Bytes of all passed chunks.
    pub bytes: u64,
    /// Most chunks any one request message had so far.
    pub max_chunks_per_message: u32,
}

/// A request message whose final chunk has not arrived yet.
#[derive(Debug, Clone, Copy)]
struct OpenMessage {
    secure_channel_id: u32,
    token_id: u32,
    chunks: u32,
    bytes: u64,
}

/// The incremental guard of one connection's client-to-server stream.
#[derive(Debug)]
pub struct FrameGuard {
    limits: FramingLimits,
    /// Effective chunk size limit: ours, lowered by the client's Hello
    /// SendBufferSize and the server's Acknowledge ReceiveBufferSize.
    max_chunk_size: u32,
    /// Effective chunk count limit: ours, lowered by the Acknowledge.
    max_chunk_count: u32,
    hello_seen: bool,
    buffer: BytesMut,
    open_messages: Vec<OpenMessage>,
    counters: FrameCounters,
    /// Once set, every later call returns it again.
    failed: Option<Violation>,
}

impl FrameGuard {
    pub fn new(limits: FramingLimits) -> Self {
        FrameGuard {
            limits,
            max_chunk_size: limits.max_chunk_size,
            max_chunk_count: limits.max_chunk_count.max(1),
            hello_seen: false,
            buffer: BytesMut::new(),
            open_messages: Vec::new(),
            counters: FrameCounters::default(),
            failed: None,
        }
    }

    pub fn counters(&self) -> &FrameCounters {
        &self.counters
    }

    /// Returns the limits in force now, after Hello and Acknowledge.
    pub fn effective_limits(&self) -> FramingLimits {
        FramingLimits {
            max_chunk_size: self.max_chunk_size,
            max_chunk_count: self.max_chunk_count,
            max_message_size: self.limits.max_message_size,
        }
    }

    /// Lowers the limits to those the server announced in its Acknowledge.
    /// Zero fields mean no limit and leave ours in force.
    pub fn apply_acknowledge(&mut self, ack: &Acknowledge) {
        if ack.receive_buffer_size != 0 {
            self.max_chunk_size = self.max_chunk_size.min(ack.receive_buffer_size);
        }
        if ack.max_chunk_count != 0 {
            self.max_chunk_count = self.max_chunk_count.min(ack.max_chunk_count);
        }
    }

    /// Feeds bytes as they arrived and returns the chunks they completed, in
    /// order. On a violation the connection must close: chunks completed
    /// earlier in the same call are not returned, and every later call
    /// returns the same violation.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Vec<Frame>, Violation> {
        if let Some(violation) = &self.failed {
            return Err(violation.clone());
        }
        self.buffer.extend_from_slice(bytes);
        let mut frames = Vec::new();
        loop {
            match self.next_frame() {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => return Ok(frames),
                Err(violation) => {
                    self.buffer = BytesMut::new();
                    self.failed = Some(violation.clone());
                    return Err(violation);
                }
            }
        }
    }

    /// Takes one chunk off the buffer, or returns `None` while it is
    /// incomplete. The header is checked before the body is waited for, so
    /// between calls the buffer contains less than one allowed chunk.
    fn next_frame(&mut self) -> Result<Option<Frame>, Violation> {
        if self.buffer.len() < HEADER_LEN {
            return Ok(None);
        }
        let (message_type, chunk_type, size) = self.check_header()?;
        if self.buffer.len() < size {
            return Ok(None);
        }
        let bytes = self.buffer.split_to(size).freeze();
        let detail = match message_type {
            MessageType::Hello => FrameDetail::Hello(self.accept_hello(&bytes)?),
            MessageType::OpenSecureChannel => {
                FrameDetail::OpenSecureChannel(parse_asymmetric_header(&bytes)?)
            }
            _ => self.accept_symmetric(message_type, chunk_type, &bytes)?,
        };
        self.count(message_type, chunk_type, size);
        Ok(Some(Frame {
            message_type,
            chunk_type,
            detail,
            bytes,
        }))
    }

    /// Checks type, chunk type and size in the first 8 bytes of the buffer.
    fn check_header(&self) -> Result<(MessageType, ChunkType, usize), Violation> {
        let header = &self.buffer[..HEADER_LEN];
        let code = [header[0], header[1], header[2]];
        let size = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        let message_type = self.check_message_type(code)?;
        let chunk_type = ChunkType::from_byte(header[3])
            .filter(|chunk| message_type == MessageType::Message || *chunk == ChunkType::Final)
            .ok_or_else(|| {
                Violation::new(
                    ViolationKind::ChunkType,
                    status::BAD_TCP_MESSAGE_TYPE_INVALID,
                    format!(
                        "chunk type 0x{:02x} is invalid for {}",
                        header[3],
                        message_type.code()
                    ),
                )
            })?;
        let size = self.check_size(message_type, size)?;
        Ok((message_type, chunk_type, size))
    }

    fn check_message_type(&self, code: [u8; 3]) -> Result<MessageType, Violation> {
        let message_type = MessageType::from_code(code);
        let printable_code = || String::from_utf8_lossy(&code).escape_debug().to_string();
        if !self.hello_seen {
            return match message_type {
                Some(MessageType::Hello) => Ok(MessageType::Hello),
                _ => Err(Violation::new(
                    ViolationKind::NotHello,
                    status::BAD_TCP_MESSAGE_TYPE_INVALID,
                    format!("first message type \"{}\" is not HEL", printable_code()),
                )),
            };
        }
        match message_type {
            Some(
                allowed @ (MessageType::OpenSecureChannel
                | MessageType::Message
                | MessageType::CloseSecureChannel),
            ) => Ok(allowed),
            Some(MessageType::Hello) => Err(Violation::new(
                ViolationKind::HelloRepeated,
                status::BAD_TCP_MESSAGE_TYPE_INVALID,
                "second HEL on one connection".to_string(),
            )),
            _ => Err(Violation::new(
                ViolationKind::MessageType,
                status::BAD_TCP_MESSAGE_TYPE_INVALID,
                format!(
                    "message type \"{}\" is invalid from a client",
                    printable_code()
                ),
            )),
        }
    }

    fn check_size(&self, message_type: MessageType, size: u32) -> Result<usize, Violation> {
        let min = message_type.min_len();
        let max = match message_type {
            MessageType::Hello => (HELLO_MIN_LEN + MAX_ENDPOINT_URL_LEN) as u32,
            _ => self.max_chunk_size,
        };
        if (size as usize) < min {
            return Err(Violation::new(
                ViolationKind::MessageSize,
                status::BAD_COMMUNICATION_ERROR,
                format!(
                    "{} message size {size} is below minimum {min}",
                    message_type.code()
                ),
            ));
        }
        if size > max {
            return Err(Violation::new(
                ViolationKind::MessageSize,
                status::BAD_TCP_MESSAGE_TOO_LARGE,
                format!(
                    "{} message size {size} exceeds maximum {max}",
                    message_type.code()
                ),
            ));
        }
        Ok(size as usize)
    }

    fn accept_hello(&mut self, bytes: &[u8]) -> Result<Hello, Violation> {
        let hello = parse_hello(bytes)?;
        self.hello_seen = true;
        self.max_chunk_size = self.max_chunk_size.min(hello.send_buffer_size);
        Ok(hello)
    }

    /// Reads the symmetric security header of a MSG or CLO and counts the
    /// chunk against the request message it belongs to.
    fn accept_symmetric(
        &mut self,
        message_type: MessageType,
        chunk_type: ChunkType,
        bytes: &[u8],
    ) -> Result<FrameDetail, Violation> {
        let field = |at: usize| {
            u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
        };
        // Both fields lie within SYMMETRIC_MIN_LEN, which check_size enforced.
        let secure_channel_id = field(HEADER_LEN);
        let token_id = field(HEADER_LEN + 4);
        if message_type == MessageType::Message {
            self.count_chunk(secure_channel_id, token_id, chunk_type, bytes.len())?;
        }
        Ok(FrameDetail::Symmetric {
            secure_channel_id,
            token_id,
        })
    }

    /// Counts a MSG chunk into the open message of its channel and token.
    /// The request id that really groups chunks sits in the sequence header,
    /// which is encrypted under SignAndEncrypt, so the token replaces it.
    /// NOTE: a final chunk of another request under the same token also ends
    /// the count, so interleaved requests escape the chunk limit here; the
    /// server's own per-request limits still apply to them.
    fn count_chunk(
        &mut self,
        secure_channel_id: u32,
        token_id: u32,
        chunk_type: ChunkType,
        size: usize,
    ) -> Result<(), Violation> {
        let position = self.open_messages.iter().position(|open| {
            open.secure_channel_id == secure_channel_id && open.token_id == token_id
        });
        if chunk_type == ChunkType::Abort {
            // An abort ends the message without adding to it: a client that
            // would exceed MaxChunkCount sends one instead of the next chunk.
            if let Some(index) = position {
                self.open_messages.swap_remove(index);
            }
            return Ok(());
        }
        let mut open = match position {
            Some(index) => self.open_messages.swap_remove(index),
            None => OpenMessage {
                secure_channel_id,
                token_id,
                chunks: 0,
                bytes: 0,
            },
        };
        open.chunks += 1;
        open.bytes += size as u64;
        self.counters.max_chunks_per_message =
            self.counters.max_chunks_per_message.max(open.chunks);
        if open.chunks > self.max_chunk_count {
            return Err(self.flood(format!(
                "request message on channel {secure_channel_id} token {token_id} has more than {} chunks",
                self.max_chunk_count
            )));
        }
        if open.bytes > u64::from(self.limits.max_message_size) {
            return Err(self.flood(format!(
                "request message on channel {secure_channel_id} token {token_id} exceeds {} bytes",
                self.limits.max_message_size
            )));
        }
        if chunk_type == ChunkType::Intermediate {
            if self.open_messages.len() == MAX_OPEN_MESSAGES {
                return Err(self.flood(format!(
                    "more than {MAX_OPEN_MESSAGES} request messages open at once"
                )));
            }
            self.open_messages.push(open);
        }
        Ok(())
    }

    /// Builds the violation for a request message past its limits. The
    /// limits are the server's MaxChunkCount and MaxMessageSize, whose
    /// breach the Acknowledge message of OPC 10000-6 reports as
    /// Bad_RequestTooLarge.
    fn flood(&self, detail: String) -> Violation {
        Violation::new(
            ViolationKind::ChunkFlood,
            status::BAD_REQUEST_TOO_LARGE,
            detail,
        )
    }

    fn count(&mut self, message_type: MessageType, chunk_type: ChunkType, size: usize) {
        let counters = &mut self.counters;
        counters.bytes += size as u64;
        match message_type {
            MessageType::Hello => counters.hello += 1,
            MessageType::OpenSecureChannel => counters.open_secure_channel += 1,
            MessageType::CloseSecureChannel => counters.close_secure_channel += 1,
            MessageType::Message => {
                counters.message_chunks += 1;
                match chunk_type {
                    ChunkType::Intermediate => counters.intermediate_chunks += 1,
                    ChunkType::Abort => counters.abort_chunks += 1,
                    ChunkType::Final => {}
                }
            }
            _ => {}
        }
    }
}

fn malformed(detail: String) -> Violation {
    Violation::new(
        ViolationKind::Malformed,
        status::BAD_COMMUNICATION_ERROR,
        detail,
    )
}

/// Parses a Hello whose header and size bounds were checked. The size must
/// match the fields exactly: trailing bytes are rejected.
fn parse_hello(bytes: &[u8]) -> Result<Hello, Violation> {
    // check_size guaranteed HELLO_MIN_LEN bytes, so the fixed fields exist.
    let mut reader = Reader::new(&bytes[HEADER_LEN..]);
    let fields = [(); 5].map(|()| reader.u32().unwrap_or(0));
    let [protocol_version, receive_buffer_size, send_buffer_size, max_message_size, max_chunk_count] =
        fields;
    for (name, value) in [
        ("ReceiveBufferSize", receive_buffer_size),
        ("SendBufferSize", send_buffer_size),
    ] {
        if value < MIN_HELLO_BUFFER_SIZE {
            return Err(malformed(format!(
                "HEL {name} {value} is below minimum {MIN_HELLO_BUFFER_SIZE}"
            )));
        }
    }
    let url_error = |detail: String| {
        Violation::new(
            ViolationKind::EndpointUrl,
            status::BAD_TCP_ENDPOINT_URL_INVALID,
            detail,
        )
    };
    let length = reader.i32().unwrap_or(-1);
    if !(-1..=MAX_ENDPOINT_URL_LEN as i32).contains(&length) {
        return Err(url_error(format!(
            "HEL EndpointUrl length {length} is outside -1 to {MAX_ENDPOINT_URL_LEN}"
        )));
    }
    let length = length.max(0) as usize;
    if reader.remaining() != length {
        return Err(malformed(format!(
            "HEL message size {} does not match EndpointUrl length {length}",
            bytes.len()
        )));
    }
    let url = reader.take(length).unwrap_or_default();
    let endpoint_url = std::str::from_utf8(url)
        .map_err(|_| url_error("HEL EndpointUrl is not UTF-8".to_string()))?
        .to_string();
    Ok(Hello {
        protocol_version,
        receive_buffer_size,
        send_buffer_size,
        max_message_size,
        max_chunk_count,
        endpoint_url,
    })
}

/// Parses the secure channel id and asymmetric security header of an OPN.
/// The sequence header and body that follow may be encrypted, so only
/// their minimum length is checked.
fn parse_asymmetric_header(bytes: &Bytes) -> Result<AsymmetricHeader, Violation> {
    let mut reader = Reader::new(&bytes[HEADER_LEN..]);
    let truncated = || {
        malformed(
            "OPN asymmetric security header has a negative length or exceeds the message size"
                .to_string(),
        )
    };
    let secure_channel_id = reader.u32().ok_or_else(truncated)?;
    let policy = reader.byte_string().ok_or_else(truncated)?;
    // A null URI is valid encoding; the trust check rejects the policy.
    let policy = policy.unwrap_or_default();
    if policy.len() > MAX_SECURITY_POLICY_URI_LEN {
        return Err(malformed(format!(
            "OPN SecurityPolicyUri length {} exceeds maximum {MAX_SECURITY_POLICY_URI_LEN}",
            policy.len()
        )));
    }
    let security_policy_uri = std::str::from_utf8(policy)
        .map_err(|_| malformed("OPN SecurityPolicyUri is not UTF-8".to_string()))?
        .to_string();
    let certificate = reader.byte_string().ok_or_else(truncated)?;
    let thumbprint = reader.byte_string().ok_or_else(truncated)?;
    if reader.remaining() < 8 {
        return Err(malformed(format!(
            "OPN leaves {} bytes for the 8-byte sequence header",
            reader.remaining()
        )));
    }
    // The fields share the frame's buffer instead of copying it.
    Ok(AsymmetricHeader {
        secure_channel_id,
        security_policy_uri,
        sender_certificate: certificate.map(|part| bytes.slice_ref(part)),
        receiver_thumbprint: thumbprint.map(|part| bytes.slice_ref(part)),
    })
}

/// A little-endian reader of OPC UA binary fields that returns `None` past
/// the end instead of panicking.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Reader { bytes }
    }

    fn remaining(&self) -> usize {
        self.bytes.len()
    }

    fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    fn take(&mut self, len: usize) -> Option<&'a [u8]> {
        if self.bytes.len() < len {
            return None;
        }
        let (head, tail) = self.bytes.split_at(len);
        self.bytes = tail;
        Some(head)
    }

    fn u32(&mut self) -> Option<u32> {
        let bytes = self.take(4)?;
        Some(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    }

    fn i32(&mut self) -> Option<i32> {
        self.u32().map(|value| value as i32)
    }

    /// Reads a String or ByteString: `Some(None)` for null (length -1),
    /// `None` when the length is negative otherwise or runs past the end.
    fn byte_string(&mut self) -> Option<Option<&'a [u8]>> {
        match self.i32()? {
            -1 => Some(None),
            length if length >= 0 => self.take(length as usize).map(Some),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY_NONE: &str = "http://opcfoundation.org/UA/SecurityPolicy#None";

    fn message(code: &[u8; 4], body: &[u8]) -> Vec<u8> {
        let mut bytes = code.to_vec();
        bytes.extend_from_slice(&((HEADER_LEN + body.len()) as u32).to_le_bytes());
        bytes.extend_from_slice(body);
        bytes
    }

    fn string(value: Option<&[u8]>) -> Vec<u8> {
        match value {
            None => (-1i32).to_le_bytes().to_vec(),
            Some(value) => {
                let mut bytes = (value.len() as i32).to_le_bytes().to_vec();
                bytes.extend_from_slice(value);
                bytes
            }
        }
    }

    fn hello_with(send_buffer_size: u32, url: &[u8]) -> Vec<u8> {
        let mut body = Vec::new();
        for field in [0, 0x1_0000, send_buffer_size, 0, 0] {
            body.extend_from_slice(&u32::to_le_bytes(field));
        }
        body.extend_from_slice(&string(Some(url)));
        message(b"HELF", &body)
    }

    fn hello() -> Vec<u8> {
        hello_with(0x1_0000, b"opc.tcp://127.0.0.1:4840")
    }

    fn open(channel: u32, certificate: Option<&[u8]>, thumbprint: Option<&[u8]>) -> Vec<u8> {
        let mut body = channel.to_le_bytes().to_vec();
        body.extend_from_slice(&string(Some(POLICY_NONE.as_bytes())));
        body.extend_from_slice(&string(certificate));
        body.extend_from_slice(&string(thumbprint));
        body.extend_from_slice(&[0xA5; 40]);
        message(b"OPNF", &body)
    }

    fn symmetric(code: &[u8; 4], channel: u32, token: u32, len: usize) -> Vec<u8> {
        let mut body = channel.to_le_bytes().to_vec();
        body.extend_from_slice(&token.to_le_bytes());
        body.resize(len - HEADER_LEN, 0x5A);
        message(code, &body)
    }

    fn chunk(chunk_type: u8, token: u32) -> Vec<u8> {
        symmetric(&[b'M', b'S', b'G', chunk_type], 7, token, 100)
    }

    fn chunks(types: &[u8], token: u32) -> Vec<u8> {
        types
            .iter()
            .flat_map(|chunk_type| chunk(*chunk_type, token))
            .collect()
    }

    fn session() -> Vec<Vec<u8>> {
        vec![
            hello(),
            open(0, None, None),
            chunk(b'F', 1),
            chunk(b'C', 1),
            chunk(b'C', 1),
            chunk(b'F', 1),
            chunk(b'C', 1),
            chunk(b'A', 1),
            symmetric(b"CLOF", 7, 1, SYMMETRIC_MIN_LEN),
        ]
    }

    fn guard() -> FrameGuard {
        FrameGuard::new(FramingLimits::default())
    }

    fn limited(max_chunk_count: u32, max_message_size: u32) -> FrameGuard {
        FrameGuard::new(FramingLimits {
            max_chunk_size: 0x1_0000,
            max_chunk_count,
            max_message_size,
        })
    }

    fn after_hello(mut guard: FrameGuard) -> FrameGuard {
        assert_eq!(guard.push(&hello()).unwrap().len(), 1);
        guard
    }

    fn violation(guard: &mut FrameGuard, bytes: &[u8]) -> Violation {
        guard.push(bytes).expect_err("bytes must be rejected")
    }

    #[test]
    fn session_passes_in_order_with_counters() {
        let messages = session();
        let stream = messages.concat();
        let mut guard = guard();
        let frames = guard.push(&stream).unwrap();
        let passed: Vec<&[u8]> = frames.iter().map(|frame| &frame.bytes[..]).collect();
        let expected: Vec<&[u8]> = messages.iter().map(Vec::as_slice).collect();
        assert_eq!(passed, expected);
        assert_eq!(
            *guard.counters(),
            FrameCounters {
                hello: 1,
                open_secure_channel: 1,
                message_chunks: 6,
                intermediate_chunks: 3,
                abort_chunks: 1,
                close_secure_channel: 1,
                bytes: stream.len() as u64,
                max_chunks_per_message: 3,
            }
        );
    }

    #[test]
    fn every_split_point_yields_same_frames() {
        let stream = session().concat();
        let whole = guard().push(&stream).unwrap();
        for split in 0..=stream.len() {
            let mut guard = guard();
            let mut frames = guard.push(&stream[..split]).unwrap();
            frames.extend(guard.push(&stream[split..]).unwrap());
            assert_eq!(frames, whole, "split at {split}");
        }
    }

    #[test]
    fn byte_by_byte_yields_same_frames() {
        let stream = session().concat();
        let whole = guard().push(&stream).unwrap();
        let mut guard = guard();
        let mut frames = Vec::new();
        for byte in &stream {
            frames.extend(guard.push(std::slice::from_ref(byte)).unwrap());
        }
        assert_eq!(frames, whole);
        assert_eq!(guard.counters().bytes, stream.len() as u64);
    }

    #[test]
    fn hello_fields_are_parsed() {
        let frames = guard().push(&hello()).unwrap();
        assert_eq!(
            frames[0].detail,
            FrameDetail::Hello(Hello {
                protocol_version: 0,
                receive_buffer_size: 0x1_0000,
                send_buffer_size: 0x1_0000,
                max_message_size: 0,
                max_chunk_count: 0,
                endpoint_url: "opc.tcp://127.0.0.1:4840".to_string(),
            })
        );
    }

    #[test]
    fn first_message_not_hello_is_rejected() {
        for first in [
            open(0, None, None),
            chunk(b'F', 1),
            message(b"GET ", b"/ HTTP/1.1\r\n"),
        ] {
            let found = violation(&mut guard(), &first[..HEADER_LEN]);
            assert_eq!(found.kind, ViolationKind::NotHello);
            assert_eq!(found.kind.as_str(), "opcua_not_hello");
            assert_eq!(found.status, 0x807E_0000);
        }
    }

    #[test]
    fn not_hello_error_message_is_exact() {
        let found = violation(&mut guard(), b"OPNF\x20\0\0\0");
        assert_eq!(found.detail, "first message type \"OPN\" is not HEL");
        let mut expected = b"ERRF".to_vec();
        expected.extend_from_slice(&(16 + 35u32).to_le_bytes());
        expected.extend_from_slice(&0x807E_0000u32.to_le_bytes());
        expected.extend_from_slice(&35i32.to_le_bytes());
        expected.extend_from_slice(b"first message type \"OPN\" is not HEL");
        assert_eq!(found.error_message().to_vec(), expected);
    }

    #[test]
    fn second_hello_is_rejected() {
        let found = violation(&mut after_hello(guard()), &hello());
        assert_eq!(found.kind, ViolationKind::HelloRepeated);
        assert_eq!(found.status, 0x807E_0000);
    }

    #[test]
    fn server_message_types_from_client_are_rejected() {
        for code in [b"ACKF", b"ERRF", b"RHEF", b"XYZF"] {
            let found = violation(&mut after_hello(guard()), &message(code, &[0; 24]));
            assert_eq!(found.kind, ViolationKind::MessageType, "{code:?}");
            assert_eq!(found.status, 0x807E_0000);
        }
    }

    #[test]
    fn invalid_chunk_types_are_rejected() {
        let mut hello_chunk = hello();
        hello_chunk[3] = b'C';
        assert_eq!(
            violation(&mut guard(), &hello_chunk).kind,
            ViolationKind::ChunkType
        );
        let mut open_chunk = open(0, None, None);
        open_chunk[3] = b'C';
        let cases = [
            open_chunk,
            symmetric(b"CLOA", 7, 1, 24),
            chunk(b'X', 1),
            chunk(b'f', 1),
        ];
        for case in cases {
            let found = violation(&mut after_hello(guard()), &case[..HEADER_LEN]);
            assert_eq!(found.kind, ViolationKind::ChunkType);
            assert_eq!(found.status, 0x807E_0000);
        }
    }

    #[test]
    fn sizes_below_type_minimum_are_rejected() {
        let cases: [(&[u8; 4], u32); 6] = [
            (b"MSGF", 0),
            (b"MSGF", 4),
            (b"MSGF", 23),
            (b"CLOF", 23),
            (b"OPNF", 31),
            (b"OPNF", 8),
        ];
        for (code, size) in cases {
            let mut header = code.to_vec();
            header.extend_from_slice(&size.to_le_bytes());
            let found = violation(&mut after_hello(guard()), &header);
            assert_eq!(found.kind, ViolationKind::MessageSize, "{code:?} {size}");
            assert_eq!(found.status, 0x8005_0000);
        }
        for size in [0u32, 4, 31] {
            let mut header = b"HELF".to_vec();
            header.extend_from_slice(&size.to_le_bytes());
            assert_eq!(
                violation(&mut guard(), &header).kind,
                ViolationKind::MessageSize
            );
        }
    }

    #[test]
    fn sizes_at_type_minimum_pass() {
        let mut guard = after_hello(guard());
        let frames = guard
            .push(&[symmetric(b"MSGF", 7, 1, 24), symmetric(b"CLOF", 7, 1, 24)].concat())
            .unwrap();
        assert_eq!(frames.len(), 2);
        let mut minimal_open = b"OPNF\x20\0\0\0\0\0\0\0".to_vec();
        minimal_open.extend_from_slice(&string(Some(b"")));
        minimal_open.extend_from_slice(&string(None));
        minimal_open.extend_from_slice(&string(None));
        minimal_open.extend_from_slice(&[0; 8]);
        assert_eq!(minimal_open.len(), OPEN_MIN_LEN);
        assert_eq!(guard.push(&minimal_open).unwrap().len(), 1);
    }

    #[test]
    fn chunk_size_limit_is_checked_on_the_header() {
        let mut guard = after_hello(guard());
        assert_eq!(guard.push(&chunk_of(0x1_0000)).unwrap().len(), 1);
        let found = violation(&mut guard, &chunk_of(0x1_0001)[..HEADER_LEN]);
        assert_eq!(found.kind, ViolationKind::MessageSize);
        assert_eq!(found.status, 0x8080_0000);
        assert_eq!(found.detail, "MSG message size 65537 exceeds maximum 65536");
    }

    fn chunk_of(size: usize) -> Vec<u8> {
        symmetric(b"MSGF", 7, 1, size)
    }

    #[test]
    fn hello_send_buffer_size_lowers_chunk_limit() {
        let mut guard = guard();
        guard.push(&hello_with(8192, b"")).unwrap();
        assert_eq!(guard.effective_limits().max_chunk_size, 8192);
        assert_eq!(guard.push(&chunk_of(8192)).unwrap().len(), 1);
        assert_eq!(violation(&mut guard, &chunk_of(8193)).status, 0x8080_0000);
    }

    #[test]
    fn acknowledge_lowers_limits() {
        let mut ack = b"ACKF\x1c\0\0\0".to_vec();
        for field in [0u32, 8192, 8192, 0x10_0000, 2] {
            ack.extend_from_slice(&field.to_le_bytes());
        }
        let parsed = Acknowledge::parse(&ack).unwrap();
        assert_eq!(
            parsed,
            Acknowledge {
                protocol_version: 0,
                receive_buffer_size: 8192,
                send_buffer_size: 8192,
                max_message_size: 0x10_0000,
                max_chunk_count: 2,
            }
        );
        assert_eq!(Acknowledge::parse(&ack[..27]), None);
        assert_eq!(Acknowledge::parse_prefix(&ack[..27]), None);
        let followed = [ack.clone(), b"MSGF".to_vec()].concat();
        assert_eq!(Acknowledge::parse_prefix(&followed), Some(parsed));
        let mut guard = after_hello(guard());
        guard.apply_acknowledge(&parsed);
        let limits = guard.effective_limits();
        assert_eq!((limits.max_chunk_size, limits.max_chunk_count), (8192, 2));
        guard
            .push(&[chunk(b'C', 1), chunk(b'F', 1)].concat())
            .unwrap();
        let found = violation(
            &mut guard,
            &[chunk(b'C', 1), chunk(b'C', 1), chunk(b'F', 1)].concat(),
        );
        assert_eq!(found.kind, ViolationKind::ChunkFlood);
    }

    #[test]
    fn acknowledge_zero_limits_keep_ours() {
        let mut guard = guard();
        guard.apply_acknowledge(&Acknowledge {
            protocol_version: 0,
            receive_buffer_size: 0,
            send_buffer_size: 0,
            max_message_size: 0,
            max_chunk_count: 0,
        });
        assert_eq!(guard.effective_limits(), FramingLimits::default());
    }

    #[test]
    fn endpoint_url_length_is_bounded() {
        let longest = vec![b'u'; MAX_ENDPOINT_URL_LEN];
        assert_eq!(guard().push(&hello_with(8192, &longest)).unwrap().len(), 1);
        let too_long = vec![b'u'; MAX_ENDPOINT_URL_LEN + 1];
        let found = violation(&mut guard(), &hello_with(8192, &too_long));
        assert_eq!(found.kind, ViolationKind::MessageSize);
        assert_eq!(found.status, 0x8080_0000);
        // A short message that announces a long URL.
        let mut lying = hello();
        lying[28..32].copy_from_slice(&4097i32.to_le_bytes());
        let found = violation(&mut guard(), &lying);
        assert_eq!(found.kind, ViolationKind::EndpointUrl);
        assert_eq!(found.status, 0x8083_0000);
        lying[28..32].copy_from_slice(&(-2i32).to_le_bytes());
        assert_eq!(
            violation(&mut guard(), &lying).kind,
            ViolationKind::EndpointUrl
        );
    }

    #[test]
    fn endpoint_url_must_be_utf8() {
        let found = violation(&mut guard(), &hello_with(8192, b"opc.tcp://\xff"));
        assert_eq!(found.kind, ViolationKind::EndpointUrl);
        assert_eq!(found.status, 0x8083_0000);
    }

    #[test]
    fn null_endpoint_url_passes_as_empty() {
        let mut null_url = hello_with(8192, b"");
        null_url[28..32].copy_from_slice(&(-1i32).to_le_bytes());
        let frames = guard().push(&null_url).unwrap();
        let FrameDetail::Hello(hello) = &frames[0].detail else {
            panic!("not a hello: {:?}", frames[0].detail);
        };
        assert_eq!(hello.endpoint_url, "");
    }

    #[test]
    fn hello_size_must_match_url_length() {
        let mut trailing = hello();
        trailing.push(0);
        let size = trailing.len() as u32;
        trailing[4..8].copy_from_slice(&size.to_le_bytes());
        let found = violation(&mut guard(), &trailing);
        assert_eq!(found.kind, ViolationKind::Malformed);
        assert_eq!(found.status, 0x8005_0000);
    }

    #[test]
    fn hello_buffer_sizes_below_minimum_are_rejected() {
        let found = violation(&mut guard(), &hello_with(1023, b""));
        assert_eq!(found.kind, ViolationKind::Malformed);
        assert_eq!(
            found.detail,
            "HEL SendBufferSize 1023 is below minimum 1024"
        );
        assert_eq!(guard().push(&hello_with(1024, b"")).unwrap().len(), 1);
    }

    #[test]
    fn chunk_count_limit_includes_final_chunk() {
        let mut guard = after_hello(limited(4, u32::MAX));
        let four = chunks(b"CCCF", 1);
        assert_eq!(guard.push(&four).unwrap().len(), 4);
        let five = chunks(b"CCCC", 1);
        assert_eq!(guard.push(&five).unwrap().len(), 4);
        let found = violation(&mut guard, &chunk(b'F', 1));
        assert_eq!(found.kind, ViolationKind::ChunkFlood);
        assert_eq!(found.kind.as_str(), "opcua_chunk_flood");
        assert_eq!(found.status, 0x80B8_0000);
        assert_eq!(
            found.detail,
            "request message on channel 7 token 1 has more than 4 chunks"
        );
    }

    #[test]
    fn endless_intermediate_chunks_are_rejected() {
        let mut guard = after_hello(guard());
        let limit = FramingLimits::default().max_chunk_count as usize;
        for index in 0..limit {
            assert_eq!(
                guard.push(&chunk(b'C', 1)).unwrap().len(),
                1,
                "chunk {index}"
            );
        }
        assert_eq!(
            violation(&mut guard, &chunk(b'C', 1)).kind,
            ViolationKind::ChunkFlood
        );
        assert_eq!(guard.counters().intermediate_chunks, limit as u64);
    }

    #[test]
    fn message_byte_budget_is_enforced() {
        let mut guard = after_hello(limited(64, 300));
        assert_eq!(
            guard
                .push(&[chunk(b'C', 1), chunk(b'C', 1), chunk(b'F', 1)].concat())
                .unwrap()
                .len(),
            3
        );
        let found = violation(&mut guard, &chunks(b"CCCF", 1));
        assert_eq!(found.kind, ViolationKind::ChunkFlood);
        assert_eq!(
            found.detail,
            "request message on channel 7 token 1 exceeds 300 bytes"
        );
    }

    #[test]
    fn abort_ends_message_without_counting() {
        let mut guard = after_hello(limited(2, u32::MAX));
        let aborted = [chunk(b'C', 1), chunk(b'C', 1), chunk(b'A', 1)].concat();
        assert_eq!(guard.push(&aborted).unwrap().len(), 3);
        assert_eq!(
            guard
                .push(&[chunk(b'C', 1), chunk(b'F', 1)].concat())
                .unwrap()
                .len(),
            2
        );
    }

    #[test]
    fn tokens_are_counted_apart() {
        let mut guard = after_hello(limited(2, u32::MAX));
        let interleaved = [
            chunk(b'C', 1),
            chunk(b'C', 2),
            chunk(b'F', 1),
            chunk(b'F', 2),
        ]
        .concat();
        assert_eq!(guard.push(&interleaved).unwrap().len(), 4);
    }

    #[test]
    fn open_messages_are_capped() {
        let mut guard = after_hello(guard());
        for token in 0..MAX_OPEN_MESSAGES as u32 {
            guard.push(&chunk(b'C', token)).unwrap();
        }
        let found = violation(&mut guard, &chunk(b'C', 99));
        assert_eq!(found.kind, ViolationKind::ChunkFlood);
        assert_eq!(found.detail, "more than 4 request messages open at once");
    }

    #[test]
    fn open_header_is_parsed() {
        let certificate = [0x30, 0x03, 0x02, 0x01, 0x05];
        let thumbprint = [0xAB; 20];
        let mut guard = after_hello(guard());
        let frames = guard
            .push(&open(9, Some(&certificate), Some(&thumbprint)))
            .unwrap();
        assert_eq!(
            frames[0].detail,
            FrameDetail::OpenSecureChannel(AsymmetricHeader {
                secure_channel_id: 9,
                security_policy_uri: POLICY_NONE.to_string(),
                sender_certificate: Some(Bytes::copy_from_slice(&certificate)),
                receiver_thumbprint: Some(Bytes::copy_from_slice(&thumbprint)),
            })
        );
    }

    #[test]
    fn malformed_open_headers_are_rejected() {
        let mut long_policy = 0u32.to_le_bytes().to_vec();
        long_policy.extend_from_slice(&string(Some(&[b'p'; 256])));
        long_policy.extend_from_slice(&[0xFF; 16]);
        let mut negative = 0u32.to_le_bytes().to_vec();
        negative.extend_from_slice(&(-2i32).to_le_bytes());
        negative.extend_from_slice(&[0xFF; 24]);
        let mut overrun = 0u32.to_le_bytes().to_vec();
        overrun.extend_from_slice(&string(Some(b"p")));
        overrun.extend_from_slice(&1000i32.to_le_bytes());
        overrun.extend_from_slice(&[0; 20]);
        let mut no_sequence = 0u32.to_le_bytes().to_vec();
        no_sequence.extend_from_slice(&string(Some(&[b'p'; 10])));
        no_sequence.extend_from_slice(&string(None));
        no_sequence.extend_from_slice(&string(None));
        no_sequence.extend_from_slice(&[0; 7]);
        let cases = [
            (
                long_policy,
                "OPN SecurityPolicyUri length 256 exceeds maximum 255",
            ),
            (
                negative,
                "OPN asymmetric security header has a negative length or exceeds the message size",
            ),
            (
                overrun,
                "OPN asymmetric security header has a negative length or exceeds the message size",
            ),
            (
                no_sequence,
                "OPN leaves 7 bytes for the 8-byte sequence header",
            ),
        ];
        for (body, detail) in cases {
            let found = violation(&mut after_hello(guard()), &message(b"OPNF", &body));
            assert_eq!(found.kind, ViolationKind::Malformed);
            assert_eq!(found.status, 0x8005_0000);
            assert_eq!(found.detail, detail);
        }
    }

    #[test]
    fn null_security_policy_passes_as_empty() {
        let mut body = 0u32.to_le_bytes().to_vec();
        body.extend_from_slice(&[0xFF; 28]);
        let frames = after_hello(guard()).push(&message(b"OPNF", &body)).unwrap();
        let FrameDetail::OpenSecureChannel(header) = &frames[0].detail else {
            panic!("not an OPN: {:?}", frames[0].detail);
        };
        assert_eq!(header.security_policy_uri, "");
        assert_eq!(header.sender_certificate, None);
    }

    #[test]
    fn violation_is_sticky() {
        let mut guard = guard();
        let first = violation(&mut guard, &chunk(b'F', 1));
        assert_eq!(violation(&mut guard, &hello()), first);
    }

    #[test]
    fn frames_before_violation_in_same_push_are_withheld() {
        let mut guard = guard();
        let found = violation(&mut guard, &[hello(), hello()].concat());
        assert_eq!(found.kind, ViolationKind::HelloRepeated);
        assert_eq!(guard.counters().hello, 1);
    }

    #[test]
    fn error_reason_is_cut_at_limit() {
        let reason = "é".repeat(MAX_REASON_LEN);
        let message = encode_error(0x8005_0000, &reason);
        assert_eq!(message.len(), HEADER_LEN + 8 + MAX_REASON_LEN);
        assert_eq!(&message[12..16], &(MAX_REASON_LEN as i32).to_le_bytes());
        let odd = format!("x{reason}");
        // One byte less keeps the cut on a character boundary.
        assert_eq!(
            encode_error(0, &odd).len(),
            HEADER_LEN + 8 + MAX_REASON_LEN - 1
        );
    }
}
