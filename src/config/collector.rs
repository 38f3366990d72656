//! Validation of the `[[collector]]` sections of `gateway.toml`: transport,
//! target, event selection, spool bounds and TLS files. Whether the TLS files
//! can be read is checked when the collector starts.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::Spanned;

use super::gateway::Checker;
use super::raw;
use super::{CollectorConfig, CollectorEvents, CollectorTarget, CollectorTls, OnFull};

/// Default bound of one collector's spool: 256 MiB.
const DEFAULT_SPOOL_MAX_BYTES: i64 = 256 * 1024 * 1024;
/// Smallest spool accepted, so that a batch of ordinary events fits.
const MIN_SPOOL_MAX_BYTES: i64 = 64 * 1024;
/// Largest spool accepted: 1 TiB.
const MAX_SPOOL_MAX_BYTES: i64 = 1 << 40;
const DEFAULT_BATCH_MAX: i64 = 500;
const MAX_BATCH_MAX: i64 = 100_000;
const DEFAULT_TIMEOUT_MS: i64 = 10_000;
/// Largest delivery timeout accepted: ten minutes, in milliseconds.
const MAX_TIMEOUT_MS: i64 = 600_000;
/// The port of an `https` URL that names none.
const HTTPS_PORT: u16 = 443;

impl Checker<'_> {
    pub(super) fn collectors(
        &mut self,
        sections: &[raw::CollectorSection],
        base: &Path,
    ) -> Vec<CollectorConfig> {
        let mut names = HashMap::new();
        let mut spools: HashMap<PathBuf, String> = HashMap::new();
        let mut collectors = Vec::new();
        for (index, section) in sections.iter().enumerate() {
            let key = format!("collector[{}]", index + 1);
            self.unique_name(
                &format!("{key}.name"),
                "collector",
                &section.name,
                &mut names,
            );
            let name = section.name.get_ref();
            let spool = match &section.spool {
                Some(spool) => base.join(spool.get_ref()),
                None => base.join("spool").join(name),
            };
            if let Some(other) = spools.get(&spool) {
                let message = format!(
                    "{key}.spool: folder {} is already the spool of collector \"{other}\"; give each collector its own spool",
                    spool.display()
                );
                match &section.spool {
                    Some(value) => self.error(value, message),
                    None => self.error(&section.name, message),
                }
            } else {
                spools.insert(spool.clone(), name.clone());
            }
            if let Some(collector) = self.collector(&key, section, spool, base) {
                collectors.push(collector);
            }
        }
        collectors
    }

    fn collector(
        &mut self,
        key: &str,
        section: &raw::CollectorSection,
        spool: PathBuf,
        base: &Path,
    ) -> Option<CollectorConfig> {
        let target = self.collector_target(key, section);
        let events = self.choice(
            &format!("{key}.events"),
            section.events.as_ref(),
            &[
                ("anomalies", CollectorEvents::Anomalies),
                ("all", CollectorEvents::All),
            ],
            CollectorEvents::Anomalies,
        );
        let on_full = self.choice(
            &format!("{key}.on_full"),
            section.on_full.as_ref(),
            &[
                ("drop_oldest", OnFull::DropOldest),
                ("keep_in_audit", OnFull::KeepInAudit),
            ],
            OnFull::KeepInAudit,
        );
        let spool_max_bytes = self.integer(
            &format!("{key}.spool_max_bytes"),
            section.spool_max_bytes.as_ref(),
            DEFAULT_SPOOL_MAX_BYTES,
            (MIN_SPOOL_MAX_BYTES, MAX_SPOOL_MAX_BYTES),
        );
        let batch_max = self.integer(
            &format!("{key}.batch_max"),
            section.batch_max.as_ref(),
            DEFAULT_BATCH_MAX,
            (1, MAX_BATCH_MAX),
        );
        let timeout_ms = self.integer(
            &format!("{key}.timeout_ms"),
            section.timeout_ms.as_ref(),
            DEFAULT_TIMEOUT_MS,
            (1, MAX_TIMEOUT_MS),
        );
        let tls = self.collector_tls(key, section, base);

        Some(CollectorConfig {
            name: section.name.get_ref().clone(),
            target: target?,
            events: events?,
            spool,
            spool_max_bytes: spool_max_bytes? as u64,
            on_full: on_full?,
            tls: tls?,
            batch_max: batch_max? as usize,
            timeout: Duration::from_millis(timeout_ms? as u64),
            origin: self.at(&section.name),
        })
    }

    fn collector_target(
        &mut self,
        key: &str,
        section: &raw::CollectorSection,
    ) -> Option<CollectorTarget> {
        let Some(transport) = &section.transport else {
            self.error(
                &section.name,
                format!("{key}.transport: missing; set transport = \"https\" or \"syslog-tls\""),
            );
            return None;
        };
        match transport.get_ref().as_str() {
            "https" => {
                self.reject_key(key, "address", section.address.as_ref(), "https", "url");
                let Some(url) = &section.url else {
                    self.error(
                        &section.name,
                        format!("{key}.url: missing; an https collector needs url = \"https://HOST:PORT/PATH\""),
                    );
                    return None;
                };
                self.https_url(key, url)
            }
            "syslog-tls" => {
                self.reject_key(key, "url", section.url.as_ref(), "syslog-tls", "address");
                let Some(address) = &section.address else {
                    self.error(
                        &section.name,
                        format!("{key}.address: missing; a syslog-tls collector needs address = \"HOST:PORT\", as \"siem.example:6514\""),
                    );
                    return None;
                };
                self.syslog_address(key, address)
            }
            other => {
                self.error(
                    transport,
                    format!(
                        "{key}.transport: invalid value \"{other}\"; use one of \"https\", \"syslog-tls\""
                    ),
                );
                None
            }
        }
    }

    fn reject_key(
        &mut self,
        key: &str,
        field: &str,
        value: Option<&Spanned<String>>,
        transport: &str,
        instead: &str,
    ) {
        if let Some(value) = value {
            self.error(
                value,
                format!(
                    "{key}.{field}: not used by a {transport} collector; set {instead} instead"
                ),
            );
        }
    }

    fn https_url(&mut self, key: &str, url: &Spanned<String>) -> Option<CollectorTarget> {
        match parse_https_url(url.get_ref()) {
            Ok((host, port, path)) => Some(CollectorTarget::Https {
                url: url.get_ref().clone(),
                host,
                port,
                path,
            }),
            Err(problem) => {
                self.error(
                    url,
                    format!(
                        "{key}.url: {problem} in \"{}\"; write it as \"https://HOST:PORT/PATH\"",
                        url.get_ref()
                    ),
                );
                None
            }
        }
    }

    fn syslog_address(&mut self, key: &str, address: &Spanned<String>) -> Option<CollectorTarget> {
        match split_host_port(address.get_ref()) {
            Some((host, port)) => Some(CollectorTarget::SyslogTls { host, port }),
            None => {
                self.error(
                    address,
                    format!(
                        "{key}.address: invalid address \"{}\"; write HOST:PORT, as \"siem.example:6514\"",
                        address.get_ref()
                    ),
                );
                None
            }
        }
    }

    fn collector_tls(
        &mut self,
        key: &str,
        section: &raw::CollectorSection,
        base: &Path,
    ) -> Option<CollectorTls> {
        let Some(tls) = &section.tls else {
            return Some(CollectorTls::default());
        };
        let files = tls.get_ref();
        let resolve =
            |value: &Option<Spanned<String>>| value.as_ref().map(|v| base.join(v.get_ref()));
        let config = CollectorTls {
            ca: resolve(&files.ca),
            cert: resolve(&files.cert),
            key: resolve(&files.key),
        };
        if config.cert.is_some() != config.key.is_some() {
            self.error(
                tls,
                format!("{key}.tls: cert and key go together; set both for a client certificate, or neither"),
            );
            return None;
        }
        Some(config)
    }
}

