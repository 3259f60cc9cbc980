//! `naiad run SRC [-- CMD ARGS...]`: mounts the image lazily (a supervised
//! daemon, as `naiad mount` starts it), puts a writable overlay over it in a
//! temporary directory under /tmp and runs the command there in a container
//! made by an OCI runtime, crun or runc (see `naiad_runtime`). Returns the
//! command's exit code (128+N if killed by signal N) and always unmounts and
//! removes what it created, also when the command or the setup fails or a
//! stop signal arrives during the setup.
//!
//! The daemon options of `naiad mount` apply: the image's startup set is
//! prefetched while the command starts, and `--record-trace FILE` records
//! what the run reads (the command, plus the image's /etc/passwd and
//! /etc/group that `naiad run` itself reads to resolve the user) for
//! `naiad convert --prefetch-list`; the trace is complete once `naiad run`
//! has returned.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use naiad_fuse::{daemon, mountinfo, MountConfig, ProgramLoad, FSTYPE};
use naiad_registry::{open_source_with, ImageRef};
use naiad_runtime::{CommandOverrides, ProcessSpec, RunSpec};
use serde_json::Value;

use super::mount::DaemonOptions;
use naiad_fuse::launcher::{self, wait_for_exit};

#[derive(Args)]
pub struct RunArgs {
    /// The image: oci:DIR[:TAG]
    pub source: String,
    /// The command and its arguments (default: the image's Entrypoint and Cmd;
    /// given, it replaces Cmd and follows the Entrypoint, as `docker run` does).
    #[arg(last = true)]
    pub command: Vec<String>,
    /// Replace the image's Entrypoint ("" clears it).
    #[arg(long, value_name = "CMD")]
    pub entrypoint: Option<String>,
    /// Set an environment variable (KEY=VALUE), after the image's Env.
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Working directory inside the container (default: the image's WorkingDir or /).
    #[arg(long, short = 'w', value_name = "DIR")]
    pub workdir: Option<String>,
    /// User to run as: name, uid, name:group or uid:gid (default: the image's User or root).
    #[arg(long, short = 'u', value_name = "USER")]
    pub user: Option<String>,
    /// Keep the overlay's upper directory (the command's changes) and print its path.
    #[arg(long)]
    pub keep: bool,
    #[command(flatten)]
    pub daemon: DaemonOptions,
}

/// The temporary directory of one run and the mount in it; dropping it
/// unmounts the image, waits for its daemon and removes the directory.
struct RunDir {
    dir: PathBuf,
    lower: PathBuf,
    daemon_pid: Option<i32>,
    keep_upper: bool,
    /// The image daemon's log: removed at the end unless it has problems.
    log_file: Option<PathBuf>,
}

impl RunDir {
    fn create() -> Result<Self> {
        let dir = std::env::temp_dir().join(format!(
            "naiad-run-{}-{:x}",
            std::process::id(),
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0)
        ));
        for sub in ["", "lower", "upper", "work", "merged"] {
            let p = dir.join(sub);
            std::fs::create_dir(&p).with_context(|| format!("creating {}", p.display()))?;
        }
        // Only root may reach the image mount and the container's files.
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700)).with_context(|| format!("setting the mode of {}", dir.display()))?;
        let lower = dir.join("lower");
        Ok(RunDir { dir, lower, daemon_pid: None, keep_upper: false, log_file: None })
    }

    fn path(&self, sub: &str) -> PathBuf {
        self.dir.join(sub)
    }
}

fn is_naiad_mount(p: &Path) -> bool {
    mountinfo::find(p).ok().flatten().is_some_and(|m| m.fstype == FSTYPE)
}

