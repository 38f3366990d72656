//! `sluice ctl`: finds the control socket from `gateway.toml`, sends one
//! request, and prints the response as a table or, with `--json`, as the raw
//! JSON result.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::de::DeserializeOwned;

use super::protocol::{ActionReport, Request, Response, SessionStatus, StateStatus, StatusReport};

/// Exit status when the gateway ran the command.
pub const EXIT_OK: u8 = 0;
/// Exit status when the gateway reports an error, such as an unknown session.
pub const EXIT_FAILED: u8 = 1;
/// Exit status for bad usage or a configuration without `[admin]` (EX_USAGE).
pub const EXIT_USAGE: u8 = 64;
/// Exit status when the control socket cannot be reached (EX_UNAVAILABLE).
pub const EXIT_UNAVAILABLE: u8 = 69;

/// How long `ctl` waits for a response; a reload may take a while.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(90);
/// Largest response read, in bytes.
const MAX_RESPONSE_BYTES: u64 = 16 * 1024 * 1024;

/// Parses a duration such as `90s`, `15m`, `2h` or `1d`; a bare number is
/// seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => text.split_at(at),
        None => (text, "s"),
    };
    let number: u64 = number
        .parse()
        .map_err(|_| format!("invalid duration \"{text}\"; write it like 90s, 15m, 2h or 1d"))?;
    let seconds = match unit {
        "s" => Some(number),
        "m" => number.checked_mul(60),
        "h" => number.checked_mul(3600),
        "d" => number.checked_mul(86_400),
        _ => None,
    };
    match seconds {
        Some(seconds) if seconds > 0 => Ok(Duration::from_secs(seconds)),
        _ => Err(format!(
            "invalid duration \"{text}\"; write a positive number with s, m, h or d"
        )),
    }
}

/// Runs one control command against the gateway configured in `config` and
/// returns the exit status.
pub fn run(config: &Path, request: Request, json: bool) -> u8 {
    let service = match crate::config::load_service(config) {
        Ok((service, _)) => service,
        Err(diagnostics) => {
            eprint!("{diagnostics}");
            eprintln!("error: {}: invalid configuration", config.display());
            return EXIT_USAGE;
        }
    };
    let Some(admin) = service.admin else {
        eprintln!(
            "error: {} has no [admin] section, so the gateway has no control socket; add [admin] socket = \"/run/sluice/control.sock\" and restart it",
            config.display()
        );
        return EXIT_USAGE;
    };
    let response = match exchange(&admin.socket, &request) {
        Ok(response) => response,
        Err(error) => {
            eprintln!(
                "error: cannot reach the gateway on {}: {error}; is `sluice run` running with this configuration?",
                admin.socket.display()
            );
            return EXIT_UNAVAILABLE;
        }
    };
    if !response.ok {
        eprintln!(
            "error: {}",
            response
                .error
                .as_deref()
                .unwrap_or("the gateway reported an error")
        );
        return EXIT_FAILED;
    }
    let result = response.result.unwrap_or(serde_json::Value::Null);
    if json {
        println!("{result}");
        return EXIT_OK;
    }
    match print_result(&request, result) {
        Ok(()) => EXIT_OK,
        Err(error) => {
            eprintln!("error: unexpected response from the gateway: {error}");
            EXIT_UNAVAILABLE
        }
    }
}

/// Sends `request` on the socket at `path` and reads one response line.
pub fn exchange(path: &Path, request: &Request) -> io::Result<Response> {
    let mut stream = UnixStream::connect(path)?;
    stream.set_read_timeout(Some(RESPONSE_TIMEOUT))?;
    stream.set_write_timeout(Some(RESPONSE_TIMEOUT))?;
    let mut line = serde_json::to_string(request).map_err(io::Error::other)?;
    line.push('\n');
    stream.write_all(line.as_bytes())?;

    let mut reader = BufReader::new(stream.take(MAX_RESPONSE_BYTES));
    let mut response = String::new();
    if reader.read_line(&mut response)? == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the gateway closed the connection without a response",
        ));
    }
    serde_json::from_str(&response).map_err(|error| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("invalid response: {error}"),
        )
    })
}

fn decode<T: DeserializeOwned>(value: serde_json::Value) -> Result<T, String> {
    serde_json::from_value(value).map_err(|error| error.to_string())
}

fn print_result(request: &Request, result: serde_json::Value) -> Result<(), String> {
    let text = match request {
        Request::Status => format_status(&decode(result)?),
        Request::Sessions => format_sessions(&decode::<Vec<SessionStatus>>(result)?),
        Request::State => format_states(&decode::<Vec<StateStatus>>(result)?),
        Request::Kill { .. }
        | Request::Quarantine { .. }
        | Request::Release { .. }
        | Request::Reload => format_action(&decode(result)?),
    };
    print!("{text}");
    Ok(())
}

/// Formats rows as left-aligned columns separated by two spaces.
pub fn format_table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut text = String::new();
    let header: Vec<String> = header.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        text.push_str(cells.join("  ").trim_end());
        text.push('\n');
    }
    text
}

/// Formats seconds as `1d 2h 3m 4s`, leaving out leading zero units.
pub fn format_uptime(seconds: u64) -> String {
    let parts = [
        (seconds / 86_400, "d"),
        (seconds / 3600 % 24, "h"),
        (seconds / 60 % 60, "m"),
        (seconds % 60, "s"),
    ];
    let first = parts
        .iter()
        .position(|(value, _)| *value > 0)
        .unwrap_or(parts.len() - 1);
    let words: Vec<String> = parts[first..]
        .iter()
        .map(|(value, unit)| format!("{value}{unit}"))
        .collect();
    words.join(" ")
}

