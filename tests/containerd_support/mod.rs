//! A private containerd node for tests: Debian's containerd (own root,
//! state and socket under a temporary directory), with naiad's snapshotter
//! as its proxy plugin `naiad` and the CRI plugin set to use it
//! (`disable_snapshot_annotations = false`), plus a CRI client that speaks
//! to it as a kubelet would (k8s-cri over the unix socket).

#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::common;

pub const NAMESPACE: &str = "k8s.io";

pub struct Node {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub snapshotter_socket: PathBuf,
    pub snapshotter_config: PathBuf,
    pub snapshotter_root: PathBuf,
    /// DOCKER_CONFIG of the snapshotter (its config.json holds credentials).
    pub docker_config: PathBuf,
    containerd: Option<Child>,
    snapshotter: Option<Child>,
}

fn wait_for_socket(path: &Path, what: &str, log: &Path, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while std::os::unix::net::UnixStream::connect(path).is_err() {
        if Instant::now() > deadline {
            panic!("{what} did not listen on {} within {timeout:?}; log:\n{}", path.display(), fs::read_to_string(log).unwrap_or_default());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Node {
    /// Starts the snapshotter and containerd. `registries`: `HOST:PORT`s
    /// reached over plain HTTP by both.
    pub fn start(registries: &[&str]) -> Node {
        Self::start_with_mirrors(registries, &[])
    }

    /// [`Node::start`], with containerd (only) reaching registry `NAME` at
    /// `ENDPOINT` for each `(NAME, ENDPOINT)` of `mirrors`.
    pub fn start_with_mirrors(registries: &[&str], mirrors_of: &[(&str, &str)]) -> Node {
        let dir = tempfile::Builder::new().prefix("naiad-containerd-").tempdir_in("/tmp").expect("tempdir");
        let d = dir.path();
        let socket = d.join("containerd.sock");
        let snapshotter_socket = d.join("snapshotter.sock");
        let snapshotter_root = d.join("snapshotter");
        let docker_config = d.join("docker");
        fs::create_dir_all(&docker_config).unwrap();
        fs::create_dir_all(d.join("cni/conf")).unwrap();
        let insecure: Vec<String> = registries.iter().map(|r| format!("\"{r}\"")).collect();
        let snapshotter_config = d.join("snapshotter.toml");
        fs::write(
            &snapshotter_config,
            format!(
                "address = \"{}\"\nroot = \"{}\"\nlog_level = \"info,naiad_containerd=debug\"\n[registry]\ninsecure_registries = [{}]\nretries = 1\n[cache]\ndir = \"{}\"\nsize = \"1G\"\n",
                snapshotter_socket.display(),
                snapshotter_root.display(),
                insecure.join(", "),
                d.join("cache").display()
            ),
        )
        .unwrap();
        let mut mirrors = String::new();
        for r in registries {
            mirrors.push_str(&format!("[plugins.\"io.containerd.grpc.v1.cri\".registry.mirrors.\"{r}\"]\n  endpoint = [\"http://{r}\"]\n"));
        }
        for (name, endpoint) in mirrors_of {
            mirrors.push_str(&format!("[plugins.\"io.containerd.grpc.v1.cri\".registry.mirrors.\"{name}\"]\n  endpoint = [\"{endpoint}\"]\n"));
        }
        let config = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
[grpc]
  address = "{socket}"
[ttrpc]
  address = "{socket}.ttrpc"
[proxy_plugins.naiad]
  type = "snapshot"
  address = "{snap}"
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
[plugins."io.containerd.grpc.v1.cri"]
  disable_tcp_service = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  sandbox_image = "127.0.0.1:1/none:pause"
[plugins."io.containerd.grpc.v1.cri".containerd]
  snapshotter = "naiad"
  disable_snapshot_annotations = false
[plugins."io.containerd.grpc.v1.cri".cni]
  bin_dir = "{d}/cni/bin"
  conf_dir = "{d}/cni/conf"
{mirrors}"#,
            root = d.join("root").display(),
            state = d.join("state").display(),
            socket = socket.display(),
            snap = snapshotter_socket.display(),
            d = d.display(),
        );
        fs::write(d.join("containerd.toml"), config).unwrap();
        let mut node = Node { dir, socket, snapshotter_socket, snapshotter_config, snapshotter_root, docker_config, containerd: None, snapshotter: None };
        node.start_snapshotter();
        let log = node.dir.path().join("containerd.log");
        let out = fs::File::create(&log).unwrap();
        let child = Command::new("containerd")
            .arg("--config")
            .arg(node.dir.path().join("containerd.toml"))
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("start containerd (Debian package containerd; scripts/install-test-deps.sh)");
        node.containerd = Some(child);
        wait_for_socket(&node.socket, "containerd", &log, Duration::from_secs(30));
        node
    }

    pub fn snapshotter_log(&self) -> String {
        fs::read_to_string(self.dir.path().join("snapshotter.log")).unwrap_or_default()
    }

    pub fn containerd_log(&self) -> String {
        fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    /// Starts `naiad snapshotter` (again).
    pub fn start_snapshotter(&mut self) {
        let log = self.dir.path().join("snapshotter.log");
        let out = fs::OpenOptions::new().create(true).append(true).open(&log).unwrap();
        let child = common::naiad()
            .arg("snapshotter")
            .arg("--config")
            .arg(&self.snapshotter_config)
            .env("DOCKER_CONFIG", &self.docker_config)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("start naiad snapshotter");
        self.snapshotter = Some(child);
        wait_for_socket(&self.snapshotter_socket, "naiad snapshotter", &log, Duration::from_secs(60));
    }

    /// Kills the snapshotter with SIGKILL (no cleanup of its own).
    pub fn kill_snapshotter(&mut self) {
        if let Some(mut c) = self.snapshotter.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// `ctr --address SOCKET ARGS`.
    pub fn ctr(&self, args: &[&str]) -> Output {
        Command::new("ctr").arg("--address").arg(&self.socket).args(args).stdin(Stdio::null()).output().expect("run ctr")
    }

    /// `ctr` that must succeed; its stdout.
    pub fn ctr_ok(&self, args: &[&str]) -> String {
        let out = self.ctr(args);
        assert!(out.status.success(), "ctr {args:?} failed: {}\n--- snapshotter log:\n{}", String::from_utf8_lossy(&out.stderr), tail(&self.snapshotter_log(), 40));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// CRI PullImage, as a kubelet sends it; the image's id on success.
    /// containerd's CRI plugin starts after its socket is up and answers
    /// "server is not initialized yet" until then; like a kubelet waiting
    /// for its runtime to be ready, this asks again for up to 30 s.
    pub fn cri_pull(&self, image: &str, auth: Option<(&str, &str)>) -> Result<String, String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match cri::pull(&self.socket, image, auth) {
                Err(e) if e.contains("not initialized yet") && Instant::now() < deadline => std::thread::sleep(Duration::from_millis(200)),
                result => return result,
            }
        }
    }

    /// CRI RemoveImage.
    pub fn cri_remove(&self, image: &str) -> Result<(), String> {
        cri::remove(&self.socket, image)
    }

    /// Names of the naiad snapshotter's snapshots in `namespace`, as
    /// containerd lists them.
    pub fn snapshots(&self, namespace: &str) -> Vec<String> {
        // After a snapshotter restart containerd redials it with a backoff
        // of up to 3 s.
        let args = ["-n", namespace, "snapshots", "--snapshotter", "naiad", "ls"];
        let deadline = Instant::now() + Duration::from_secs(15);
        while !self.ctr(&args).status.success() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(250));
        }
        let out = self.ctr_ok(&args);
        let mut names: Vec<String> = out.lines().skip(1).filter_map(|l| l.split_whitespace().next()).map(String::from).collect();
        names.sort();
        names
    }

    /// The naiad mounts under the snapshotter's root now.
    pub fn naiad_mounts(&self) -> Vec<PathBuf> {
        let root = self.snapshotter_root.to_string_lossy().to_string();
        fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(" - fuse.naiad "))
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|mp| mp.starts_with(&root))
            .map(PathBuf::from)
            .collect()
    }

    /// Daemons (supervisors and serving daemons) of this node's mounts.
    pub fn daemons(&self) -> Vec<String> {
        let run = self.snapshotter_root.join("run").to_string_lossy().to_string();
        let mut found = Vec::new();
        for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else { continue };
            let args = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if args.contains("naiad daemon") || args.contains("daemon supervise") || args.contains("daemon serve") {
                // Their configuration is on a pipe: tell them by their log file.
                if let Ok(fds) = fs::read_dir(entry.path().join("fd")) {
                    if fds.flatten().any(|fd| fs::read_link(fd.path()).is_ok_and(|t| t.to_string_lossy().starts_with(&run))) {
                        found.push(format!("{} {args}", entry.file_name().to_string_lossy()));
                    }
                }
            }
        }
        found
    }

    fn stop(&mut self) {
        // Containers first (their tasks), in every namespace used.
        for ns in [NAMESPACE, "default"] {
            let out = self.ctr(&["-n", ns, "tasks", "ls", "-q"]);
            for id in String::from_utf8_lossy(&out.stdout).lines() {
                let _ = self.ctr(&["-n", ns, "tasks", "kill", "-s", "SIGKILL", id]);
                std::thread::sleep(Duration::from_millis(200));
                let _ = self.ctr(&["-n", ns, "tasks", "rm", "-f", id]);
            }
            let out = self.ctr(&["-n", ns, "containers", "ls", "-q"]);
            for id in String::from_utf8_lossy(&out.stdout).lines() {
                let _ = self.ctr(&["-n", ns, "containers", "rm", id]);
            }
        }
        if let Some(mut c) = self.containerd.take() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(mut c) = self.snapshotter.take() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), nix::sys::signal::Signal::SIGTERM);
            std::thread::sleep(Duration::from_millis(200));
            let _ = c.kill();
            let _ = c.wait();
        }
        // What is still mounted under the node: overlays, then naiad mounts.
        let d = self.dir.path().to_string_lossy().to_string();
        let mut mounts: Vec<String> =
            fs::read_to_string("/proc/self/mountinfo").unwrap_or_default().lines().filter_map(|l| l.split(' ').nth(4).map(String::from)).filter(|mp| mp.starts_with(&d)).collect();
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for mp in mounts {
            let _ = nix::mount::umount2(mp.as_str(), nix::mount::MntFlags::MNT_DETACH);
        }
        let run = self.snapshotter_root.join("run");
        for line in self.daemons() {
            if let Some(pid) = line.split_whitespace().next().and_then(|p| p.parse::<i32>().ok()) {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            }
        }
        let _ = run;
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop();
    }
}

pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Whether containerd, ctr and runc are installed (scripts/install-test-deps.sh).
pub fn containerd_available() -> bool {
    ["containerd", "ctr", "runc", "containerd-shim-runc-v2"].iter().all(|b| Command::new("sh").arg("-c").arg(format!("command -v {b}")).output().is_ok_and(|o| o.status.success()))
}

mod cri {
    use std::path::{Path, PathBuf};

    use k8s_cri::v1::image_service_client::ImageServiceClient;
    use k8s_cri::v1::{AuthConfig, ImageSpec, PullImageRequest, RemoveImageRequest};

    fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime").block_on(f)
    }

    async fn client(socket: &Path) -> Result<ImageServiceClient<tonic::transport::Channel>, String> {
        let socket: PathBuf = socket.to_path_buf();
        let channel = tonic::transport::Endpoint::try_from("http://[::1]:1")
            .map_err(|e| e.to_string())?
            .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| tokio::net::UnixStream::connect(socket.clone())))
            .await
            .map_err(|e| format!("connecting to CRI: {e}"))?;
        Ok(ImageServiceClient::new(channel))
    }

    pub fn pull(socket: &Path, image: &str, auth: Option<(&str, &str)>) -> Result<String, String> {
        block_on(async {
            let mut c = client(socket).await?;
            let auth = auth.map(|(u, p)| AuthConfig { username: u.into(), password: p.into(), ..Default::default() });
            let req = PullImageRequest { image: Some(ImageSpec { image: image.into(), ..Default::default() }), auth, sandbox_config: None };
            c.pull_image(req).await.map(|r| r.into_inner().image_ref).map_err(|s| s.message().to_string())
        })
    }

    pub fn remove(socket: &Path, image: &str) -> Result<(), String> {
        block_on(async {
            let mut c = client(socket).await?;
            c.remove_image(RemoveImageRequest { image: Some(ImageSpec { image: image.into(), ..Default::default() }) }).await.map(drop).map_err(|s| s.message().to_string())
        })
    }
}
