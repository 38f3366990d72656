//! A simulated PLC for `sluice demo` and the tests: a Modbus/TCP server built
//! on tokio-modbus with 65536 of each data type in shared memory, and an
//! optional JSON-lines log of every request it receives.
//!
//! Initial memory, so that tests can recognise each value:
//! - holding register n = n;
//! - input register n = 30000 + (n % 1000);
//! - coil n is on when n <= 99 and n is a multiple of 3;
//! - discrete input n is on when n is even.

use std::fs::{File, OpenOptions};
use std::future::{ready, Ready};
use std::io::{self, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use tokio::net::{TcpListener, TcpStream};
use tokio_modbus::server::tcp::Server;
use tokio_modbus::server::Service;
use tokio_modbus::{ExceptionCode, Request, Response, SlaveRequest};

/// Number of addresses of each data type (the whole 16-bit address space).
const TABLE_SIZE: usize = 0x1_0000;

/// Quantity limits of the Modbus Application Protocol Specification V1.1b3,
/// sections 6.1 to 6.17.
const MAX_READ_BITS: u16 = 0x07D0;
const MAX_READ_REGISTERS: u16 = 0x007D;
const MAX_WRITE_BITS: u16 = 0x07B0;
const MAX_WRITE_REGISTERS: u16 = 0x007B;
const MAX_READ_WRITE_WRITE_REGISTERS: u16 = 0x0079;

/// FC 8 sub-function 0x0004: the device enters listen-only mode and sends no response.
const DIAGNOSTICS: u8 = 0x08;
const FORCE_LISTEN_ONLY: [u8; 2] = [0x00, 0x04];

/// Unit id 0 addresses every device behind a serial gateway, which applies
/// a write without a response.
const BROADCAST_UNIT: u8 = 0;

struct Memory {
    holding: Vec<u16>,
    input: Vec<u16>,
    coils: Vec<bool>,
    discrete: Vec<bool>,
}

impl Memory {
    fn new() -> Memory {
        let holding = (0..TABLE_SIZE).map(|n| n as u16).collect();
        let input = (0..TABLE_SIZE)
            .map(|n| 30_000 + (n % 1000) as u16)
            .collect();
        let coils = (0..TABLE_SIZE).map(|n| n <= 99 && n % 3 == 0).collect();
        let discrete = (0..TABLE_SIZE).map(|n| n % 2 == 0).collect();
        Memory {
            holding,
            input,
            coils,
            discrete,
        }
    }
}

struct SimInner {
    memory: Mutex<Memory>,
    requests: AtomicU64,
    log: OnceLock<Mutex<File>>,
}

/// A simulated PLC. Clones share memory, request count and log.
#[derive(Clone)]
pub struct SimPlc {
    inner: Arc<SimInner>,
}

impl Default for SimPlc {
    fn default() -> SimPlc {
        SimPlc::new()
    }
}

impl SimPlc {
    /// Creates a PLC with the initial memory described at the top of this file.
    pub fn new() -> SimPlc {
        let inner = SimInner {
            memory: Mutex::new(Memory::new()),
            requests: AtomicU64::new(0),
            log: OnceLock::new(),
        };
        SimPlc {
            inner: Arc::new(inner),
        }
    }

    /// Appends one JSON line per received request to `path`, such as
    /// `{"address":0,"function":3,"quantity":10,"unit":1}`. `address` and
    /// `quantity` are left out for function codes without them, and FC 23
    /// also carries `write_address` and `write_quantity`. Each line is
    /// written before the response is sent. Every clone shares the log.
    ///
    /// Fails with `AlreadyExists` when this PLC already has a log.
    pub fn with_log(self, path: &Path) -> io::Result<SimPlc> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        self.inner.log.set(Mutex::new(file)).map_err(|_| {
            io::Error::new(
                io::ErrorKind::AlreadyExists,
                "simulated PLC already has a request log",
            )
        })?;
        Ok(self)
    }

    pub fn holding(&self, address: u16) -> u16 {
        self.memory().holding[usize::from(address)]
    }

    pub fn set_holding(&self, address: u16, value: u16) {
        self.memory().holding[usize::from(address)] = value;
    }

    pub fn input(&self, address: u16) -> u16 {
        self.memory().input[usize::from(address)]
    }

    pub fn set_input(&self, address: u16, value: u16) {
        self.memory().input[usize::from(address)] = value;
    }

    pub fn coil(&self, address: u16) -> bool {
        self.memory().coils[usize::from(address)]
    }

    pub fn set_coil(&self, address: u16, value: bool) {
        self.memory().coils[usize::from(address)] = value;
    }

    pub fn discrete(&self, address: u16) -> bool {
        self.memory().discrete[usize::from(address)]
    }

    pub fn set_discrete(&self, address: u16, value: bool) {
        self.memory().discrete[usize::from(address)] = value;
    }

    /// Returns the number of requests received, including those without a response.
    pub fn request_count(&self) -> u64 {
        self.inner.requests.load(Ordering::Relaxed)
    }

    /// Serves Modbus/TCP on `listener` until the returned future is dropped
    /// or its task aborted, which also ends every connection it accepted.
    pub async fn serve(self, listener: TcpListener) -> io::Result<()> {
        let server = Server::new(listener);
        let on_connected = |stream: TcpStream, peer: SocketAddr| {
            let service = SimService { plc: self.clone() };
            async move {
                // Without TCP_NODELAY, pipelined responses wait for delayed ACKs.
                stream.set_nodelay(true)?;
                tracing::debug!(%peer, "simulated PLC accepted a connection");
                Ok(Some((service, stream)))
            }
        };
        let on_process_error = |error: io::Error| {
            tracing::debug!(%error, "simulated PLC closed a connection");
        };
        server.serve(&on_connected, on_process_error).await
    }

    fn memory(&self) -> MutexGuard<'_, Memory> {
        // Every table entry is a valid value at all times, so memory that a
        // panicking writer left behind is still usable.
        self.inner
            .memory
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn process(&self, unit: u8, request: Request<'_>) -> Result<Option<Response>, ExceptionCode> {
        self.inner.requests.fetch_add(1, Ordering::Relaxed);
        self.record(unit, &request);

        if unit == BROADCAST_UNIT && is_write(&request) {
            // Exceptions are not sent for broadcasts either.
            let _ = self.execute(request);
            return Ok(None);
        }
        if let Request::Custom(DIAGNOSTICS, data) = &request {
            if data.starts_with(&FORCE_LISTEN_ONLY) {
                // NOTE: a real device stays silent until FC 8 sub-function
                // 0x0001 restarts communications, but this simulation keeps
                // responding to later requests.
                return Ok(None);
            }
        }
        self.execute(request).map(Some)
    }

    fn execute(&self, request: Request<'_>) -> Result<Response, ExceptionCode> {
        let mut memory = self.memory();
        match request {
            Request::ReadCoils(address, quantity) => {
                let range = checked_range(address, quantity, MAX_READ_BITS)?;
                Ok(Response::ReadCoils(memory.coils[range].to_vec()))
            }
            Request::ReadDiscreteInputs(address, quantity) => {
                let range = checked_range(address, quantity, MAX_READ_BITS)?;
                Ok(Response::ReadDiscreteInputs(
                    memory.discrete[range].to_vec(),
                ))
            }
            Request::ReadHoldingRegisters(address, quantity) => {
                let range = checked_range(address, quantity, MAX_READ_REGISTERS)?;
                Ok(Response::ReadHoldingRegisters(
                    memory.holding[range].to_vec(),
                ))
            }
            Request::ReadInputRegisters(address, quantity) => {
                let range = checked_range(address, quantity, MAX_READ_REGISTERS)?;
                Ok(Response::ReadInputRegisters(memory.input[range].to_vec()))
            }
            Request::WriteSingleCoil(address, value) => {
                memory.coils[usize::from(address)] = value;
                Ok(Response::WriteSingleCoil(address, value))
            }
            Request::WriteSingleRegister(address, value) => {
                memory.holding[usize::from(address)] = value;
                Ok(Response::WriteSingleRegister(address, value))
            }
            Request::WriteMultipleCoils(address, values) => {
                let quantity = write_quantity(&values)?;
                let range = checked_range(address, quantity, MAX_WRITE_BITS)?;
                memory.coils[range].copy_from_slice(&values);
                Ok(Response::WriteMultipleCoils(address, quantity))
            }
            Request::WriteMultipleRegisters(address, values) => {
                let quantity = write_quantity(&values)?;
                let range = checked_range(address, quantity, MAX_WRITE_REGISTERS)?;
                memory.holding[range].copy_from_slice(&values);
                Ok(Response::WriteMultipleRegisters(address, quantity))
            }
            Request::MaskWriteRegister(address, and_mask, or_mask) => {
                // Modbus Application Protocol Specification V1.1b3, 6.16.
                let register = &mut memory.holding[usize::from(address)];
                *register = (*register & and_mask) | (or_mask & !and_mask);
                Ok(Response::MaskWriteRegister(address, and_mask, or_mask))
            }
            Request::ReadWriteMultipleRegisters(read_address, read_quantity, address, values) => {
                let quantity = write_quantity(&values)?;
                let write_range = checked_range(address, quantity, MAX_READ_WRITE_WRITE_REGISTERS)?;
                let read_range = checked_range(read_address, read_quantity, MAX_READ_REGISTERS)?;
                // The write happens before the read (specification 6.17).
                memory.holding[write_range].copy_from_slice(&values);
                let read = memory.holding[read_range].to_vec();
                Ok(Response::ReadWriteMultipleRegisters(read))
            }
            _ => Err(ExceptionCode::IllegalFunction),
        }
    }

    fn record(&self, unit: u8, request: &Request<'_>) {
        let Some(log) = self.inner.log.get() else {
            return;
        };
        let mut line = log_line(unit, request).to_string();
        line.push('\n');
        let mut file = log.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Err(error) = file.write_all(line.as_bytes()) {
            tracing::warn!(%error, "simulated PLC failed to write its request log");
        }
    }
}

