//! `sluice demo`: the example configuration, embedded in the binary, run on
//! loopback against one simulated PLC per configured device, for a first look
//! without any hardware.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use tokio_util::sync::CancellationToken;

use crate::daemon::{self, Readiness, RunError};
use crate::modbus::sim::SimPlc;
use crate::policy::Policy;

/// The example files, embedded so the demo needs nothing on disk.
const EXAMPLE_FILES: &[(&str, &str)] = &[
    ("gateway.toml", include_str!("../gateway.toml.example")),
    ("rules/acme.toml", include_str!("../rules/acme.toml")),
    (
        "rules/historian.toml",
        include_str!("../rules/historian.toml"),
    ),
];

/// Holding register of the example's `press-1-mode` state, and its value for
/// "production", set at start so state-gated writes are denied.
const MODE_REGISTER: u16 = 900;
const PRODUCTION: u16 = 0;

struct DemoReadiness {
    plc: Option<SocketAddr>,
    listener: Option<SocketAddr>,
    folder: PathBuf,
}

impl Readiness for DemoReadiness {
    fn listening(&mut self, name: &str, address: SocketAddr) {
        println!("gateway listener {name} on {address}");
        self.listener.get_or_insert(address);
    }

    fn ready(&mut self) {
        let (Some(gateway), Some(plc)) = (self.listener, self.plc) else {
            return;
        };
        let (host, port) = (gateway.ip(), gateway.port());
        let (plc_host, plc_port) = (plc.ip(), plc.port());
        println!(
            "\nsluice demo is running; events go to the audit log in {}/audit\n\
             \n\
             An allowed read of holding registers 0-9 (mbpoll counts references from 1):\n\
             \x20 mbpoll -m tcp -a 1 -t 4 -r 1 -c 10 -1 -p {port} {host}\n\
             \n\
             A denied write (press-1-mode is \"production\"), answered with exception 01:\n\
             \x20 mbpoll -m tcp -a 1 -t 4 -r 101 -1 -p {port} {host} 42\n\
             \n\
             Switch the simulated press to maintenance directly on the PLC, then write again:\n\
             \x20 mbpoll -m tcp -a 1 -t 4 -r {register} -1 -p {plc_port} {plc_host} 1\n\
             \n\
             Press Ctrl-C to stop.",
            self.folder.display(),
            register = MODE_REGISTER + 1,
        );
    }
}

/// Runs the demo until Ctrl-C.
pub async fn run() -> ExitCode {
    let folder = std::env::temp_dir().join(format!("sluice-demo-{}", std::process::id()));
    let result = run_in(&folder).await;
    let _ = std::fs::remove_dir_all(&folder);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn run_in(folder: &Path) -> Result<(), String> {
    write_examples(folder)
        .map_err(|error| format!("cannot write demo files to {}: {error}", folder.display()))?;
    let config = folder.join("gateway.toml");
    let (policy, _) = Policy::load(&config).map_err(|diagnostics| {
        let lines: Vec<String> = diagnostics.errors.iter().map(ToString::to_string).collect();
        format!(
            "embedded example configuration is invalid:\n{}",
            lines.join("\n")
        )
    })?;

    let mut first_plc = None;
    let mut plcs = Vec::new();
    for device in policy.devices() {
        let socket = tokio::net::TcpListener::bind(device.address)
            .await
            .map_err(|error| {
                format!(
                    "cannot start the simulated PLC for {} on {}: {error}",
                    device.name, device.address
                )
            })?;
        let plc = SimPlc::new();
        plc.set_holding(MODE_REGISTER, PRODUCTION);
        println!("simulated PLC {} on {}", device.name, device.address);
        first_plc.get_or_insert(device.address);
        plcs.push(tokio::spawn(plc.serve(socket)));
    }

    let stop = CancellationToken::new();
    let mut readiness = DemoReadiness {
        plc: first_plc,
        listener: None,
        folder: folder.to_path_buf(),
    };
    let ctrl_c = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let _ = tokio::signal::ctrl_c().await;
            stop.cancel();
        })
    };
    let result = daemon::run(&config, &mut readiness, stop).await;
    ctrl_c.abort();
    for plc in plcs {
        plc.abort();
    }
    match result {
        Ok(()) => Ok(()),
        Err(RunError::Config(diagnostics)) => {
            Err(format!("{} configuration errors", diagnostics.errors.len()))
        }
        Err(RunError::Io(error)) => Err(error.to_string()),
        Err(RunError::Privileges(error)) => Err(error.to_string()),
    }
}

fn write_examples(folder: &Path) -> std::io::Result<()> {
    for (name, contents) in EXAMPLE_FILES {
        let path = folder.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        // The demo serves loopback only, so it may run as root for a first look.
        let contents = contents.replacen("[gateway]\n", "[gateway]\nallow_root = true\n", 1);
        std::fs::write(path, contents)?;
    }
    Ok(())
}