pub fn format_status(status: &StatusReport) -> String {
    let audit = if status.audit_writable {
        "writable"
    } else {
        "NOT WRITABLE: writes are denied"
    };
    let mut text = format!(
        "gateway   {}\nversion   {}\nstarted   {}\nuptime    {}\nsessions  {}\naudit     {audit}\n",
        status.gateway,
        status.version,
        status.started,
        format_uptime(status.uptime_s),
        status.sessions,
    );
    let listeners: Vec<Vec<String>> = status
        .listeners
        .iter()
        .map(|l| vec![l.name.clone(), l.address.clone()])
        .collect();
    text.push('\n');
    text.push_str(&format_table(&["LISTENER", "ADDRESS"], &listeners));
    let devices: Vec<Vec<String>> = status
        .devices
        .iter()
        .map(|d| {
            let up = if d.up { "up" } else { "down" };
            vec![d.name.clone(), d.address.clone(), up.to_owned()]
        })
        .collect();
    text.push('\n');
    text.push_str(&format_table(&["DEVICE", "ADDRESS", "STATUS"], &devices));
    if !status.quarantined.is_empty() {
        let rows: Vec<Vec<String>> = status
            .quarantined
            .iter()
            .map(|q| {
                let until = q.until.clone().unwrap_or_else(|| "release".to_owned());
                vec![q.vendor.clone(), q.since.clone(), until]
            })
            .collect();
        text.push('\n');
        text.push_str(&format_table(&["QUARANTINED", "SINCE", "UNTIL"], &rows));
    }
    text
}

pub fn format_sessions(sessions: &[SessionStatus]) -> String {
    let rows: Vec<Vec<String>> = sessions
        .iter()
        .map(|s| {
            vec![
                s.id.to_string(),
                s.listener.clone(),
                s.vendor.clone(),
                s.source.clone(),
                s.started.clone(),
                s.requests.to_string(),
            ]
        })
        .collect();
    format_table(
        &["ID", "LISTENER", "VENDOR", "SOURCE", "STARTED", "REQUESTS"],
        &rows,
    )
}

pub fn format_states(states: &[StateStatus]) -> String {
    let rows: Vec<Vec<String>> = states
        .iter()
        .map(|s| {
            vec![
                s.name.clone(),
                s.device.clone(),
                s.value.clone().unwrap_or_else(|| "unknown".to_owned()),
                s.raw.map_or_else(|| "-".to_owned(), |raw| raw.to_string()),
                s.age_ms
                    .map_or_else(|| "-".to_owned(), |age| format!("{age} ms")),
            ]
        })
        .collect();
    format_table(&["STATE", "DEVICE", "VALUE", "RAW", "AGE"], &rows)
}

pub fn format_action(action: &ActionReport) -> String {
    match action.action.as_str() {
        "kill" => format!(
            "closed session {}\n",
            action.session.map_or_else(String::new, |id| id.to_string())
        ),
        "quarantine" => {
            let vendor = action.vendor.as_deref().unwrap_or_default();
            let until = action.until.as_deref().map_or_else(
                || "until released".to_owned(),
                |until| format!("until {until}"),
            );
            format!(
                "quarantined {vendor} {until}; closed {} sessions\n",
                action.closed_sessions.len()
            )
        }
        "release" => format!(
            "released {}\n",
            action.vendor.as_deref().unwrap_or_default()
        ),
        "reload" => "configuration reloaded\n".to_owned(),
        other => format!("{other}\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::protocol::{DeviceStatus, ListenerStatus};

    #[test]
    fn duration_accepts_units_and_bare_seconds() {
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("1d"), Ok(Duration::from_secs(86_400)));
    }

    #[test]
    fn duration_rejects_zero_and_unknown_units() {
        assert_eq!(
            parse_duration("0s"),
            Err("invalid duration \"0s\"; write a positive number with s, m, h or d".into())
        );
        assert_eq!(
            parse_duration("3w"),
            Err("invalid duration \"3w\"; write a positive number with s, m, h or d".into())
        );
        assert_eq!(
            parse_duration("h"),
            Err("invalid duration \"h\"; write it like 90s, 15m, 2h or 1d".into())
        );
    }

    #[test]
    fn uptime_leaves_out_leading_zero_units() {
        assert_eq!(format_uptime(0), "0s");
        assert_eq!(format_uptime(61), "1m 1s");
        assert_eq!(format_uptime(90_061), "1d 1h 1m 1s");
    }

    #[test]
    fn table_aligns_columns() {
        let rows = vec![
            vec!["1".into(), "scada".into()],
            vec!["12".into(), "vendors".into()],
        ];
        assert_eq!(
            format_table(&["ID", "LISTENER"], &rows),
            "ID  LISTENER\n1   scada\n12  vendors\n"
        );
    }

    #[test]
    fn status_lists_listeners_devices_and_quarantine() {
        let status = StatusReport {
            gateway: "edge-01".into(),
            version: "0.1.0".into(),
            started: "2026-01-01T00:00:00Z".into(),
            uptime_s: 65,
            listeners: vec![ListenerStatus {
                name: "scada".into(),
                address: "127.0.0.1:5020".into(),
            }],
            devices: vec![DeviceStatus {
                name: "press-1".into(),
                address: "127.0.0.1:5021".into(),
                up: false,
            }],
            sessions: 0,
            audit_writable: true,
            quarantined: Vec::new(),
        };
        assert_eq!(
            format_status(&status),
            "gateway   edge-01\nversion   0.1.0\nstarted   2026-01-01T00:00:00Z\nuptime    1m 5s\nsessions  0\naudit     writable\n\n\
             LISTENER  ADDRESS\nscada     127.0.0.1:5020\n\n\
             DEVICE   ADDRESS         STATUS\npress-1  127.0.0.1:5021  down\n"
        );
    }
}