/// The per-connection handle that tokio-modbus calls for each request.
struct SimService {
    plc: SimPlc,
}

impl Service for SimService {
    type Request = SlaveRequest<'static>;
    type Response = Option<Response>;
    type Exception = ExceptionCode;
    type Future = Ready<Result<Option<Response>, ExceptionCode>>;

    fn call(&self, request: SlaveRequest<'static>) -> Self::Future {
        ready(self.plc.process(request.slave, request.request))
    }
}

fn is_write(request: &Request<'_>) -> bool {
    matches!(
        request,
        Request::WriteSingleCoil(..)
            | Request::WriteSingleRegister(..)
            | Request::WriteMultipleCoils(..)
            | Request::WriteMultipleRegisters(..)
            | Request::MaskWriteRegister(..)
    )
}

/// Returns the table range for `quantity` items from `address`, or the
/// exception the specification requires: 0x03 for a quantity outside
/// 1..=`max`, then 0x02 for a range past the last address.
fn checked_range(
    address: u16,
    quantity: u16,
    max: u16,
) -> Result<std::ops::Range<usize>, ExceptionCode> {
    if quantity == 0 || quantity > max {
        return Err(ExceptionCode::IllegalDataValue);
    }
    let start = usize::from(address);
    let end = start + usize::from(quantity);
    if end > TABLE_SIZE {
        return Err(ExceptionCode::IllegalDataAddress);
    }
    Ok(start..end)
}

