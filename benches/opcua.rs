//! OPC UA read load: closed-loop async-opcua clients read one Double
//! variable of an in-process async-opcua server, first directly and then
//! through a `sluice run` process that terminates each session, decides
//! every read and records it. Prints reads per second and latency
//! percentiles for both and their ratio. Both sides use security None and
//! anonymous sessions (the vendor `bench` sets `opcua_anonymous`). A third
//! phase reads through sluice with Basic256Sha256 SignAndEncrypt between
//! the clients and sluice.
//!
//! Run: `cargo bench --bench opcua` (environment: SLUICE_BENCH_CONNECTIONS,
//! default 4 sessions; SLUICE_BENCH_SECONDS per phase, default 5). Needs
//! the `openssl` command line tool for sluice's RSA certificate.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use opcua::client::{ClientBuilder, IdentityToken, Session};
use opcua::crypto::SecurityPolicy;
use opcua::nodes::VariableBuilder;
use opcua::server::diagnostics::NamespaceMetadata;
use opcua::server::node_manager::memory::{simple_node_manager, SimpleNodeManager};
use opcua::server::{ServerBuilder, ServerEndpoint, ANONYMOUS_USER_TOKEN_ID};
use opcua::types::{
    AttributeId, DataTypeId, MessageSecurityMode, NodeId, ObjectId, QualifiedName, ReadValueId,
    StatusCode, TimestampsToReturn, Variant,
};

/// Namespace of the variables the upstream server serves.
const PLANT_URI: &str = "urn:bench:plant";
/// String id of the variable every client reads.
const VARIABLE: &str = "Bench.Value";
/// Value of that variable, checked on every read.
const VALUE: f64 = 21.5;
/// Maximum time to connect a session.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);

struct Phase {
    elapsed: Duration,
    latencies: Vec<Duration>,
}

