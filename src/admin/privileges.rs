//! Running without root: a gateway started as root switches to the
//! configured account once its sockets are bound, so ports below 1024 work
//! without keeping root. A gateway started as root without an account refuses
//! to run unless `allow_root` is set.

use nix::unistd::{self, Gid, Group, Uid, User};

use crate::config::ServiceConfig;

#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error("running as root without [gateway] user; set user = \"sluice\" to switch to that account after binding, or allow_root = true to stay root")]
    RootWithoutUser,
    #[error("gateway.user: user \"{0}\" not found; create it with `useradd --system {0}`")]
    UnknownUser(String),
    #[error("gateway.group: group \"{0}\" not found; create it with `groupadd --system {0}`")]
    UnknownGroup(String),
    #[error("cannot look up account \"{name}\": {source}")]
    Lookup { name: String, source: nix::Error },
    #[error("{step} failed: {source}")]
    Switch {
        step: &'static str,
        source: nix::Error,
    },
    #[error("still able to regain root after switching to uid {uid}; refusing to run")]
    NotDropped { uid: u32 },
}

/// The account change planned for after the sockets are bound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrivilegePlan {
    /// Keep the current account: not root, or root with `allow_root`.
    Stay,
    /// Switch from root to this account.
    Switch { user: String, uid: Uid, gid: Gid },
}

/// Decides, before anything is bound, whether and to which account the
/// gateway switches, so that an unknown account stops the start early.
pub fn plan(service: &ServiceConfig) -> Result<PrivilegePlan, PrivilegeError> {
    if !Uid::effective().is_root() {
        return Ok(PrivilegePlan::Stay);
    }
    let Some(name) = &service.user else {
        return if service.allow_root {
            Ok(PrivilegePlan::Stay)
        } else {
            Err(PrivilegeError::RootWithoutUser)
        };
    };
    let user = User::from_name(name)
        .map_err(|source| PrivilegeError::Lookup {
            name: name.clone(),
            source,
        })?
        .ok_or_else(|| PrivilegeError::UnknownUser(name.clone()))?;
    let gid = match &service.group {
        None => user.gid,
        Some(group) => {
            Group::from_name(group)
                .map_err(|source| PrivilegeError::Lookup {
                    name: group.clone(),
                    source,
                })?
                .ok_or_else(|| PrivilegeError::UnknownGroup(group.clone()))?
                .gid
        }
    };
    Ok(PrivilegePlan::Switch {
        user: name.clone(),
        uid: user.uid,
        gid,
    })
}

impl PrivilegePlan {
    /// Switches to the planned account: supplementary groups, then group,
    /// then user, then no-new-privileges. Checks afterwards that root cannot
    /// be regained. glibc applies each change to every thread of the process.
    pub fn apply(&self) -> Result<(), PrivilegeError> {
        let PrivilegePlan::Switch { user, uid, gid } = self else {
            return Ok(());
        };
        let step = |step: &'static str| move |source| PrivilegeError::Switch { step, source };
        unistd::setgroups(&[*gid]).map_err(step("setgroups"))?;
        unistd::setgid(*gid).map_err(step("setgid"))?;
        unistd::setuid(*uid).map_err(step("setuid"))?;
        nix::sys::prctl::set_no_new_privs().map_err(step("prctl(PR_SET_NO_NEW_PRIVS)"))?;

        let regained = unistd::setuid(Uid::from_raw(0)).is_ok();
        if regained || Uid::current().is_root() || Uid::effective().is_root() {
            return Err(PrivilegeError::NotDropped { uid: uid.as_raw() });
        }
        tracing::info!(user = %user, uid = uid.as_raw(), gid = gid.as_raw(), "switched to unprivileged account");
        Ok(())
    }
}

/// Returns the name of the account `uid`, when the account database has one.
pub fn user_name(uid: u32) -> Option<String> {
    User::from_uid(Uid::from_raw(uid))
        .ok()
        .flatten()
        .map(|user| user.name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_without_user_is_refused_unless_allowed() {
        if !Uid::effective().is_root() {
            assert_eq!(
                plan(&ServiceConfig::default()).unwrap(),
                PrivilegePlan::Stay
            );
            return;
        }
        assert!(matches!(
            plan(&ServiceConfig::default()),
            Err(PrivilegeError::RootWithoutUser)
        ));
        let allowed = ServiceConfig {
            allow_root: true,
            ..ServiceConfig::default()
        };
        assert_eq!(plan(&allowed).unwrap(), PrivilegePlan::Stay);
    }

    #[test]
    fn user_name_of_root_is_root() {
        assert_eq!(user_name(0).as_deref(), Some("root"));
    }
}
