//! End-to-end load: N closed-loop clients read holding registers from the
//! simulated PLC, first directly and then through a `sluice run` process with
//! full decoding, decisions and event recording. Prints throughput and
//! latency percentiles for both and their ratios.
//!
//! Run: `cargo bench --bench e2e` (environment: SLUICE_BENCH_CONNECTIONS,
//! default 16; SLUICE_BENCH_SECONDS per phase, default 5). With
//! SLUICE_BENCH_TLS=1 the gateway also has a MODBUS/TCP Security listener,
//! and two more phases measure the same reads over mutual TLS and full
//! handshakes per second, each followed by one read. To set another
//! forwarder such as HAProxy beside sluice, fix the PLC's port with
//! SLUICE_BENCH_PLC_PORT, point the forwarder at it and give its address in
//! SLUICE_BENCH_COMPARE; it is then measured as a third phase. With
//! SLUICE_BENCH_MIRROR=1 the device mirrors holding registers 0-999, so
//! sluice serves every read from memory. SLUICE_BENCH_BASELINE names another
//! sluice binary, such as a build of the main branch, that runs as a second
//! gateway beside this one and is measured as a phase of its own. With
//! SLUICE_BENCH_GATEWAY_WORKERS=N every gateway runs N runtime worker
//! threads instead of one per core. With
//! SLUICE_BENCH_ROUNDS=N (default 1) the plain phases repeat N times in
//! turn, and the run ends with the median of each path's throughput ratio to
//! the direct phase of the same round. Every gateway phase also reports the
//! gateway's CPU time and context switches per request, summed over its
//! threads from /proc. The device has one upstream connection per client
//! and one request in flight on each, unless
//! SLUICE_BENCH_UPSTREAM_CONNECTIONS and SLUICE_BENCH_MAX_IN_FLIGHT set
//! `max_connections` and `max_in_flight`. SLUICE_BENCH_TAIL=1 adds a line of
//! percentiles from p75 to p99.9 to each phase.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls::client::Resumption;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;

/// Registers read per request.
const QUANTITY: u16 = 10;

struct Phase {
    requests: u64,
    elapsed: Duration,
    latencies: Vec<Duration>,
}

impl Phase {
    fn new(mut latencies: Vec<Duration>, elapsed: Duration) -> Phase {
        latencies.sort_unstable();
        Phase {
            requests: latencies.len() as u64,
            elapsed,
            latencies,
        }
    }

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
fn start(command: Command, prefix: &str) -> (Process, SocketAddr) {
    let (process, address, lines) = start_lines(command, prefix);
    std::thread::spawn(move || lines.for_each(drop));
    (process, address)
}

type Lines = std::io::Lines<BufReader<std::process::ChildStdout>>;

/// Starts `command`, reads stdout up to the first line that starts with
/// `prefix` and returns the address on it and the remaining lines.
fn start_lines(mut command: Command, prefix: &str) -> (Process, SocketAddr, Lines) {
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
            return (process, address, lines);
        }
    }
    panic!("process ended before printing {prefix:?}");
}

fn env_usize(name: &str) -> Option<usize> {
    std::env::var(name).ok().map(|value| {
        value
            .parse()
            .unwrap_or_else(|_| panic!("{name} must be a whole number, not {value:?}"))
    })
}

