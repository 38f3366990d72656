//! The `sluice` command line: parses arguments, sets up logging and hands
//! over to the library. Exit status: 0 success, 1 when `check` finds the
//! configuration invalid, 64 for an invalid configuration elsewhere or bad usage;
//! `ctl` also exits 1 when the gateway reports an error and 69 when it cannot
//! be reached.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use sluice::admin::privileges::PrivilegeError;
use sluice::daemon::{self, PrintReadiness, RunError};

/// Exit status for bad usage and invalid configuration (EX_USAGE).
const EXIT_USAGE: u8 = 64;
/// Exit status when `check` finds problems.
const EXIT_INVALID: u8 = 1;

#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    about = "Protocol-aware OT security gateway for Modbus/TCP"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway in the foreground.
    Run {
        /// Gateway configuration file; rules and paths are found from it.
        #[arg(long, default_value = "/etc/sluice/gateway.toml")]
        config: PathBuf,
    },
    /// Validate the gateway file and every rule file, printing every problem.
    Check {
        #[arg(long, default_value = "/etc/sluice/gateway.toml")]
        config: PathBuf,
        /// Explain the decision on one request of a valid configuration, given
        /// as KEY=VALUE words: vendor, device, function, address, quantity,
        /// value, unit, sub_function, mei_type, source, time, state.NAME.
        #[arg(long, value_name = "QUERY")]
        explain: Option<String>,
    },
    /// Create the audit sealing key or verify the audit log.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Talk to the running gateway over its control socket.
    Ctl {
        /// Gateway configuration file; the control socket is found from it.
        #[arg(long, global = true, default_value = "/etc/sluice/gateway.toml")]
        config: PathBuf,
        /// Print the gateway's JSON result instead of a table.
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        command: CtlCommand,
    },
    /// Read a password on standard input and print its argon2id hash in PHC
    /// form, for `password_hash` in a vendor's `opcua_users`.
    HashPassword,
    /// Write the man page and the bash, zsh and fish completions into DIR.
    #[command(hide = true)]
    GenerateAssets { dir: PathBuf },
    /// Run a simulated PLC and the gateway with the example configuration on loopback.
    Demo,
    /// Run only the simulated PLC (a Modbus/TCP server with recognisable values).
    PlcSim {
        /// Address to listen on; port 0 picks a free port.
        #[arg(long, default_value = "127.0.0.1:5021")]
        bind: std::net::SocketAddr,
        /// Append one JSON line per received request to this file.
        #[arg(long)]
        log: Option<PathBuf>,
    },
    /// Run an embedded event collector: an HTTPS server that stores the
    /// events posted to /events as JSON lines, dropping repeated ids.
    Collect {
        /// Address to listen on; port 0 picks a free port.
        #[arg(long)]
        bind: std::net::SocketAddr,
        /// Server certificate chain, PEM.
        #[arg(long)]
        tls_cert: PathBuf,
        /// Server private key, PEM.
        #[arg(long)]
        tls_key: PathBuf,
        /// CA bundle, PEM; when set, clients must present a certificate it signed.
        #[arg(long)]
        client_ca: Option<PathBuf>,
        /// File the events are appended to, one JSON object per line.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum CtlCommand {
    /// Show the gateway, its listeners, devices, sessions and quarantines.
    Status,
    /// List open sessions.
    Sessions,
    /// Close one session.
    Kill {
        /// Session id, as listed by `sessions`.
        id: u64,
    },
    /// Refuse a vendor's connections and requests and close its sessions.
    Quarantine {
        vendor: String,
        /// End the quarantine after this long, such as 90s, 15m, 2h or 1d;
        /// without it the quarantine lasts until `release`.
        #[arg(long = "for", value_name = "DURATION", value_parser = sluice::admin::ctl::parse_duration)]
        duration: Option<std::time::Duration>,
    },
    /// End a vendor's quarantine.
    Release { vendor: String },
    /// Reload the gateway file and the rule files, as SIGHUP does.
    Reload,
    /// Show the operational state values and the age of their readings.
    State,
}

