//! Running as a service: the systemd unit checked by `systemd-analyze`, the
//! sd_notify messages of the built binary, and the switch from root to the
//! service account. The account tests need root, as `scripts/test` runs.

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SLUICE: &str = env!("CARGO_BIN_EXE_sluice");
const UNIT: &str = include_str!("../systemd/sluice.service");
const WAIT: Duration = Duration::from_secs(15);
/// Highest `systemd-analyze security` exposure accepted; 2.0 and below is
/// rated OK by systemd 252.
const MAX_EXPOSURE: f64 = 2.0;

struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Copies the unit into `folder` with ExecStart pointing at the built binary,
/// because `verify` requires the program to exist.
fn unit_copy(folder: &Path) -> PathBuf {
    let unit = UNIT.replace(
        "ExecStart=/usr/bin/sluice ",
        &format!("ExecStart={SLUICE} "),
    );
    let path = folder.join("sluice.service");
    std::fs::write(&path, unit).unwrap();
    path
}

#[test]
fn unit_passes_systemd_analyze_verify() {
    let folder = tempfile::tempdir().unwrap();
    let unit = unit_copy(folder.path());
    // `verify` also opens Documentation=man:sluice(1), so it needs the man
    // page that the package installs.
    let assets = folder.path().join("assets");
    let generated = Command::new(SLUICE)
        .arg("generate-assets")
        .arg(&assets)
        .status()
        .unwrap();
    assert!(generated.success());
    let output = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .env("MANPATH", assets.join("man"))
        .output()
        .expect("systemd-analyze runs; install the Debian package systemd");
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&output.stderr), "");
}

#[test]
fn unit_exposure_is_at_most_two() {
    let folder = tempfile::tempdir().unwrap();
    let unit = unit_copy(folder.path());
    let output = Command::new("systemd-analyze")
        .args(["security", "--offline=true"])
        .arg(&unit)
        .output()
        .expect("systemd-analyze runs; install the Debian package systemd");
    let report = String::from_utf8_lossy(&output.stdout).into_owned();
    let line = report
        .lines()
        .find(|line| line.contains("Overall exposure level for sluice.service:"))
        .unwrap_or_else(|| panic!("no overall exposure line in {report}"));
    let number = line
        .split(':')
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap();
    assert_eq!(number, "1.6", "{line}");
    let exposure: f64 = number.parse().unwrap();
    assert!(exposure <= MAX_EXPOSURE, "{line}");
}

#[test]
fn unit_sets_service_contract() {
    let settings: Vec<&str> = UNIT
        .lines()
        .filter(|line| !line.starts_with('#') && line.contains('='))
        .collect();
    for expected in [
        "Type=notify",
        "ExecStart=/usr/bin/sluice run --config /etc/sluice/gateway.toml",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Restart=on-failure",
        "RestartPreventExitStatus=64",
        "WatchdogSec=30s",
        "User=sluice",
        "Group=sluice",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
        "StateDirectory=sluice",
        "RuntimeDirectory=sluice",
        "NoNewPrivileges=yes",
    ] {
        assert!(settings.contains(&expected), "missing {expected}");
    }
}

/// Writes a gateway folder with one listener and no devices in use.
fn write_config(folder: &Path, gateway_extra: &str) -> PathBuf {
    std::fs::create_dir_all(folder.join("rules")).unwrap();
    let gateway = format!(
        "[gateway]\nname = \"svc\"\ntimezone = \"UTC\"\n{gateway_extra}\n\
         [[listener]]\nname = \"scada\"\nprotocol = \"modbus\"\nbind = \"127.0.0.1:0\"\ndevice = \"press-1\"\n\n\
         [[device]]\nname = \"press-1\"\naddress = \"127.0.0.1:1\"\n\n\
         [audit]\npath = \"audit\"\n"
    );
    std::fs::write(folder.join("gateway.toml"), gateway).unwrap();
    std::fs::write(
        folder.join("rules/acme.toml"),
        "[vendor]\nname = \"acme\"\nsources = [\"127.0.0.0/8\"]\n",
    )
    .unwrap();
    folder.join("gateway.toml")
}

fn start(config: &Path, env: &[(&str, String)]) -> Process {
    let mut command = Command::new(SLUICE);
    command
        .arg("run")
        .arg("--config")
        .arg(config)
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    for (key, value) in env {
        command.env(key, value);
    }
    let mut child = command.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let process = Process(child);
    let mut lines = BufReader::new(stdout).lines();
    for line in lines.by_ref() {
        if line.unwrap() == "ready" {
            std::thread::spawn(move || lines.for_each(drop));
            return process;
        }
    }
    panic!("gateway ended before printing ready");
}

