//! The control socket protocol: one JSON request per line, and one JSON
//! response line for each. `sluice ctl` and the server share these types.

use serde::{Deserialize, Serialize};

/// Maximum length of a request line, in bytes.
pub const MAX_REQUEST_BYTES: usize = 4096;

/// One request, tagged by `command`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Request {
    Status,
    Sessions,
    Kill {
        session: u64,
    },
    Quarantine {
        vendor: String,
        /// Length of the quarantine in seconds; absent lasts until released.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        duration_s: Option<u64>,
    },
    Release {
        vendor: String,
    },
    Reload,
    State,
}

/// One response: `ok` with a `result`, or not `ok` with an `error`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Response {
    pub fn success(result: impl Serialize) -> Response {
        match serde_json::to_value(result) {
            Ok(value) => Response {
                ok: true,
                result: Some(value),
                error: None,
            },
            Err(error) => Response::failure(format!("cannot encode the result: {error}")),
        }
    }

    pub fn failure(message: impl Into<String>) -> Response {
        Response {
            ok: false,
            result: None,
            error: Some(message.into()),
        }
    }
}

/// The result of `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    pub gateway: String,
    pub version: String,
    /// Start time, RFC 3339 in UTC.
    pub started: String,
    pub uptime_s: u64,
    pub listeners: Vec<ListenerStatus>,
    pub devices: Vec<DeviceStatus>,
    pub sessions: usize,
    pub audit_writable: bool,
    pub quarantined: Vec<QuarantineStatus>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenerStatus {
    pub name: String,
    pub address: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceStatus {
    pub name: String,
    pub address: String,
    pub up: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuarantineStatus {
    pub vendor: String,
    pub since: String,
    /// End of the quarantine; absent lasts until released.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<String>,
}

/// One open session, as listed by `sessions`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionStatus {
    pub id: u64,
    pub listener: String,
    pub vendor: String,
    /// Client address and port.
    pub source: String,
    pub started: String,
    pub requests: u64,
}

/// One operational state, as listed by `state`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateStatus {
    pub name: String,
    pub device: String,
    /// The value name, absent while the state is unknown or stale.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// The latest raw reading, even when stale.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw: Option<u16>,
    /// Age of the latest reading in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub age_ms: Option<u64>,
}

/// The result of `kill`, `quarantine`, `release` and `reload`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActionReport {
    pub action: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vendor: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<String>,
    /// Sessions closed by this action.
    #[serde(default)]
    pub closed_sessions: Vec<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_use_command_tag() {
        let cases = [
            (Request::Status, r#"{"command":"status"}"#),
            (
                Request::Kill { session: 7 },
                r#"{"command":"kill","session":7}"#,
            ),
            (
                Request::Quarantine {
                    vendor: "acme".into(),
                    duration_s: None,
                },
                r#"{"command":"quarantine","vendor":"acme"}"#,
            ),
            (
                Request::Quarantine {
                    vendor: "acme".into(),
                    duration_s: Some(60),
                },
                r#"{"command":"quarantine","vendor":"acme","duration_s":60}"#,
            ),
            (
                Request::Release {
                    vendor: "acme".into(),
                },
                r#"{"command":"release","vendor":"acme"}"#,
            ),
        ];
        for (request, json) in cases {
            assert_eq!(serde_json::to_string(&request).unwrap(), json);
            assert_eq!(serde_json::from_str::<Request>(json).unwrap(), request);
        }
    }

    #[test]
    fn unknown_command_is_rejected() {
        let error = serde_json::from_str::<Request>(r#"{"command":"format"}"#).unwrap_err();
        assert!(
            error.to_string().starts_with("unknown variant `format`"),
            "{error}"
        );
    }

    #[test]
    fn failure_response_has_only_ok_and_error() {
        let json = serde_json::to_string(&Response::failure("no open session 9")).unwrap();
        assert_eq!(json, r#"{"ok":false,"error":"no open session 9"}"#);
    }
}