impl Phase {
    fn throughput(&self) -> f64 {
        self.latencies.len() as f64 / self.elapsed.as_secs_f64()
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

/// Starts the upstream server on a free loopback port with one Double
/// variable in `PLANT_URI`; returns its address.
async fn start_plant(pki: &Path) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let endpoint = ServerEndpoint::new_none("/", &[ANONYMOUS_USER_TOKEN_ID.to_owned()]);
    let (server, handle) = ServerBuilder::new()
        .application_name("bench-plant")
        .application_uri("urn:bench:plant-server")
        .pki_dir(pki)
        .create_sample_keypair(true)
        .host("127.0.0.1")
        .port(address.port())
        .discovery_urls(vec!["/".to_owned()])
        .add_endpoint("none", endpoint)
        .with_node_manager(simple_node_manager(
            NamespaceMetadata {
                namespace_uri: PLANT_URI.to_owned(),
                ..Default::default()
            },
            "bench",
        ))
        .diagnostics_enabled(false)
        .build()
        .unwrap();
    let manager = handle
        .node_managers()
        .get_of_type::<SimpleNodeManager>()
        .unwrap();
    let namespace = handle.get_namespace_index(PLANT_URI).unwrap();
    {
        let mut space = manager.address_space().write();
        VariableBuilder::new(
            &NodeId::new(namespace, VARIABLE),
            QualifiedName::new(namespace, VARIABLE),
            VARIABLE,
        )
        .data_type(DataTypeId::Double)
        .value(VALUE)
        .organized_by(ObjectId::ObjectsFolder)
        .insert(&mut *space);
    }
    tokio::spawn(async move { server.run_with(listener).await });
    address
}

/// Runs openssl with `arguments` in `folder`.
fn openssl(folder: &Path, arguments: &[&str]) {
    let status = Command::new("openssl")
        .args(arguments)
        .current_dir(folder)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("run openssl");
    assert!(status.success(), "openssl {arguments:?} failed");
}

/// Writes, with openssl, an RSA certificate and key for sluice's listener,
/// a client CA, and a client application certificate (DER) it signed.
fn write_certificates(folder: &Path) {
    let rsa = ["-newkey", "rsa:2048", "-nodes", "-days", "2"];
    let mut sluice = vec![
        "req",
        "-x509",
        "-sha256",
        "-keyout",
        "sluice.key",
        "-out",
        "sluice.crt",
    ];
    sluice.extend(rsa);
    sluice.extend([
        "-subj",
        "/CN=sluice-bench",
        "-addext",
        "subjectAltName=URI:urn:sluice:bench,IP:127.0.0.1",
    ]);
    openssl(folder, &sluice);

    let mut ca = vec![
        "req", "-x509", "-sha256", "-keyout", "ca.key", "-out", "ca.crt",
    ];
    ca.extend(rsa);
    ca.extend([
        "-subj",
        "/CN=bench-ca",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
    ]);
    ca.extend(["-addext", "keyUsage=critical,keyCertSign,cRLSign"]);
    openssl(folder, &ca);

    let request = [
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "client.key",
        "-out",
        "client.csr",
    ];
    openssl(
        folder,
        &[&request[..], &["-subj", "/CN=bench-client"]].concat(),
    );

    let extensions = "subjectAltName=URI:urn:bench:client,DNS:localhost\n\
        keyUsage=critical,digitalSignature,nonRepudiation,keyEncipherment,dataEncipherment\n\
        extendedKeyUsage=clientAuth,serverAuth\nbasicConstraints=critical,CA:FALSE\n";
    std::fs::write(folder.join("client.ext"), extensions).unwrap();
    openssl(
        folder,
        &[
            "x509",
            "-req",
            "-in",
            "client.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-sha256",
            "-days",
            "2",
            "-extfile",
            "client.ext",
            "-outform",
            "DER",
            "-out",
            "client.der",
        ],
    );
}

fn write_config(folder: &Path, plant: SocketAddr, connections: usize) {
    std::fs::create_dir_all(folder.join("rules")).unwrap();
    let gateway = format!(
        "[gateway]\nname = \"bench\"\nrules = \"rules\"\nallow_root = true\n\n\
         [[listener]]\nname = \"ua\"\nprotocol = \"opcua\"\nbind = \"127.0.0.1:0\"\ndevice = \"plant\"\n\
         limits = {{ max_connections = {limit}, max_connections_per_source = {limit} }}\n\
         opcua = {{ application_uri = \"urn:sluice:bench\", certificate = \"sluice.crt\", private_key = \"sluice.key\", \
         security_policies = [\"Basic256Sha256\"], client_ca = \"ca.crt\", allow_none = true, \
         open_rate = 1000, open_burst = 1000 }}\n\n\
         [[device]]\nname = \"plant\"\nprotocol = \"opcua\"\nendpoint = \"opc.tcp://{plant}/\"\n\
         security_policy = \"None\"\nsecurity_mode = \"None\"\ntimeout_ms = 2000\n\n\
         [audit]\npath = \"audit\"\n",
        limit = connections + 8,
    );
    std::fs::write(folder.join("gateway.toml"), gateway).unwrap();
    let rules = format!(
        "[vendor]\nname = \"bench\"\nopcua_anonymous = true\n\n\
         [[allow]]\ndevice = \"plant\"\nservices = [\"read\"]\nnodes = [\"nsu={PLANT_URI};s=Bench.*\"]\n"
    );
    std::fs::write(folder.join("rules/bench.toml"), rules).unwrap();
}

/// Starts `sluice run` and returns it with the address of its listener.
fn start_sluice(config: &Path) -> (Process, SocketAddr) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("run")
        .arg("--config")
        .arg(config)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start sluice");
    let stdout = child.stdout.take().expect("stdout piped");
    let process = Process(child);
    let mut lines = BufReader::new(stdout).lines();
    for line in lines.by_ref() {
        let line = line.expect("read stdout");
        if let Some(address) = line.strip_prefix("listening ua ") {
            std::thread::spawn(move || lines.for_each(drop));
            return (process, address.parse().expect("socket address"));
        }
    }
    panic!("sluice ended before listening");
}

/// The security of the client's sessions.
#[derive(Clone, Copy)]
enum Security {
    None,
    /// Basic256Sha256 SignAndEncrypt with the certificate from
    /// `write_certificates`.
    Basic256Sha256,
}