impl CtlCommand {
    fn into_request(self) -> sluice::admin::protocol::Request {
        use sluice::admin::protocol::Request;
        match self {
            CtlCommand::Status => Request::Status,
            CtlCommand::Sessions => Request::Sessions,
            CtlCommand::Kill { id } => Request::Kill { session: id },
            CtlCommand::Quarantine { vendor, duration } => Request::Quarantine {
                vendor,
                duration_s: duration.map(|duration| duration.as_secs()),
            },
            CtlCommand::Release { vendor } => Request::Release { vendor },
            CtlCommand::Reload => Request::Reload,
            CtlCommand::State => Request::State,
        }
    }
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Create the first sealing key and print the verification key once.
    Init {
        #[arg(long, default_value = "/etc/sluice/gateway.toml")]
        config: PathBuf,
        /// Replace an existing key; seals made with the old key then no
        /// longer verify with the new verification key.
        #[arg(long)]
        force: bool,
    },
    /// Check the chain and the seals; names the first bad record.
    Verify {
        #[arg(long, default_value = "/etc/sluice/gateway.toml")]
        config: PathBuf,
        /// Verification key in hex, as printed by `audit init`.
        #[arg(long, conflicts_with = "key_file")]
        key: Option<String>,
        /// File holding the verification key; `-` reads standard input.
        #[arg(long)]
        key_file: Option<PathBuf>,
        /// First sequence number to check.
        #[arg(long)]
        from: Option<u64>,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            let _ = error.print();
            return match error.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                    ExitCode::SUCCESS
                }
                _ => ExitCode::from(EXIT_USAGE),
            };
        }
    };
    init_tracing();

    match cli.command {
        Command::Check { config, explain } => check(&config, explain.as_deref()),
        Command::Run { config } => run_async(run(config)),
        Command::Audit { command } => audit(command),
        Command::Ctl {
            config,
            json,
            command,
        } => ExitCode::from(sluice::admin::ctl::run(
            &config,
            command.into_request(),
            json,
        )),
        Command::HashPassword => hash_password(),
        Command::GenerateAssets { dir } => generate_assets(&dir),
        Command::Demo => run_async(sluice::demo::run()),
        Command::PlcSim { bind, log } => run_async(plc_sim(bind, log)),
        Command::Collect {
            bind,
            tls_cert,
            tls_key,
            client_ca,
            out,
        } => run_async(collect(sluice::collect::server::CollectSettings {
            bind,
            cert: tls_cert,
            key: tls_key,
            client_ca,
            out,
        })),
    }
}

/// Reads one line from standard input, without its line ending, and prints
/// its hash. An empty password is refused: it would let anyone in.
fn hash_password() -> ExitCode {
    let mut line = String::new();
    if let Err(error) = std::io::stdin().read_line(&mut line) {
        eprintln!("error: failed to read the password from standard input: {error}");
        return ExitCode::from(EXIT_USAGE);
    }
    let password = line.strip_suffix('\n').unwrap_or(&line);
    let password = password.strip_suffix('\r').unwrap_or(password);
    if password.is_empty() {
        eprintln!("error: empty password; write the password on standard input");
        return ExitCode::from(EXIT_USAGE);
    }
    match sluice::opcua::password::hash_password(password) {
        Ok(hash) => {
            println!("{hash}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: failed to hash the password: {error}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing() {
    let filter = EnvFilter::try_from_env("SLUICE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn run_async<F: std::future::Future<Output = ExitCode>>(future: F) -> ExitCode {
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime.block_on(future),
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            ExitCode::FAILURE
        }
    }
}

fn check(config: &std::path::Path, explain: Option<&str>) -> ExitCode {
    match sluice::policy::Policy::load(config) {
        // The decision comes first on standard output, so warnings go to
        // standard error when explaining.
        Ok((policy, warnings)) if explain.is_some() => {
            for warning in &warnings {
                eprintln!("{warning}");
            }
            explain_query(&policy, explain.unwrap_or_default())
        }
        Ok((_, warnings)) => {
            for warning in &warnings {
                println!("{warning}");
            }
            println!("{}: configuration valid", config.display());
            ExitCode::SUCCESS
        }
        Err(diagnostics) => {
            for error in &diagnostics.errors {
                println!("{error}");
            }
            for warning in &diagnostics.warnings {
                println!("{warning}");
            }
            ExitCode::from(EXIT_INVALID)
        }
    }
}

/// Prints the decision on one request; the exit status stays that of
/// `check`, except for a query that cannot be parsed.
fn explain_query(policy: &sluice::policy::Policy, query: &str) -> ExitCode {
    match sluice::policy::ExplainQuery::parse(policy, query) {
        Ok(query) => {
            print!("{}", policy.explain(&query));
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: --explain: {error}");
            ExitCode::from(EXIT_USAGE)
        }
    }
}

async fn run(config: PathBuf) -> ExitCode {
    let stop = CancellationToken::new();
    match daemon::run(&config, &mut PrintReadiness, stop).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(RunError::Config(diagnostics)) => {
            for error in &diagnostics.errors {
                eprintln!("{error}");
            }
            eprintln!(
                "error: {}: invalid configuration, not starting",
                config.display()
            );
            ExitCode::from(EXIT_USAGE)
        }
        Err(RunError::Io(error)) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
        Err(RunError::Privileges(error)) => {
            eprintln!("error: {error}");
            match error {
                PrivilegeError::Switch { .. } | PrivilegeError::NotDropped { .. } => {
                    ExitCode::FAILURE
                }
                _ => ExitCode::from(EXIT_USAGE),
            }
        }
    }
}

/// Writes a man page per visible command to `man/man1/` and the shell
/// completions `completions/{sluice.bash,_sluice,sluice.fish}` under `dir`,
/// generated from this command line, for the Debian package.
fn generate_assets(dir: &std::path::Path) -> ExitCode {
    use clap::CommandFactory;
    use clap_complete::Shell;

    let mut command = Cli::command();
    let man = dir.join("man").join("man1");
    let completions = dir.join("completions");
    let result = (|| -> std::io::Result<()> {
        std::fs::create_dir_all(&man)?;
        std::fs::create_dir_all(&completions)?;
        clap_mangen::generate_to(command.clone(), &man)?;
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            clap_complete::generate_to(shell, &mut command, "sluice", &completions)?;
        }
        Ok(())
    })();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: cannot write assets to {}: {error}", dir.display());
            ExitCode::FAILURE
        }
    }
}