fn write_quantity<T>(values: &[T]) -> Result<u16, ExceptionCode> {
    u16::try_from(values.len()).map_err(|_| ExceptionCode::IllegalDataValue)
}

fn log_line(unit: u8, request: &Request<'_>) -> serde_json::Value {
    let function = request.function_code().value();
    let (address, quantity) = match request {
        Request::ReadCoils(address, quantity)
        | Request::ReadDiscreteInputs(address, quantity)
        | Request::ReadHoldingRegisters(address, quantity)
        | Request::ReadInputRegisters(address, quantity) => (*address, *quantity),
        Request::WriteSingleCoil(address, _)
        | Request::WriteSingleRegister(address, _)
        | Request::MaskWriteRegister(address, _, _) => (*address, 1),
        Request::WriteMultipleCoils(address, values) => (*address, values.len() as u16),
        Request::WriteMultipleRegisters(address, values) => (*address, values.len() as u16),
        Request::ReadWriteMultipleRegisters(read_address, read_quantity, address, values) => {
            return serde_json::json!({
                "unit": unit,
                "function": function,
                "address": read_address,
                "quantity": read_quantity,
                "write_address": address,
                "write_quantity": values.len(),
            });
        }
        _ => return serde_json::json!({ "unit": unit, "function": function }),
    };
    serde_json::json!({
        "unit": unit,
        "function": function,
        "address": address,
        "quantity": quantity,
    })
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use super::*;

    fn registers(response: Result<Option<Response>, ExceptionCode>) -> Vec<u16> {
        match response {
            Ok(Some(Response::ReadHoldingRegisters(values))) => values,
            Ok(Some(Response::ReadInputRegisters(values))) => values,
            Ok(Some(Response::ReadWriteMultipleRegisters(values))) => values,
            other => panic!("expected register values, got {other:?}"),
        }
    }

    #[test]
    fn initial_memory_has_documented_values() {
        let plc = SimPlc::new();
        assert_eq!(plc.holding(0), 0);
        assert_eq!(plc.holding(9999), 9999);
        assert_eq!(plc.holding(65535), 65535);
        assert_eq!(plc.input(0), 30000);
        assert_eq!(plc.input(1234), 30234);
        assert!(plc.coil(0));
        assert!(!plc.coil(1));
        assert!(plc.coil(99));
        assert!(!plc.coil(102));
        assert!(plc.discrete(0));
        assert!(!plc.discrete(1));
    }

    #[test]
    fn reads_holding_registers_from_memory() {
        let plc = SimPlc::new();
        plc.set_holding(101, 7);
        let values = registers(plc.process(1, Request::ReadHoldingRegisters(100, 3)));
        assert_eq!(values, vec![100, 7, 102]);
        assert_eq!(plc.request_count(), 1);
    }

    #[test]
    fn reads_coils_and_discrete_inputs() {
        let plc = SimPlc::new();
        let coils = plc.process(1, Request::ReadCoils(0, 4));
        assert_eq!(
            coils,
            Ok(Some(Response::ReadCoils(vec![true, false, false, true])))
        );
        let inputs = plc.process(1, Request::ReadDiscreteInputs(1, 3));
        assert_eq!(
            inputs,
            Ok(Some(Response::ReadDiscreteInputs(vec![false, true, false])))
        );
    }

    #[test]
    fn writes_change_memory() {
        let plc = SimPlc::new();
        let single = plc.process(1, Request::WriteSingleRegister(5, 500));
        assert_eq!(single, Ok(Some(Response::WriteSingleRegister(5, 500))));
        let multiple = plc.process(
            1,
            Request::WriteMultipleRegisters(10, Cow::Owned(vec![1, 2])),
        );
        assert_eq!(multiple, Ok(Some(Response::WriteMultipleRegisters(10, 2))));
        let coils = plc.process(
            1,
            Request::WriteMultipleCoils(200, Cow::Owned(vec![true, true])),
        );
        assert_eq!(coils, Ok(Some(Response::WriteMultipleCoils(200, 2))));
        let coil = plc.process(1, Request::WriteSingleCoil(0, false));
        assert_eq!(coil, Ok(Some(Response::WriteSingleCoil(0, false))));

        assert_eq!(plc.holding(5), 500);
        assert_eq!(plc.holding(10), 1);
        assert_eq!(plc.holding(11), 2);
        assert!(plc.coil(200));
        assert!(plc.coil(201));
        assert!(!plc.coil(0));
    }

    #[test]
    fn mask_write_follows_specification_example() {
        let plc = SimPlc::new();
        plc.set_holding(4, 0x12);
        let response = plc.process(1, Request::MaskWriteRegister(4, 0xF2, 0x25));
        assert_eq!(
            response,
            Ok(Some(Response::MaskWriteRegister(4, 0xF2, 0x25)))
        );
        assert_eq!(plc.holding(4), 0x17);
    }

    #[test]
    fn read_write_writes_before_reading() {
        let plc = SimPlc::new();
        let response = plc.process(
            1,
            Request::ReadWriteMultipleRegisters(20, 3, 21, Cow::Owned(vec![9])),
        );
        assert_eq!(registers(response), vec![20, 9, 22]);
    }

    #[test]
    fn rejects_range_past_last_address() {
        let plc = SimPlc::new();
        let response = plc.process(1, Request::ReadHoldingRegisters(65535, 2));
        assert_eq!(response, Err(ExceptionCode::IllegalDataAddress));
    }

    #[test]
    fn rejects_quantity_above_limit() {
        let plc = SimPlc::new();
        let response = plc.process(1, Request::ReadHoldingRegisters(0, 126));
        assert_eq!(response, Err(ExceptionCode::IllegalDataValue));
        let response = plc.process(1, Request::ReadCoils(0, 0));
        assert_eq!(response, Err(ExceptionCode::IllegalDataValue));
    }

    #[test]
    fn unsupported_function_gets_illegal_function() {
        let plc = SimPlc::new();
        let response = plc.process(1, Request::ReportServerId);
        assert_eq!(response, Err(ExceptionCode::IllegalFunction));
        let response = plc.process(1, Request::Custom(0x41, Cow::Owned(vec![1])));
        assert_eq!(response, Err(ExceptionCode::IllegalFunction));
    }

    #[test]
    fn broadcast_write_applies_without_response() {
        let plc = SimPlc::new();
        let response = plc.process(0, Request::WriteSingleRegister(3, 33));
        assert_eq!(response, Ok(None));
        assert_eq!(plc.holding(3), 33);
    }

    #[test]
    fn force_listen_only_gets_no_response() {
        let plc = SimPlc::new();
        let request = Request::Custom(DIAGNOSTICS, Cow::Owned(vec![0x00, 0x04, 0x00, 0x00]));
        assert_eq!(plc.process(1, request), Ok(None));
        let echo = Request::Custom(DIAGNOSTICS, Cow::Owned(vec![0x00, 0x00, 0x12, 0x34]));
        assert_eq!(plc.process(1, echo), Err(ExceptionCode::IllegalFunction));
        assert_eq!(plc.request_count(), 2);
    }

    #[test]
    fn log_records_each_request() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("requests.jsonl");
        let plc = SimPlc::new().with_log(&path).unwrap();
        let _ = plc.process(1, Request::ReadHoldingRegisters(100, 10));
        let _ = plc.process(2, Request::WriteSingleCoil(7, true));
        let _ = plc.process(1, Request::ReportServerId);
        let _ = plc.process(
            1,
            Request::ReadWriteMultipleRegisters(0, 2, 50, Cow::Owned(vec![1, 2, 3])),
        );

        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            vec![
                r#"{"address":100,"function":3,"quantity":10,"unit":1}"#,
                r#"{"address":7,"function":5,"quantity":1,"unit":2}"#,
                r#"{"function":17,"unit":1}"#,
                r#"{"address":0,"function":23,"quantity":2,"unit":1,"write_address":50,"write_quantity":3}"#,
            ]
        );
    }

    #[test]
    fn clones_share_memory_and_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let plc = SimPlc::new();
        let clone = plc.clone();
        let logged = plc.with_log(&path).unwrap();
        let _ = clone.process(1, Request::WriteSingleRegister(1, 11));
        assert_eq!(logged.holding(1), 11);
        assert_eq!(logged.request_count(), 1);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            text,
            "{\"address\":1,\"function\":6,\"quantity\":1,\"unit\":1}\n"
        );
        let again = logged.with_log(&path).err().map(|error| error.kind());
        assert_eq!(again, Some(io::ErrorKind::AlreadyExists));
    }
}