/// Connects one anonymous session to `address`.
async fn connect(address: SocketAddr, folder: &Path, security: Security) -> Arc<Session> {
    let builder = ClientBuilder::new()
        .application_name("bench-client")
        .application_uri("urn:bench:client")
        .trust_server_certs(true)
        .session_retry_limit(0);
    let (builder, policy, mode) = match security {
        Security::None => (
            builder
                .pki_dir(folder.join("client-pki"))
                .create_sample_keypair(true),
            SecurityPolicy::None,
            MessageSecurityMode::None,
        ),
        Security::Basic256Sha256 => (
            builder
                .pki_dir(folder.join("client-pki-signed"))
                .certificate_path(folder.join("client.der"))
                .private_key_path(folder.join("client.key")),
            SecurityPolicy::Basic256Sha256,
            MessageSecurityMode::SignAndEncrypt,
        ),
    };
    let mut client = builder.client().unwrap();

    let url = format!("opc.tcp://{address}/");
    let endpoint = (url.as_str(), policy.to_uri(), mode);
    let (session, event_loop) = tokio::time::timeout(
        CONNECT_TIMEOUT,
        client.connect_to_matching_endpoint(endpoint, IdentityToken::Anonymous),
    )
    .await
    .expect("endpoints in time")
    .expect("matching endpoint");
    event_loop.spawn();
    let connected = tokio::time::timeout(CONNECT_TIMEOUT, session.wait_for_connection()).await;
    assert_eq!(connected, Ok(true), "session to {address} connected");
    session
}

/// Returns the node to read, with the namespace index `session` uses.
async fn variable(session: &Session) -> ReadValueId {
    let namespaces = session.read_namespace_array().await.unwrap();
    let index = namespaces.get_index(PLANT_URI).expect("plant namespace");
    ReadValueId {
        node_id: NodeId::new(index, VARIABLE),
        attribute_id: AttributeId::Value as u32,
        ..Default::default()
    }
}

/// Reads until `until`, one read in flight, and returns each latency.
async fn read_loop(session: Arc<Session>, until: Instant) -> Vec<Duration> {
    let node = [variable(&session).await];
    let mut latencies = Vec::new();
    while Instant::now() < until {
        let sent = Instant::now();
        let values = session
            .read(&node, TimestampsToReturn::Neither, 0.0)
            .await
            .unwrap();
        latencies.push(sent.elapsed());
        assert_eq!(values[0].status, Some(StatusCode::Good));
        assert_eq!(values[0].value, Some(Variant::Double(VALUE)));
    }
    latencies
}

async fn measure(
    address: SocketAddr,
    folder: &Path,
    security: Security,
    connections: usize,
    seconds: u64,
) -> Phase {
    let mut sessions = Vec::new();
    for _ in 0..connections {
        sessions.push(connect(address, folder, security).await);
    }
    let started = Instant::now();
    let until = started + Duration::from_secs(seconds);
    let loops: Vec<_> = sessions
        .iter()
        .map(|session| tokio::spawn(read_loop(session.clone(), until)))
        .collect();
    let mut latencies = Vec::new();
    for task in loops {
        latencies.extend(task.await.expect("read loop"));
    }
    let elapsed = started.elapsed();
    for session in sessions {
        let _ = session.disconnect().await;
    }
    latencies.sort_unstable();
    Phase { elapsed, latencies }
}

fn report(name: &str, phase: &Phase) {
    println!(
        "{name:<11} {:>9.0} reads/s  p50 {:>7.1} µs  p99 {:>7.1} µs  ({} reads)",
        phase.throughput(),
        phase.percentile(0.50).as_secs_f64() * 1e6,
        phase.percentile(0.99).as_secs_f64() * 1e6,
        phase.latencies.len(),
    );
}

fn environment(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --all-targets` runs this
    // target without it, and a load measurement is no test, so it stops here.
    if !std::env::args().any(|argument| argument == "--bench") {
        return;
    }
    let connections = environment("SLUICE_BENCH_CONNECTIONS", 4) as usize;
    let seconds = environment("SLUICE_BENCH_SECONDS", 5);
    let folder = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();

    let plant = runtime.block_on(start_plant(&folder.path().join("plant-pki")));
    write_certificates(folder.path());
    write_config(folder.path(), plant, connections);
    let (_sluice, gateway) = start_sluice(&folder.path().join("gateway.toml"));
    let phase = |address, security| {
        runtime.block_on(measure(
            address,
            folder.path(),
            security,
            connections,
            seconds,
        ))
    };

    println!("{connections} sessions, {seconds} s per phase, one Double read per request");
    let direct = phase(plant, Security::None);
    report("direct", &direct);
    let through = phase(gateway, Security::None);
    report("sluice", &through);
    let signed = phase(gateway, Security::Basic256Sha256);
    report("sluice-b256", &signed);
    println!(
        "ratio    {:.2}× of direct reads/s, p50 {:.1}× of direct",
        through.throughput() / direct.throughput(),
        through.percentile(0.50).as_secs_f64() / direct.percentile(0.50).as_secs_f64(),
    );
    println!(
        "ratio    {:.2}× of direct reads/s with Basic256Sha256 to sluice",
        signed.throughput() / direct.throughput(),
    );
}