/// Splits `https://HOST[:PORT][/PATH]` into host, port and path.
fn parse_https_url(url: &str) -> Result<(String, u16, String), &'static str> {
    let rest = url
        .strip_prefix("https://")
        .ok_or("the scheme is not https")?;
    let (authority, path) = match rest.find('/') {
        Some(slash) => (&rest[..slash], &rest[slash..]),
        None => (rest, "/"),
    };
    if authority.contains('@') {
        return Err("user information is not supported");
    }
    let (host, port) = if authority.ends_with(']') || !authority.contains(':') {
        let host = authority.trim_start_matches('[').trim_end_matches(']');
        (host.to_owned(), HTTPS_PORT)
    } else {
        split_host_port(authority).ok_or("invalid host or port")?
    };
    if host.is_empty() {
        return Err("missing host");
    }
    if path.contains(char::is_whitespace) {
        return Err("white space in the path");
    }
    Ok((host, port, path.to_owned()))
}

/// Splits `HOST:PORT` or `[IPv6]:PORT`; the host comes back without brackets.
fn split_host_port(text: &str) -> Option<(String, u16)> {
    let (host, port) = text.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() || host.contains(|c: char| c.is_whitespace() || c == '/') {
        return None;
    }
    Some((host.to_owned(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn https_url_defaults_port_and_path() {
        assert_eq!(
            parse_https_url("https://collector.example"),
            Ok(("collector.example".to_owned(), 443, "/".to_owned()))
        );
        assert_eq!(
            parse_https_url("https://[::1]:8443/events"),
            Ok(("::1".to_owned(), 8443, "/events".to_owned()))
        );
        assert_eq!(
            parse_https_url("http://collector.example/events"),
            Err("the scheme is not https")
        );
        assert_eq!(parse_https_url("https:///events"), Err("missing host"));
        assert_eq!(parse_https_url("https://:80/"), Err("invalid host or port"));
    }

    #[test]
    fn syslog_address_needs_a_port() {
        assert_eq!(
            split_host_port("siem.example:6514"),
            Some(("siem.example".to_owned(), 6514))
        );
        assert_eq!(
            split_host_port("[::1]:6514"),
            Some(("::1".to_owned(), 6514))
        );
        assert_eq!(split_host_port("siem.example"), None);
        assert_eq!(split_host_port("siem.example:99999"), None);
    }
}