impl Drop for RunDir {
    fn drop(&mut self) {
        // The overlay lived in the container's mount namespace and is gone
        // with it; the kernel may need a moment to release the lower mount.
        if is_naiad_mount(&self.lower) {
            let mut unmounted = false;
            for _ in 0..100 {
                match daemon::unmount(&self.lower, false) {
                    Ok(()) => {
                        unmounted = true;
                        break;
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
            if !unmounted {
                if let Err(e) = daemon::unmount(&self.lower, true) {
                    eprintln!("naiad run: warning: {e}");
                }
            }
        }
        if let Some(pid) = self.daemon_pid {
            if !wait_for_exit(pid, Duration::from_secs(10)) {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            }
        }
        if let Some(log) = &self.log_file {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            if text.lines().any(|l| l.contains(" WARN ") || l.contains(" ERROR ")) {
                eprintln!("naiad run: the image daemon reported problems; see {}", log.display());
            } else {
                let _ = std::fs::remove_file(log);
            }
        }
        if is_naiad_mount(&self.lower) {
            eprintln!("naiad run: warning: {} is still mounted; not removing {}", self.lower.display(), self.dir.display());
            return;
        }
        let result = if self.keep_upper { ["lower", "work", "merged"].iter().try_for_each(|s| std::fs::remove_dir_all(self.path(s))) } else { std::fs::remove_dir_all(&self.dir) };
        if let Err(e) = result {
            eprintln!("naiad run: warning: cannot remove {}: {e}", self.dir.display());
        }
    }
}

pub fn run(a: RunArgs) -> Result<i32> {
    // From here on a stop signal is noted, and the setup stops at the next
    // step, cleaning up what it made (RunDir's drop); once the command
    // runs, it is forwarded to it.
    let _signals = naiad_runtime::StopSignals::catch();
    let stopped = |step: &str| -> Option<i32> {
        naiad_runtime::stop_signal().map(|sig| {
            eprintln!("naiad run: signal {sig} {step}; cleaning up");
            128 + sig
        })
    };
    let reference = ImageRef::parse(&a.source).with_context(|| format!("image {}", a.source))?;
    let registry = a.daemon.registry.options()?;
    daemon::check_fuse_device()?;

    let mut rd = RunDir::create()?;
    rd.keep_upper = a.keep;
    // The daemon loads the program ahead (in a lazy image): the first word
    // of the command line these overrides make of the image's.
    let overrides = CommandOverrides { entrypoint: a.entrypoint.clone(), command: a.command.clone() };
    let program = ProgramLoad::Command(overrides.clone());
    let config = a.daemon.daemon_config(&a.source, &rd.lower, MountConfig { program, ..MountConfig::default() }, None)?;
    rd.log_file = Some(config.log_file.clone());
    if let Some(code) = stopped("before the mount") {
        return Ok(code);
    }
    let exe = std::env::current_exe().context("finding the naiad executable")?;
    // The image's config (command, user, environment) is read while the
    // daemon mounts the image: both fetch the manifest and the config, and
    // over a slow link doing it side by side saves their round trips.
    let (opened, launched) = std::thread::scope(|s| {
        let opening = s.spawn(|| open_source_with(&reference, &registry));
        let launched = launcher::launch(&config, &exe, Duration::from_secs(120), &|| naiad_runtime::stop_signal().is_some());
        (opening.join(), launched)
    });
    if let Ok(spawned) = &launched {
        rd.daemon_pid = Some(spawned.pid);
    }
    let image = match opened {
        Ok(result) => result.with_context(|| format!("opening image {}", a.source))?,
        Err(_) => bail!("opening image {}: the reading thread panicked", a.source),
    };
    if let Err(e) = launched {
        return stopped("while mounting").map(Ok).unwrap_or(Err(e.into()));
    }
    let cfg = image.config.get("config");
    let argv = overrides.command_line(cfg);
    if argv.is_empty() {
        bail!("image {} has no Entrypoint or Cmd; give a command after --", a.source);
    }

    let user_spec = a.user.clone().or_else(|| cfg.and_then(|c| c.get("User")).and_then(Value::as_str).map(String::from)).unwrap_or_default();
    let user = naiad_runtime::resolve_user(&rd.lower, &user_spec).with_context(|| format!("user {user_spec:?} of image {}", a.source))?;
    if let Some(code) = stopped("before the command started") {
        return Ok(code);
    }
    let mut base_env = naiad_runtime::image_env(cfg);
    if !base_env.iter().chain(&a.env).any(|e| e.starts_with("HOME=")) {
        base_env.push(format!("HOME={}", user.home.clone().unwrap_or_else(|| "/".into())));
    }
    for e in &a.env {
        if !e.contains('=') || e.starts_with('=') {
            bail!("--env {e:?}: expected KEY=VALUE");
        }
    }
    let cwd = a.workdir.clone().or_else(|| cfg.and_then(|c| c.get("WorkingDir")).and_then(Value::as_str).map(String::from)).filter(|w| !w.is_empty()).unwrap_or_else(|| "/".into());
    if !cwd.starts_with('/') {
        bail!("working directory {cwd:?} is not absolute");
    }
    let spec = RunSpec {
        bundle: rd.dir.clone(),
        lower: rd.lower.clone(),
        upper: rd.path("upper"),
        work: rd.path("work"),
        merged: rd.path("merged"),
        process: ProcessSpec { rootfs: rd.path("merged"), argv, env: naiad_runtime::merge_env(&base_env, &a.env), cwd, uid: user.uid, gid: user.gid, groups: user.groups },
    };
    let code = naiad_runtime::run(&spec).with_context(|| format!("running {} in {}", spec.process.argv[0], a.source))?;
    if a.keep {
        eprintln!("naiad run: the command's changes are in {}", rd.path("upper").display());
    }
    drop(rd);
    Ok(code)
}