fn write_config(folder: &std::path::Path, plc: SocketAddr, connections: usize, tls: bool) {
    std::fs::create_dir_all(folder.join("rules")).unwrap();
    let mut gateway = format!(
        "[gateway]\nname = \"bench\"\nrules = \"rules\"\nallow_root = true\n\n\
         [[listener]]\nname = \"bench\"\nprotocol = \"modbus\"\nbind = \"127.0.0.1:0\"\ndevice = \"plc\"\n\
         limits = {{ max_connections = {limit}, max_connections_per_source = {limit} }}\n\n\
         [[device]]\nname = \"plc\"\naddress = \"{plc}\"\nunit = 1\ntimeout_ms = 2000\nmax_connections = {upstream}\nmax_in_flight = {in_flight}\n{mirror}\n\
         [audit]\npath = \"audit\"\n",
        limit = connections + 8,
        upstream = env_usize("SLUICE_BENCH_UPSTREAM_CONNECTIONS").unwrap_or(connections),
        in_flight = env_usize("SLUICE_BENCH_MAX_IN_FLIGHT").unwrap_or(1),
        mirror = if std::env::var("SLUICE_BENCH_MIRROR").is_ok_and(|v| v == "1") {
            "mirror = [{ kind = \"holding_register\", start = 0, count = 1000, poll_ms = 100 }]\n"
        } else {
            ""
        },
    );
    if tls {
        gateway += &format!(
            "\n[[listener]]\nname = \"bench-tls\"\nprotocol = \"modbus-tls\"\nbind = \"127.0.0.1:0\"\ndevice = \"plc\"\n\
             limits = {{ max_connections = {limit}, max_connections_per_source = {limit} }}\n\
             tls = {{ cert = \"gateway.crt\", key = \"gateway.key\", client_ca = \"ca.crt\", max_handshakes_per_source = {limit} }}\n",
            limit = connections + 8,
        );
        let rules = "[vendor]\nname = \"bench-tls\"\ncertificate_cn = [\"bench-*\"]\n\n\
                     [[allow]]\ndevice = \"plc\"\nfunctions = [\"read_holding_registers\"]\naddresses = [\"0-999\"]\n";
        std::fs::write(folder.join("rules/bench-tls.toml"), rules).unwrap();
    }
    std::fs::write(folder.join("gateway.toml"), gateway).unwrap();
    let rules = "[vendor]\nname = \"bench\"\nsources = [\"127.0.0.0/8\"]\n\n\
                 [[allow]]\ndevice = \"plc\"\nfunctions = [\"read_holding_registers\"]\naddresses = [\"0-999\"]\n";
    std::fs::write(folder.join("rules/bench.toml"), rules).unwrap();
}

/// The certificates of the TLS phases: a CA, the gateway's certificate and
/// the client certificate that the vendor `bench-tls` matches.
struct BenchPki {
    client: Arc<ClientConfig>,
}

impl BenchPki {
    fn write(folder: &std::path::Path) -> BenchPki {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "bench CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_key = KeyPair::generate().unwrap();
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::from_params(&ca_params, &ca_key);
        let leaf = |cn: &str, names: Vec<String>| {
            let mut params = CertificateParams::new(names).unwrap();
            params.distinguished_name.push(DnType::CommonName, cn);
            let key = KeyPair::generate().unwrap();
            (params.signed_by(&key, &issuer).unwrap(), key)
        };
        let (server, server_key) = leaf("gateway", vec!["localhost".to_owned()]);
        let (client, client_key) = leaf("bench-client", Vec::new());
        std::fs::create_dir_all(folder).unwrap();
        std::fs::write(folder.join("ca.crt"), ca.pem()).unwrap();
        std::fs::write(folder.join("gateway.crt"), server.pem()).unwrap();
        std::fs::write(folder.join("gateway.key"), server_key.serialize_pem()).unwrap();

        let mut roots = RootCertStore::empty();
        roots.add(ca.der().clone()).unwrap();
        let mut config = ClientConfig::builder()
            .with_root_certificates(roots)
            .with_client_auth_cert(
                vec![CertificateDer::from(client.der().to_vec())],
                PrivateKeyDer::try_from(client_key.serialize_der()).unwrap(),
            )
            .unwrap();
        // Every connection makes a full handshake.
        config.resumption = Resumption::disabled();
        BenchPki {
            client: Arc::new(config),
        }
    }

    async fn connect(&self, address: SocketAddr) -> impl AsyncRead + AsyncWrite + Unpin {
        let stream = TcpStream::connect(address).await.expect("connect");
        stream.set_nodelay(true).unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        TlsConnector::from(self.client.clone())
            .connect(name, stream)
            .await
            .expect("TLS handshake")
    }
}

