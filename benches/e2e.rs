//! End-to-end load: N closed-loop clients read holding registers from the
//! simulated PLC, first directly and then through a `sluice run` process with
//! full decoding, decisions and event recording. Prints throughput and
//! latency percentiles for both and their ratios.
//!
//! Run: `cargo bench --bench e2e` (environment: SLUICE_BENCH_CONNECTIONS,
//! default 16; SLUICE_BENCH_SECONDS per phase, default 5). To set another
//! forwarder such as HAProxy beside sluice, fix the PLC's port with
//! SLUICE_BENCH_PLC_PORT, point the forwarder at it and give its address in
//! SLUICE_BENCH_COMPARE; it is then measured as a third phase. With
//! SLUICE_BENCH_MIRROR=1 the device mirrors holding registers 0-999, so
//! sluice serves every read from memory.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Registers read per request.
const QUANTITY: u16 = 10;

struct Phase {
    requests: u64,
    elapsed: Duration,
    latencies: Vec<Duration>,
}

impl Phase {
    fn throughput(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }

    fn percentile(&self, fraction: f64) -> Duration {
        let index = ((self.latencies.len() as f64 - 1.0) * fraction).round() as usize;
        self.latencies[index]
    }
}

/// A child process killed when dropped, so a failed run leaves nothing behind.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn sluice() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sluice"))
}

/// Starts `command` and returns the address from the first stdout line that
/// starts with `prefix`.
fn start(mut command: Command, prefix: &str) -> (Process, SocketAddr) {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start sluice");
    let stdout = child.stdout.take().expect("stdout piped");
    let mut lines = BufReader::new(stdout).lines();
    let process = Process(child);
    for line in lines.by_ref() {
        let line = line.expect("read stdout");
        if let Some(rest) = line.strip_prefix(prefix) {
            let address = rest
                .split_whitespace()
                .last()
                .expect("address")
                .parse()
                .expect("socket address");
            std::thread::spawn(move || lines.for_each(drop));
            return (process, address);
        }
    }
    panic!("process ended before printing {prefix:?}");
}

fn write_config(folder: &std::path::Path, plc: SocketAddr, connections: usize) {
    std::fs::create_dir_all(folder.join("rules")).unwrap();
    let gateway = format!(
        "[gateway]\nname = \"bench\"\nrules = \"rules\"\nallow_root = true\n\n\
         [[listener]]\nname = \"bench\"\nprotocol = \"modbus\"\nbind = \"127.0.0.1:0\"\ndevice = \"plc\"\n\
         limits = {{ max_connections = {limit}, max_connections_per_source = {limit} }}\n\n\
         [[device]]\nname = \"plc\"\naddress = \"{plc}\"\nunit = 1\ntimeout_ms = 2000\nmax_connections = {connections}\n{mirror}\n\
         [audit]\npath = \"audit\"\n",
        limit = connections + 8,
        mirror = if std::env::var("SLUICE_BENCH_MIRROR").is_ok_and(|v| v == "1") {
            "mirror = [{ kind = \"holding_register\", start = 0, count = 1000, poll_ms = 100 }]\n"
        } else {
            ""
        },
    );
    std::fs::write(folder.join("gateway.toml"), gateway).unwrap();
    let rules = "[vendor]\nname = \"bench\"\nsources = [\"127.0.0.0/8\"]\n\n\
                 [[allow]]\ndevice = \"plc\"\nfunctions = [\"read_holding_registers\"]\naddresses = [\"0-999\"]\n";
    std::fs::write(folder.join("rules/bench.toml"), rules).unwrap();
}