async fn plc_sim(bind: std::net::SocketAddr, log: Option<PathBuf>) -> ExitCode {
    let mut plc = sluice::modbus::sim::SimPlc::new();
    if let Some(path) = log {
        plc = match plc.with_log(&path) {
            Ok(plc) => plc,
            Err(error) => {
                eprintln!("error: cannot open request log {}: {error}", path.display());
                return ExitCode::FAILURE;
            }
        };
    }
    let listener = match tokio::net::TcpListener::bind(bind).await {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!("error: cannot bind {bind}: {error}");
            return ExitCode::FAILURE;
        }
    };
    match listener.local_addr() {
        Ok(address) => println!("listening {address}"),
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::FAILURE;
        }
    }
    tokio::select! {
        served = plc.serve(listener) => match served {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("error: simulated PLC failed: {error}");
                ExitCode::FAILURE
            }
        },
        _ = tokio::signal::ctrl_c() => ExitCode::SUCCESS,
    }
}

async fn collect(settings: sluice::collect::server::CollectSettings) -> ExitCode {
    match sluice::collect::server::run(settings).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::from(EXIT_USAGE)
        }
    }
}

/// Finds the audit folder the way `run` does, from the configuration.
fn audit_folder(config: &std::path::Path) -> Result<PathBuf, ExitCode> {
    match sluice::policy::Policy::load(config) {
        Ok((policy, _)) => Ok(policy.audit().path.clone()),
        Err(diagnostics) => {
            for error in &diagnostics.errors {
                eprintln!("{error}");
            }
            eprintln!("error: {}: invalid configuration", config.display());
            Err(ExitCode::from(EXIT_USAGE))
        }
    }
}

fn audit(command: AuditCommand) -> ExitCode {
    match command {
        AuditCommand::Init { config, force } => {
            let folder = match audit_folder(&config) {
                Ok(folder) => folder,
                Err(code) => return code,
            };
            match sluice::audit::init_key(&folder, force) {
                Ok(key) => {
                    eprintln!("sealing key stored in {}; keep the verification key below off this machine:", folder.display());
                    println!("{key}");
                    ExitCode::SUCCESS
                }
                Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {
                    eprintln!(
                        "error: {} already has a sealing key; pass --force to replace it",
                        folder.display()
                    );
                    ExitCode::from(EXIT_USAGE)
                }
                Err(error) => {
                    eprintln!(
                        "error: cannot create the sealing key in {}: {error}",
                        folder.display()
                    );
                    ExitCode::FAILURE
                }
            }
        }
        AuditCommand::Verify {
            config,
            key,
            key_file,
            from,
        } => {
            let folder = match audit_folder(&config) {
                Ok(folder) => folder,
                Err(code) => return code,
            };
            let key = match sluice::audit::cli::read_verification_key(
                key.as_deref(),
                key_file.as_deref(),
            ) {
                Ok(key) => key,
                Err(error) => {
                    eprintln!("error: {error}");
                    return ExitCode::from(EXIT_USAGE);
                }
            };
            match sluice::audit::verify(&folder, &key, from) {
                Ok(report) => {
                    print!("{report}");
                    if report.is_good() {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::from(EXIT_INVALID)
                    }
                }
                Err(error) => {
                    eprintln!(
                        "error: cannot read the audit log in {}: {error}",
                        folder.display()
                    );
                    ExitCode::FAILURE
                }
            }
        }
    }
}