/// Where a load client connects: a plain address, or a TLS listener.
#[derive(Clone)]
enum Target {
    Plain(SocketAddr),
    Tls(SocketAddr, Arc<BenchPki>),
}

async fn client(target: Target, until: Instant, client_index: u16) -> Vec<Duration> {
    match target {
        Target::Plain(address) => {
            let stream = TcpStream::connect(address).await.expect("connect");
            stream.set_nodelay(true).unwrap();
            read_loop(stream, until, client_index).await
        }
        Target::Tls(address, pki) => {
            read_loop(pki.connect(address).await, until, client_index).await
        }
    }
}

/// Reads registers over `stream` until `until`; returns each latency.
async fn read_loop<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    until: Instant,
    client_index: u16,
) -> Vec<Duration> {
    let mut latencies = Vec::new();
    let mut transaction: u16 = 0;
    while Instant::now() < until {
        transaction = transaction.wrapping_add(1);
        let sent = Instant::now();
        read_once(&mut stream, transaction, client_index).await;
        latencies.push(sent.elapsed());
    }
    latencies
}

/// Reads `QUANTITY` holding registers once and checks the response.
async fn read_once<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    transaction: u16,
    client_index: u16,
) {
    let start_address = client_index * QUANTITY;
    let mut request = [0u8; 12];
    request[0..2].copy_from_slice(&transaction.to_be_bytes());
    request[4..6].copy_from_slice(&6u16.to_be_bytes());
    request[6] = 1;
    request[7] = 3;
    request[8..10].copy_from_slice(&start_address.to_be_bytes());
    request[10..12].copy_from_slice(&QUANTITY.to_be_bytes());
    let mut response = [0u8; 9 + 2 * QUANTITY as usize];
    stream.write_all(&request).await.expect("write");
    stream.read_exact(&mut response).await.expect("read");
    assert_eq!(
        &response[0..2],
        &transaction.to_be_bytes(),
        "transaction id echoed"
    );
    assert_eq!(response[7], 3, "function code 3 answered without exception");
}

fn measure(
    runtime: &tokio::runtime::Runtime,
    target: Target,
    connections: usize,
    seconds: u64,
) -> Phase {
    runtime.block_on(async {
        let started = Instant::now();
        let until = started + Duration::from_secs(seconds);
        let tasks: Vec<_> = (0..connections)
            .map(|index| tokio::spawn(client(target.clone(), until, index as u16)))
            .collect();
        let mut latencies = Vec::new();
        for task in tasks {
            latencies.extend(task.await.expect("client task"));
        }
        Phase::new(latencies, started.elapsed())
    })
}