async fn client(address: SocketAddr, until: Instant, client_index: u16) -> Vec<Duration> {
    let mut stream = TcpStream::connect(address).await.expect("connect");
    stream.set_nodelay(true).unwrap();
    let mut latencies = Vec::new();
    let mut response = [0u8; 9 + 2 * QUANTITY as usize];
    let start_address = client_index * QUANTITY;
    let mut transaction: u16 = 0;
    while Instant::now() < until {
        transaction = transaction.wrapping_add(1);
        let mut request = [0u8; 12];
        request[0..2].copy_from_slice(&transaction.to_be_bytes());
        request[4..6].copy_from_slice(&6u16.to_be_bytes());
        request[6] = 1;
        request[7] = 3;
        request[8..10].copy_from_slice(&start_address.to_be_bytes());
        request[10..12].copy_from_slice(&QUANTITY.to_be_bytes());
        let sent = Instant::now();
        stream.write_all(&request).await.expect("write");
        stream.read_exact(&mut response).await.expect("read");
        latencies.push(sent.elapsed());
        assert_eq!(
            &response[0..2],
            &transaction.to_be_bytes(),
            "transaction id echoed"
        );
        assert_eq!(response[7], 3, "function code 3 answered without exception");
    }
    latencies
}

fn measure(
    runtime: &tokio::runtime::Runtime,
    address: SocketAddr,
    connections: usize,
    seconds: u64,
) -> Phase {
    runtime.block_on(async {
        let started = Instant::now();
        let until = started + Duration::from_secs(seconds);
        let tasks: Vec<_> = (0..connections)
            .map(|index| tokio::spawn(client(address, until, index as u16)))
            .collect();
        let mut latencies = Vec::new();
        for task in tasks {
            latencies.extend(task.await.expect("client task"));
        }
        let elapsed = started.elapsed();
        latencies.sort_unstable();
        Phase {
            requests: latencies.len() as u64,
            elapsed,
            latencies,
        }
    })
}

fn report(name: &str, phase: &Phase) {
    println!(
        "{name:<8} {:>10.0} req/s  p50 {:>7.1} µs  p99 {:>7.1} µs  ({} requests)",
        phase.throughput(),
        phase.percentile(0.50).as_secs_f64() * 1e6,
        phase.percentile(0.99).as_secs_f64() * 1e6,
        phase.requests,
    );
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --all-targets` runs this
    // target without it, and a load measurement is no test, so it stops here.
    if !std::env::args().any(|argument| argument == "--bench") {
        return;
    }
    let connections: usize = std::env::var("SLUICE_BENCH_CONNECTIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(16);
    let seconds: u64 = std::env::var("SLUICE_BENCH_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);

    let folder = std::env::temp_dir().join(format!("sluice-bench-{}", std::process::id()));
    let mut plc_command = sluice();
    let plc_port = std::env::var("SLUICE_BENCH_PLC_PORT").unwrap_or_else(|_| "0".to_owned());
    plc_command.args(["plc-sim", "--bind", &format!("127.0.0.1:{plc_port}")]);
    let (_plc, plc_address) = start(plc_command, "listening ");
    write_config(&folder, plc_address, connections);
    let mut gateway_command = sluice();
    gateway_command
        .arg("run")
        .arg("--config")
        .arg(folder.join("gateway.toml"));
    let (_gateway, gateway_address) = start(gateway_command, "listening bench ");

    // The load generator uses one thread so that the gateway and the PLC
    // keep the remaining core; both phases run under the same conditions.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    println!("{connections} connections, {seconds} s per phase");
    let direct = measure(&runtime, plc_address, connections, seconds);
    report("direct", &direct);
    let gateway = measure(&runtime, gateway_address, connections, seconds);
    report("sluice", &gateway);
    println!(
        "ratio    throughput {:.2}×  p50 {:.2}×  p99 {:.2}×",
        gateway.throughput() / direct.throughput(),
        gateway.percentile(0.50).as_secs_f64() / direct.percentile(0.50).as_secs_f64(),
        gateway.percentile(0.99).as_secs_f64() / direct.percentile(0.99).as_secs_f64(),
    );
    if let Some(address) = std::env::var("SLUICE_BENCH_COMPARE")
        .ok()
        .and_then(|a| a.parse().ok())
    {
        let other = measure(&runtime, address, connections, seconds);
        report("compare", &other);
        println!(
            "ratio    compare throughput {:.2}× of direct",
            other.throughput() / direct.throughput()
        );
    }
    drop(_gateway);
    let _ = std::fs::remove_dir_all(&folder);
}