fn receive(socket: &UnixDatagram) -> String {
    let mut buffer = [0u8; 256];
    let length = socket
        .recv(&mut buffer)
        .expect("notification within the timeout");
    String::from_utf8_lossy(&buffer[..length]).into_owned()
}

fn terminate(process: &mut Process) {
    let pid = nix::unistd::Pid::from_raw(process.0.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let deadline = Instant::now() + WAIT;
    while process.0.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "gateway did not stop");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn check_notifications(socket: UnixDatagram, notify_socket: String) {
    socket.set_read_timeout(Some(WAIT)).unwrap();
    let folder = tempfile::tempdir().unwrap();
    let config = write_config(folder.path(), "allow_root = true");
    let mut gateway = start(
        &config,
        &[
            ("NOTIFY_SOCKET", notify_socket),
            ("WATCHDOG_USEC", "200000".into()),
        ],
    );
    assert_eq!(receive(&socket), "READY=1");
    // Keep-alives every 100 ms, half of WATCHDOG_USEC.
    assert_eq!(receive(&socket), "WATCHDOG=1");
    assert_eq!(receive(&socket), "WATCHDOG=1");
    terminate(&mut gateway);
    let mut last = receive(&socket);
    while last == "WATCHDOG=1" {
        last = receive(&socket);
    }
    assert_eq!(last, "STOPPING=1");
}

#[test]
fn gateway_notifies_ready_watchdog_and_stopping() {
    let folder = tempfile::tempdir().unwrap();
    let path = folder.path().join("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    check_notifications(socket, path.display().to_string());
}

#[test]
fn gateway_notifies_abstract_socket() {
    use std::os::linux::net::SocketAddrExt;
    let name = format!("sluice-systemd-test-{}", std::process::id());
    let address = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let socket = UnixDatagram::bind_addr(&address).unwrap();
    check_notifications(socket, format!("@{name}"));
}

fn require_root() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "the account tests start the gateway as root; run them as root, as scripts/test does"
    );
}

/// Returns the uid and gid of the `sluice` system account, creating it
/// when missing.
fn service_account() -> (u32, u32) {
    let lookup = || nix::unistd::User::from_name("sluice").unwrap();
    if lookup().is_none() {
        let status = Command::new("useradd")
            .args([
                "--system",
                "--user-group",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                "sluice",
            ])
            .status()
            .unwrap();
        assert!(status.success() || lookup().is_some(), "useradd failed");
    }
    let user = lookup().unwrap();
    (user.uid.as_raw(), user.gid.as_raw())
}

fn status_line(pid: u32, key: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find(|line| line.starts_with(key))
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
        .to_owned()
}

#[test]
fn root_start_switches_to_configured_user() {
    require_root();
    let (uid, gid) = service_account();
    let folder = tempfile::tempdir().unwrap();
    let config = write_config(folder.path(), "user = \"sluice\"");
    // The account reads the configuration on reload and writes the audit log.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(folder.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::create_dir(folder.path().join("audit")).unwrap();
    std::os::unix::fs::chown(folder.path().join("audit"), Some(uid), Some(gid)).unwrap();

    let gateway = start(&config, &[]);
    let pid = gateway.0.id();
    assert_eq!(
        status_line(pid, "Uid:"),
        format!("Uid:\t{uid}\t{uid}\t{uid}\t{uid}")
    );
    assert_eq!(
        status_line(pid, "Gid:"),
        format!("Gid:\t{gid}\t{gid}\t{gid}\t{gid}")
    );
    assert_eq!(
        status_line(pid, "Groups:").trim_end(),
        format!("Groups:\t{gid}")
    );
    assert_eq!(status_line(pid, "NoNewPrivs:"), "NoNewPrivs:\t1");
    assert_eq!(status_line(pid, "CapEff:"), "CapEff:\t0000000000000000");
}

#[test]
fn root_start_without_user_exits_64() {
    require_root();
    let folder = tempfile::tempdir().unwrap();
    let config = write_config(folder.path(), "");
    let output = Command::new(SLUICE)
        .arg("run")
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(64));
    assert_eq!(
        String::from_utf8_lossy(&output.stderr).lines().last(),
        Some("error: running as root without [gateway] user; set user = \"sluice\" to switch to that account after binding, or allow_root = true to stay root")
    );
    assert_eq!(String::from_utf8_lossy(&output.stdout), "");
}
