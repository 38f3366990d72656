//! Settings of the gateway process rather than of its traffic: the account it
//! runs as after binding its sockets and the control socket behind
//! `sluice ctl`. They are read from `gateway.toml` alone, so `sluice ctl`
//! still finds the socket while a rule file is being edited.

use std::path::{Path, PathBuf};

use toml::Spanned;

use super::diagnostic::{Diagnostic, Diagnostics, Report};
use super::gateway::{self, Checker};
use super::raw;

/// Maximum socket path length the kernel accepts: `sun_path` has 108 bytes
/// including the terminating NUL (unix(7)).
pub const MAX_SOCKET_PATH: usize = 107;

/// The account and control socket settings of the gateway process.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceConfig {
    /// Account the gateway switches to after binding, when started as root.
    pub user: Option<String>,
    /// Group to switch to; the user's primary group when absent.
    pub group: Option<String>,
    /// Lets the gateway keep running as root when no `user` is set.
    pub allow_root: bool,
    /// The control socket; absent means no socket is opened.
    pub admin: Option<AdminConfig>,
}

/// The `[admin]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    /// Socket path, resolved against the gateway file's folder.
    pub socket: PathBuf,
    /// Group that owns the socket; members may use `sluice ctl`.
    pub group: Option<String>,
}

/// Loads the service settings from `gateway_file` alone, checking the whole
/// gateway file but none of the rule files.
pub fn load_service(gateway_file: &Path) -> Result<(ServiceConfig, Vec<Diagnostic>), Diagnostics> {
    let mut report = Report::default();
    let Some(gateway) = gateway::load(gateway_file, &mut report) else {
        return Err(report.into_diagnostics());
    };
    report.finish(gateway.service)
}

impl Checker<'_> {
    pub(super) fn service(
        &mut self,
        section: &raw::GatewaySection,
        admin: Option<&raw::AdminSection>,
        base: &Path,
    ) -> ServiceConfig {
        let user = self.account_name("gateway.user", section.user.as_ref());
        let group = self.account_name("gateway.group", section.group.as_ref());
        if let (Some(group), None) = (&section.group, &section.user) {
            self.error(
                group,
                "gateway.group: set without gateway.user; name the user to run as, as user = \"sluice\"",
            );
        }
        ServiceConfig {
            user,
            group,
            allow_root: section.allow_root.as_ref().is_some_and(|v| *v.get_ref()),
            admin: admin.and_then(|admin| self.admin(admin, base)),
        }
    }

    fn admin(&mut self, section: &raw::AdminSection, base: &Path) -> Option<AdminConfig> {
        let group = self.account_name("admin.group", section.group.as_ref());
        let written = section.socket.get_ref();
        if written.trim().is_empty() {
            self.error(
                &section.socket,
                "admin.socket: empty path; name the socket file, as \"/run/sluice/control.sock\"",
            );
            return None;
        }
        let socket = base.join(written);
        let length = socket.as_os_str().len();
        if length > MAX_SOCKET_PATH {
            self.error(
                &section.socket,
                format!(
                    "admin.socket: path {} is {length} bytes, longer than the maximum {MAX_SOCKET_PATH} for a Unix socket; use a shorter path",
                    socket.display()
                ),
            );
            return None;
        }
        Some(AdminConfig { socket, group })
    }

    /// Checks a user or group name: non-empty, without whitespace, `:` or a
    /// leading `-`, which no account database accepts.
    fn account_name(&mut self, key: &str, value: Option<&Spanned<String>>) -> Option<String> {
        let value = value?;
        let name = value.get_ref();
        let valid = !name.is_empty()
            && !name.starts_with('-')
            && !name
                .chars()
                .any(|c| c.is_whitespace() || c == ':' || c == '/');
        if valid {
            Some(name.clone())
        } else {
            self.error(
                value,
                format!("{key}: invalid account name \"{name}\"; use a name such as \"sluice\""),
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_text(text: &str) -> Result<ServiceConfig, Vec<String>> {
        let folder = tempfile::tempdir().unwrap();
        let path = folder.path().join("gateway.toml");
        std::fs::write(&path, text).unwrap();
        load_service(&path)
            .map(|(service, _)| service)
            .map_err(|d| {
                d.errors
                    .iter()
                    .map(|e| format!("{}:{}: {}", e.line, e.column, e.message))
                    .collect()
            })
    }

    #[test]
    fn service_defaults_to_no_user_and_no_socket() {
        let service = load_text("[gateway]\nname = \"gw\"\n").unwrap();
        assert_eq!(service, ServiceConfig::default());
    }

    #[test]
    fn admin_socket_resolves_against_gateway_folder() {
        let folder = tempfile::tempdir().unwrap();
        let path = folder.path().join("gateway.toml");
        std::fs::write(
            &path,
            "[gateway]\nname = \"gw\"\nuser = \"sluice\"\nallow_root = true\n\n[admin]\nsocket = \"run/control.sock\"\ngroup = \"operators\"\n",
        )
        .unwrap();
        let (service, _) = load_service(&path).unwrap();
        assert_eq!(service.user.as_deref(), Some("sluice"));
        assert_eq!(service.group, None);
        assert!(service.allow_root);
        assert_eq!(
            service.admin,
            Some(AdminConfig {
                socket: folder.path().join("run/control.sock"),
                group: Some("operators".into()),
            })
        );
    }

    #[test]
    fn absolute_admin_socket_is_kept() {
        let service =
            load_text("[gateway]\nname = \"gw\"\n[admin]\nsocket = \"/run/sluice/control.sock\"\n")
                .unwrap();
        assert_eq!(
            service.admin.unwrap().socket,
            PathBuf::from("/run/sluice/control.sock")
        );
    }

    #[test]
    fn group_without_user_is_rejected() {
        let errors = load_text("[gateway]\nname = \"gw\"\ngroup = \"sluice\"\n").unwrap_err();
        assert_eq!(
            errors,
            vec!["3:9: gateway.group: set without gateway.user; name the user to run as, as user = \"sluice\""]
        );
    }

    #[test]
    fn invalid_account_name_is_rejected() {
        let errors = load_text("[gateway]\nname = \"gw\"\nuser = \"-x\"\n").unwrap_err();
        assert_eq!(
            errors,
            vec!["3:8: gateway.user: invalid account name \"-x\"; use a name such as \"sluice\""]
        );
    }

    #[test]
    fn overlong_socket_path_is_rejected() {
        let long = "x".repeat(120);
        let errors = load_text(&format!(
            "[gateway]\nname = \"gw\"\n[admin]\nsocket = \"/{long}\"\n"
        ))
        .unwrap_err();
        assert_eq!(
            errors,
            vec![format!("4:10: admin.socket: path /{long} is 121 bytes, longer than the maximum 107 for a Unix socket; use a shorter path")]
        );
    }

    #[test]
    fn admin_section_requires_socket() {
        let errors = load_text("[gateway]\nname = \"gw\"\n[admin]\ngroup = \"ops\"\n").unwrap_err();
        assert_eq!(errors.len(), 1);
        assert!(errors[0].contains("missing field `socket`"), "{errors:?}");
    }
}