/// Runs `connections` loops that each connect, make a full mutual-TLS
/// handshake, read once and close, until the time is up. Each latency
/// covers one whole connection.
fn measure_handshakes(
    runtime: &tokio::runtime::Runtime,
    address: SocketAddr,
    pki: &BenchPki,
    connections: usize,
    seconds: u64,
) -> Phase {
    runtime.block_on(async {
        let started = Instant::now();
        let until = started + Duration::from_secs(seconds);
        let loops = (0..connections).map(|index| async move {
            let mut latencies = Vec::new();
            while Instant::now() < until {
                let opened = Instant::now();
                let mut stream = pki.connect(address).await;
                // One read proves the gateway accepted the certificate.
                read_once(&mut stream, 1, index as u16).await;
                latencies.push(opened.elapsed());
            }
            latencies
        });
        let mut latencies = Vec::new();
        for found in futures_util::future::join_all(loops).await {
            latencies.extend(found);
        }
        Phase::new(latencies, started.elapsed())
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
    if std::env::var("SLUICE_BENCH_TAIL").is_ok() {
        let tail: Vec<String> = [0.75, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999]
            .iter()
            .map(|&fraction| {
                let micros = phase.percentile(fraction).as_secs_f64() * 1e6;
                format!("p{}:{micros:.0}", fraction * 100.0)
            })
            .collect();
        println!("         tail µs {}", tail.join(" "));
    }
}

/// CPU time and context switches of a process, summed over its threads.
#[derive(Debug, Clone, Copy, Default)]
struct Usage {
    cpu_ns: u64,
    switches: u64,
}

impl Usage {
    /// Reads the usage of process `pid` from /proc. Threads that exited
    /// during a phase, such as idle blocking-pool threads, are left out.
    fn of(pid: u32) -> Usage {
        let mut usage = Usage::default();
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return usage;
        };
        for task in tasks.flatten() {
            let path = task.path();
            // The first field of schedstat is the time spent running, in ns.
            if let Ok(schedstat) = std::fs::read_to_string(path.join("schedstat")) {
                let running = schedstat.split_whitespace().next();
                usage.cpu_ns += running.and_then(|v| v.parse().ok()).unwrap_or(0);
            }
            if let Ok(status) = std::fs::read_to_string(path.join("status")) {
                for line in status.lines() {
                    if let Some(count) = line
                        .strip_prefix("voluntary_ctxt_switches:")
                        .or_else(|| line.strip_prefix("nonvoluntary_ctxt_switches:"))
                    {
                        usage.switches += count.trim().parse::<u64>().unwrap_or(0);
                    }
                }
            }
        }
        usage
    }
}

/// Measures a phase against a gateway and prints it with the gateway's CPU
/// time and context switches per request.
fn measure_gateway(
    runtime: &tokio::runtime::Runtime,
    name: &str,
    gateway: &Gateway,
    connections: usize,
    seconds: u64,
) -> Phase {
    let before = Usage::of(gateway.process.0.id());
    let phase = measure(runtime, Target::Plain(gateway.plain), connections, seconds);
    let after = Usage::of(gateway.process.0.id());
    report(name, &phase);
    let requests = phase.requests.max(1) as f64;
    println!(
        "{:<8} gateway CPU {:.1} µs/request, {:.2} context switches/request",
        "",
        after.cpu_ns.saturating_sub(before.cpu_ns) as f64 / 1e3 / requests,
        after.switches.saturating_sub(before.switches) as f64 / requests,
    );
    phase
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let middle = values.len() / 2;
    if values.len() % 2 == 1 {
        values[middle]
    } else {
        (values[middle - 1] + values[middle]) / 2.0
    }
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

    let rounds: usize = std::env::var("SLUICE_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
        .max(1);

    let folder = std::env::temp_dir().join(format!("sluice-bench-{}", std::process::id()));
    let mut plc_command = sluice();
    let plc_port = std::env::var("SLUICE_BENCH_PLC_PORT").unwrap_or_else(|_| "0".to_owned());
    plc_command.args(["plc-sim", "--bind", &format!("127.0.0.1:{plc_port}")]);
    let (_plc, plc_address) = start(plc_command, "listening ");
    let tls = std::env::var("SLUICE_BENCH_TLS").is_ok_and(|value| value == "1");
    let pki = tls.then(|| Arc::new(BenchPki::write(&folder)));
    write_config(&folder, plc_address, connections, tls);
    let gateway = start_gateway(sluice(), &folder, tls);
    let baseline = std::env::var_os("SLUICE_BENCH_BASELINE").map(|binary| {
        let baseline_folder = folder.join("baseline");
        write_config(&baseline_folder, plc_address, connections, false);
        start_gateway(Command::new(binary), &baseline_folder, false)
    });
    let compare: Option<SocketAddr> = std::env::var("SLUICE_BENCH_COMPARE")
        .ok()
        .and_then(|a| a.parse().ok());

    // The load generator uses one thread so that the gateway and the PLC
    // keep the remaining core; both phases run under the same conditions.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    println!("{connections} connections, {seconds} s per phase, {rounds} rounds");
    let mut sluice_ratios = Vec::new();
    let mut baseline_ratios = Vec::new();
    let mut compare_ratios = Vec::new();
    let mut last_sluice = None;
    for round in 1..=rounds {
        if rounds > 1 {
            println!("round {round}");
        }
        let direct = measure(&runtime, Target::Plain(plc_address), connections, seconds);
        report("direct", &direct);
        let through = measure_gateway(&runtime, "sluice", &gateway, connections, seconds);
        println!(
            "ratio    throughput {:.2}×  p50 {:.2}×  p99 {:.2}×",
            through.throughput() / direct.throughput(),
            through.percentile(0.50).as_secs_f64() / direct.percentile(0.50).as_secs_f64(),
            through.percentile(0.99).as_secs_f64() / direct.percentile(0.99).as_secs_f64(),
        );
        sluice_ratios.push(through.throughput() / direct.throughput());
        if let Some(baseline) = &baseline {
            let other = measure_gateway(&runtime, "baseline", baseline, connections, seconds);
            let ratio = other.throughput() / direct.throughput();
            println!("ratio    baseline throughput {ratio:.2}× of direct");
            baseline_ratios.push(ratio);
        }
        if let Some(address) = compare {
            let other = measure(&runtime, Target::Plain(address), connections, seconds);
            report("compare", &other);
            let ratio = other.throughput() / direct.throughput();
            println!("ratio    compare throughput {ratio:.2}× of direct");
            compare_ratios.push(ratio);
        }
        last_sluice = Some(through);
    }
    if rounds > 1 {
        println!(
            "median ratio to direct: sluice {:.2}×",
            median(sluice_ratios)
        );
        if !baseline_ratios.is_empty() {
            println!(
                "median ratio to direct: baseline {:.2}×",
                median(baseline_ratios)
            );
        }
        if !compare_ratios.is_empty() {
            println!(
                "median ratio to direct: compare {:.2}×",
                median(compare_ratios)
            );
        }
    }
    if let (Some(pki), Some(address), Some(plain)) = (&pki, gateway.tls, &last_sluice) {
        let secure = measure(
            &runtime,
            Target::Tls(address, pki.clone()),
            connections,
            seconds,
        );
        report("tls", &secure);
        println!(
            "ratio    tls throughput {:.2}× of sluice over plain TCP",
            secure.throughput() / plain.throughput()
        );
        let handshakes = measure_handshakes(&runtime, address, pki, connections, seconds);
        println!(
            "handshakes {:>8.0} /s  p50 {:>7.1} µs  p99 {:>7.1} µs  ({} full mutual-TLS handshakes, each with one read)",
            handshakes.throughput(),
            handshakes.percentile(0.50).as_secs_f64() * 1e6,
            handshakes.percentile(0.99).as_secs_f64() * 1e6,
            handshakes.requests,
        );
    }
    drop(gateway);
    drop(baseline);
    let _ = std::fs::remove_dir_all(&folder);
}

/// A running gateway and its listeners' addresses.
struct Gateway {
    process: Process,
    plain: SocketAddr,
    tls: Option<SocketAddr>,
}

/// Starts `sluice run` from `command` with the configuration in `folder`.
/// With `tls`, also waits for the TLS listener's address.
fn start_gateway(mut command: Command, folder: &std::path::Path, tls: bool) -> Gateway {
    command
        .arg("run")
        .arg("--config")
        .arg(folder.join("gateway.toml"));
    // tokio's multi-threaded runtime reads its worker count from this
    // variable; the simulated PLC keeps the default.
    if let Ok(workers) = std::env::var("SLUICE_BENCH_GATEWAY_WORKERS") {
        command.env("TOKIO_WORKER_THREADS", workers);
    }
    let (process, plain, mut lines) = start_lines(command, "listening bench ");
    let secure = tls.then(|| {
        let line = lines
            .find_map(|line| {
                let line = line.expect("read stdout");
                line.strip_prefix("listening bench-tls ").map(str::to_owned)
            })
            .expect("TLS listener address");
        line.parse().expect("socket address")
    });
    std::thread::spawn(move || lines.for_each(drop));
    Gateway {
        process,
        plain,
        tls: secure,
    }
}
