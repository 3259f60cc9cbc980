//! The OCI runtime configuration (`config.json`) of one `naiad run`.
//!
//! It starts from the runtime spec's defaults as `oci-spec` gives them
//! (the mounts of `/proc`, `/dev`, `/dev/pts`, `/dev/shm`, `/dev/mqueue`
//! and a read-only `/sys`; the masked and read-only `/proc` paths that
//! `runc spec` writes) and adds what a user expects of a container:
//!
//! - the image's command, environment, working directory and user (ids
//!   resolved inside the image, see [`crate::user`]);
//! - Docker's default capability set, effective only for uid 0;
//! - `noNewPrivileges`; resource limits as `naiad run` has them;
//! - the default seccomp profile ([`crate::seccomp`]);
//! - new PID, IPC, UTS and mount namespaces. The network is the host's, as
//!   with `docker run --network host`: naiad has no network of its own to
//!   give a container. There is no cgroup mount or namespace (this
//!   machine's hybrid cgroup layout is not the runtime's to manage).

use std::path::PathBuf;

use serde_json::{json, Value};

use crate::error::RuntimeError;

/// Docker's default capabilities.
pub const DEFAULT_CAPABILITIES: [&str; 14] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// What to run, as the OCI configuration needs it.
#[derive(Debug, Clone)]
pub struct ProcessSpec {
    /// The container's root directory (the overlay over the image).
    pub rootfs: PathBuf,
    /// The command and its arguments.
    pub argv: Vec<String>,
    /// `KEY=VALUE` environment.
    pub env: Vec<String>,
    /// Absolute working directory inside the container.
    pub cwd: String,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
}

/// The `config.json` for `spec`.
pub fn config(spec: &ProcessSpec) -> Result<Value, RuntimeError> {
    let mut c = serde_json::to_value(oci_spec::runtime::Spec::default()).map_err(|e| RuntimeError::Runtime(format!("the default OCI spec: {e}")))?;
    let caps: Vec<&str> = DEFAULT_CAPABILITIES.to_vec();
    let effective: Vec<&str> = if spec.uid == 0 { caps.clone() } else { Vec::new() };
    c["process"] = json!({
        "terminal": false,
        "user": { "uid": spec.uid, "gid": spec.gid, "additionalGids": spec.groups },
        "args": spec.argv,
        "env": spec.env,
        "cwd": spec.cwd,
        "capabilities": { "bounding": caps, "effective": effective, "permitted": effective, "inheritable": [], "ambient": [] },
        "noNewPrivileges": true,
    });
    c["root"] = json!({ "path": spec.rootfs, "readonly": false });
    c["hostname"] = json!("naiad");
    if let Some(mounts) = c["mounts"].as_array_mut() {
        mounts.retain(|m| m["destination"] != "/sys/fs/cgroup");
    }
    let linux = &mut c["linux"];
    linux["namespaces"] = json!([{ "type": "pid" }, { "type": "ipc" }, { "type": "uts" }, { "type": "mount" }]);
    linux["seccomp"] = crate::seccomp::default_profile();
    if let Some(o) = linux.as_object_mut() {
        o.remove("resources");
        o.remove("cgroupsPath");
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(uid: u32) -> ProcessSpec {
        ProcessSpec { rootfs: "/r".into(), argv: vec!["sh".into()], env: vec!["A=1".into()], cwd: "/".into(), uid, gid: 5, groups: vec![5, 7] }
    }

    #[test]
    fn isolation_a_user_expects() {
        let c = config(&spec(0)).unwrap();
        assert_eq!(c["process"]["noNewPrivileges"], true);
        assert_eq!(c["process"]["capabilities"]["effective"].as_array().unwrap().len(), 14);
        assert!(c["process"]["capabilities"]["bounding"].as_array().unwrap().iter().all(|x| x != "CAP_SYS_ADMIN"));
        assert!(c["linux"]["maskedPaths"].as_array().unwrap().iter().any(|p| p == "/proc/kcore"));
        assert!(c["linux"]["readonlyPaths"].as_array().unwrap().iter().any(|p| p == "/proc/sys"));
        assert_eq!(c["linux"]["seccomp"]["defaultAction"], "SCMP_ACT_ALLOW");
        let types: Vec<&str> = c["linux"]["namespaces"].as_array().unwrap().iter().filter_map(|n| n["type"].as_str()).collect();
        assert_eq!(types, ["pid", "ipc", "uts", "mount"]);
        assert_eq!(c["process"]["user"]["additionalGids"], json!([5, 7]));
        assert!(c["mounts"].as_array().unwrap().iter().any(|m| m["destination"] == "/proc"));
        // A non-root user gets no effective capabilities.
        let c = config(&spec(1000)).unwrap();
        assert!(c["process"]["capabilities"]["effective"].as_array().unwrap().is_empty());
    }
}
