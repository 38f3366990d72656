//! `sluice ctl` against a running `sluice run`: the built binaries, a
//! simulated PLC and a Modbus client, all on loopback with ports chosen by
//! the system. Checks every command, its exit status and the admin events.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const SLUICE: &str = env!("CARGO_BIN_EXE_sluice");
/// Upper bound of every wait for the gateway to reach a state.
const WAIT: Duration = Duration::from_secs(15);

/// A child process stopped by its id when dropped.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Reads stdout lines until one starts with `prefix`; returns the others read.
fn read_until(
    lines: &mut impl Iterator<Item = std::io::Result<String>>,
    prefix: &str,
) -> Vec<String> {
    let mut seen = Vec::new();
    for line in lines {
        let line = line.expect("read stdout");
        let done = line.starts_with(prefix);
        seen.push(line);
        if done {
            return seen;
        }
    }
    panic!("process ended before printing {prefix:?}; printed {seen:?}");
}

fn start_plc() -> (Process, SocketAddr) {
    let mut child = Command::new(SLUICE)
        .args(["plc-sim", "--bind", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start plc-sim");
    let stdout = child.stdout.take().unwrap();
    let process = Process(child);
    let mut lines = BufReader::new(stdout).lines();
    let seen = read_until(&mut lines, "listening ");
    let address = seen.last().unwrap()["listening ".len()..].parse().unwrap();
    std::thread::spawn(move || lines.for_each(drop));
    (process, address)
}

/// A gateway folder: gateway.toml, rules/acme.toml, audit/ and the socket.
struct Setup {
    folder: tempfile::TempDir,
    _plc: Process,
}

impl Setup {
    fn new() -> Setup {
        let (plc, plc_address) = start_plc();
        let folder = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(folder.path().join("rules")).unwrap();
        let gateway = format!(
            "[gateway]\nname = \"ctl-test\"\ntimezone = \"UTC\"\nrules = \"rules\"\nallow_root = true\n\n\
             [[listener]]\nname = \"scada\"\nprotocol = \"modbus\"\nbind = \"127.0.0.1:0\"\ndevice = \"press-1\"\n\n\
             [[device]]\nname = \"press-1\"\naddress = \"{plc_address}\"\nunit = 1\n\n\
             [[state]]\nname = \"press-1-mode\"\ndevice = \"press-1\"\nholding_register = 900\npoll_ms = 100\nvalues = {{ 900 = \"production\", 1 = \"maintenance\" }}\n\n\
             [audit]\npath = \"audit\"\n\n\
             [admin]\nsocket = \"control.sock\"\n"
        );
        std::fs::write(folder.path().join("gateway.toml"), gateway).unwrap();
        std::fs::write(folder.path().join("rules/acme.toml"), ACME).unwrap();
        Setup { folder, _plc: plc }
    }

    fn config(&self) -> PathBuf {
        self.folder.path().join("gateway.toml")
    }

    fn path(&self, name: &str) -> PathBuf {
        self.folder.path().join(name)
    }

    fn start(&self) -> Gateway {
        let mut child = Command::new(SLUICE)
            .arg("run")
            .arg("--config")
            .arg(self.config())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start sluice run");
        let stdout: ChildStdout = child.stdout.take().unwrap();
        let process = Process(child);
        let mut lines = BufReader::new(stdout).lines();
        let seen = read_until(&mut lines, "ready");
        let listener = seen
            .iter()
            .find_map(|line| line.strip_prefix("listening scada "))
            .expect("listener address")
            .parse()
            .unwrap();
        std::thread::spawn(move || lines.for_each(drop));
        Gateway {
            process,
            listener,
            config: self.config(),
        }
    }

    /// Returns every event of the audit log, in order.
    fn events(&self) -> Vec<Value> {
        let mut segments: Vec<PathBuf> = std::fs::read_dir(self.path("audit"))
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .filter(|path| {
                let name = path.file_name().unwrap().to_string_lossy().into_owned();
                name.starts_with("audit-") && name.ends_with(".jsonl")
            })
            .collect();
        segments.sort();
        let mut events = Vec::new();
        for segment in segments {
            let text = std::fs::read_to_string(segment).unwrap();
            for line in text.lines() {
                // A line being written may be incomplete; it is read next time.
                if let Ok(event) = serde_json::from_str::<Value>(line) {
                    events.push(event);
                }
            }
        }
        events
    }

    /// Waits for the admin events with `action` and returns them.
    fn admin_events(&self, action: &str, count: usize) -> Vec<Value> {
        wait_for(&format!("{count} admin {action} events"), || {
            let events: Vec<Value> = self
                .events()
                .into_iter()
                .filter(|e| e["event_type"] == "admin" && e["action"] == action)
                .collect();
            (events.len() >= count).then_some(events)
        })
    }
}

const ACME: &str = "[vendor]\nname = \"acme\"\nsources = [\"127.0.0.0/8\"]\n\n\
                    [[allow]]\ndevice = \"press-1\"\nfunctions = [\"read_holding_registers\"]\naddresses = [\"0-999\"]\n";

struct Gateway {
    process: Process,
    listener: SocketAddr,
    config: PathBuf,
}

impl Gateway {
    fn ctl(&self, args: &[&str]) -> Output {
        ctl(&self.config, args)
    }

    /// Stops the gateway with SIGTERM and waits for it to exit.
    fn stop(mut self) {
        let pid = nix::unistd::Pid::from_raw(self.process.0.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        let deadline = Instant::now() + WAIT;
        while self.process.0.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "gateway did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn ctl(config: &Path, args: &[&str]) -> Output {
    Command::new(SLUICE)
        .arg("ctl")
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .expect("run sluice ctl")
}

fn ctl_json(gateway: &Gateway, args: &[&str]) -> Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let output = gateway.ctl(&all);
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    serde_json::from_slice(&output.stdout).unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn wait_for<T>(what: &str, mut condition: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(value) = condition() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Opens a Modbus client connection and does one read, so the session is
/// open and counted.
fn client_with_one_read(gateway: &Gateway) -> TcpStream {
    let mut stream = TcpStream::connect(gateway.listener).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    // Read holding register 5 of unit 1, transaction 1.
    stream
        .write_all(&[0, 1, 0, 0, 0, 6, 1, 3, 0, 5, 0, 1])
        .unwrap();
    let mut response = [0u8; 11];
    stream.read_exact(&mut response).unwrap();
    assert_eq!(response, [0, 1, 0, 0, 0, 5, 1, 3, 2, 0, 5]);
    stream
}

/// Returns true when the peer closed `stream`.
fn is_closed(stream: &mut TcpStream) -> bool {
    let mut byte = [0u8; 1];
    matches!(stream.read(&mut byte), Ok(0) | Err(_))
}

#[test]
fn status_reports_gateway_listener_device_and_sessions() {
    let setup = Setup::new();
    let gateway = setup.start();
    let _client = client_with_one_read(&gateway);

    let status = ctl_json(&gateway, &["status"]);
    assert_eq!(status["gateway"], "ctl-test");
    assert_eq!(status["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(
        status["listeners"],
        json!([{ "name": "scada", "address": gateway.listener.to_string() }])
    );
    assert_eq!(status["devices"][0]["name"], "press-1");
    assert_eq!(status["devices"][0]["up"], true);
    assert_eq!(status["sessions"], 1);
    assert_eq!(status["audit_writable"], true);
    assert_eq!(status["quarantined"], json!([]));

    let table = gateway.ctl(&["status"]);
    assert_eq!(table.status.code(), Some(0));
    let table = text(&table.stdout);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines[0], "gateway   ctl-test");
    assert_eq!(lines[4], "sessions  1");
    assert_eq!(lines[5], "audit     writable");
    assert!(
        table.contains(&format!("scada     {}\n", gateway.listener)),
        "{table}"
    );
}

#[test]
fn sessions_lists_and_kill_closes_one() {
    let setup = Setup::new();
    let gateway = setup.start();
    let mut client = client_with_one_read(&gateway);
    let source = client.local_addr().unwrap().to_string();

    let sessions = ctl_json(&gateway, &["sessions"]);
    assert_eq!(sessions.as_array().unwrap().len(), 1);
    let session = &sessions[0];
    assert_eq!(session["listener"], "scada");
    assert_eq!(session["vendor"], "acme");
    assert_eq!(session["source"], source.as_str());
    assert_eq!(session["requests"], 1);
    let id = session["id"].as_u64().unwrap();

    let table = text(&gateway.ctl(&["sessions"]).stdout);
    let lines: Vec<Vec<&str>> = table
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        lines[0],
        ["ID", "LISTENER", "VENDOR", "SOURCE", "STARTED", "REQUESTS"]
    );
    let started = session["started"].as_str().unwrap();
    assert_eq!(
        lines[1],
        [
            id.to_string().as_str(),
            "scada",
            "acme",
            source.as_str(),
            started,
            "1"
        ]
    );

    let killed = gateway.ctl(&["kill", &id.to_string()]);
    assert_eq!(killed.status.code(), Some(0), "{killed:?}");
    assert_eq!(text(&killed.stdout), format!("closed session {id}\n"));
    assert!(is_closed(&mut client));

    let event = &setup.admin_events("kill", 1)[0];
    assert_eq!(event["session_id"], id);
    assert_eq!(event["vendor"], "acme");
    assert_eq!(event["listener"], "scada");
    let uid = nix::unistd::Uid::current().as_raw();
    assert_eq!(event["detail"]["uid"], uid);
    let user = nix::unistd::User::from_uid(nix::unistd::Uid::current())
        .unwrap()
        .map(|user| user.name);
    assert_eq!(event["detail"]["user"].as_str(), user.as_deref());

    let missing = gateway.ctl(&["kill", "999"]);
    assert_eq!(missing.status.code(), Some(1));
    assert_eq!(
        text(&missing.stderr),
        "error: no open session 999; list them with `sluice ctl sessions`\n"
    );
}

#[test]
fn quarantine_closes_sessions_refuses_unknown_and_survives_restart() {
    let setup = Setup::new();
    let gateway = setup.start();
    let mut client = client_with_one_read(&gateway);

    let quarantined = gateway.ctl(&["quarantine", "acme"]);
    assert_eq!(quarantined.status.code(), Some(0), "{quarantined:?}");
    assert_eq!(
        text(&quarantined.stdout),
        "quarantined acme until released; closed 1 sessions\n"
    );
    assert!(is_closed(&mut client));

    let stored: Value = serde_json::from_str(
        &std::fs::read_to_string(setup.path("audit/quarantine.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(stored["vendors"].as_array().unwrap().len(), 1);
    assert_eq!(stored["vendors"][0]["vendor"], "acme");
    assert_eq!(stored["vendors"][0].get("until"), None);
    let event = &setup.admin_events("quarantine", 1)[0];
    assert_eq!(event["vendor"], "acme");
    assert_eq!(
        event["detail"]["closed_sessions"].as_array().unwrap().len(),
        1
    );

    let unknown = gateway.ctl(&["quarantine", "nobody"]);
    assert_eq!(unknown.status.code(), Some(1));
    assert_eq!(
        text(&unknown.stderr),
        "error: unknown vendor \"nobody\"; configured vendors: acme\n"
    );

    gateway.stop();
    let gateway = setup.start();
    let status = ctl_json(&gateway, &["status"]);
    assert_eq!(status["quarantined"][0]["vendor"], "acme");
    assert_eq!(status["quarantined"][0].get("until"), None);

    let released = gateway.ctl(&["release", "acme"]);
    assert_eq!(released.status.code(), Some(0), "{released:?}");
    assert_eq!(text(&released.stdout), "released acme\n");
    assert_eq!(ctl_json(&gateway, &["status"])["quarantined"], json!([]));
    setup.admin_events("release", 1);

    let again = gateway.ctl(&["release", "acme"]);
    assert_eq!(again.status.code(), Some(1));
    assert_eq!(
        text(&again.stderr),
        "error: vendor \"acme\" is not quarantined\n"
    );
}

#[test]
fn quarantine_with_duration_ends_by_itself() {
    let setup = Setup::new();
    let gateway = setup.start();

    let result = ctl_json(&gateway, &["quarantine", "acme", "--for", "1s"]);
    assert_eq!(result["action"], "quarantine");
    assert!(result["until"].is_string(), "{result}");

    let released = setup.admin_events("release", 1);
    assert_eq!(released[0]["vendor"], "acme");
    assert_eq!(released[0]["detail"], json!({ "expired": true }));
    assert_eq!(ctl_json(&gateway, &["status"])["quarantined"], json!([]));
}

#[test]
fn reload_applies_valid_files_and_reports_errors() {
    let setup = Setup::new();
    let gateway = setup.start();

    let reloaded = gateway.ctl(&["reload"]);
    assert_eq!(reloaded.status.code(), Some(0), "{reloaded:?}");
    assert_eq!(text(&reloaded.stdout), "configuration reloaded\n");

    std::fs::write(setup.path("rules/acme.toml"), "[vendor]\nname = 3\n").unwrap();
    let failed = gateway.ctl(&["reload"]);
    assert_eq!(failed.status.code(), Some(1));
    assert_eq!(
        text(&failed.stderr),
        "error: reload failed: the configuration has errors, so the running configuration was kept; `sluice check` lists them\n"
    );

    let events = setup.admin_events("reload", 2);
    assert_eq!(events[0]["detail"]["applied"], true);
    assert_eq!(events[1]["detail"]["applied"], false);
}

#[test]
fn state_shows_value_and_reading() {
    let setup = Setup::new();
    let gateway = setup.start();

    let state = wait_for("a fresh state reading", || {
        let states = ctl_json(&gateway, &["state"]);
        (states[0].get("value").is_some()).then_some(states)
    });
    assert_eq!(state[0]["name"], "press-1-mode");
    assert_eq!(state[0]["device"], "press-1");
    assert_eq!(state[0]["value"], "production");
    assert_eq!(state[0]["raw"], 900);
    assert!(state[0]["age_ms"].as_u64().is_some(), "{state}");

    let table = text(&gateway.ctl(&["state"]).stdout);
    let lines: Vec<Vec<&str>> = table
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(lines[0], ["STATE", "DEVICE", "VALUE", "RAW", "AGE"]);
    assert_eq!(
        lines[1][..4],
        ["press-1-mode", "press-1", "production", "900"]
    );
}

#[test]
fn ctl_without_admin_section_exits_64() {
    let folder = tempfile::tempdir().unwrap();
    let config = folder.path().join("gateway.toml");
    std::fs::write(&config, "[gateway]\nname = \"gw\"\n").unwrap();
    let output = ctl(&config, &["status"]);
    assert_eq!(output.status.code(), Some(64));
    assert_eq!(
        text(&output.stderr),
        format!(
            "error: {} has no [admin] section, so the gateway has no control socket; add [admin] socket = \"/run/sluice/control.sock\" and restart it\n",
            config.display()
        )
    );
}

#[test]
fn ctl_with_unreachable_socket_exits_69() {
    let folder = tempfile::tempdir().unwrap();
    let config = folder.path().join("gateway.toml");
    std::fs::write(
        &config,
        "[gateway]\nname = \"gw\"\n[admin]\nsocket = \"control.sock\"\n",
    )
    .unwrap();
    let output = ctl(&config, &["status"]);
    assert_eq!(output.status.code(), Some(69));
    assert!(
        text(&output.stderr).starts_with(&format!(
            "error: cannot reach the gateway on {}: ",
            folder.path().join("control.sock").display()
        )),
        "{output:?}"
    );
}

#[test]
fn ctl_with_bad_usage_exits_64() {
    let folder = tempfile::tempdir().unwrap();
    let config = folder.path().join("gateway.toml");
    for args in [
        &["kill", "abc"][..],
        &["quarantine", "acme", "--for", "3w"],
        &["format"],
    ] {
        let output = ctl(&config, args);
        assert_eq!(output.status.code(), Some(64), "{args:?}: {output:?}");
    }
}

#[test]
fn control_socket_has_mode_0660() {
    use std::os::unix::fs::PermissionsExt;
    let setup = Setup::new();
    let gateway = setup.start();
    let mode = std::fs::metadata(setup.path("control.sock"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o660);
    gateway.stop();
    assert!(!setup.path("control.sock").exists());
}

#[test]
fn second_gateway_refuses_a_live_control_socket() {
    let setup = Setup::new();
    let _gateway = setup.start();
    let output = Command::new(SLUICE)
        .arg("run")
        .arg("--config")
        .arg(setup.config())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(
        text(&output.stderr).contains(&format!(
            "another gateway serves the control socket {}",
            setup.path("control.sock").display()
        )),
        "{output:?}"
    );
}
