//! `naiad optimize SRC DST [-- CMD ARGS...]`: converts SRC once into a
//! temporary layout, runs the image's command (or CMD) there under
//! `naiad run --record-trace` for a bounded time, then converts SRC into DST
//! with that trace as the prefetch list. Blobs whose chunks did not change
//! are the same blobs, so a registry or layout that has them keeps them.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use naiad_converter::PrefetchList;
use naiad_registry::ImageRef;

use crate::cmd::convert::{convert_and_report, ConvertFlags};

#[derive(Args)]
pub struct OptimizeArgs {
    /// Source image: oci:DIR[:TAG], docker-archive:FILE or docker://REF
    pub source: String,
    /// Destination: oci:DIR[:TAG] or docker://REF
    pub destination: String,
    /// The workload (default: the image's Entrypoint and Cmd).
    #[arg(last = true)]
    pub command: Vec<String>,
    /// Stop the workload after this many seconds; what it read so far is the startup set.
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    pub timeout: u64,
    /// Also keep the recorded trace here.
    #[arg(long, value_name = "FILE")]
    pub trace: Option<PathBuf>,
    /// Print a JSON summary of the final conversion on stdout.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub flags: ConvertFlags,
}

pub fn run(a: OptimizeArgs) -> Result<i32> {
    let source = ImageRef::parse(&a.source)?;
    let destination = ImageRef::parse(&a.destination)?;
    let work = tempfile::Builder::new().prefix("naiad-optimize-").tempdir_in(std::env::temp_dir()).context("creating a work directory")?;
    let staging = ImageRef::Layout { dir: work.path().join("layout"), tag: "trace".into() };
    let opts = a.flags.options()?;
    eprintln!("naiad optimize: converting {source} for a trace run");
    naiad_converter::convert(&source, &staging, &opts).with_context(|| format!("converting {source}"))?;

    let trace = work.path().join("trace.jsonl");
    let exe = std::env::current_exe().context("finding the naiad executable")?;
    let mut cmd = Command::new(exe);
    cmd.arg("run").arg("--record-trace").arg(&trace).arg("--cache-dir").arg(work.path().join("cache")).arg(staging.to_string());
    if !a.command.is_empty() {
        cmd.arg("--").args(&a.command);
    }
    eprintln!("naiad optimize: recording what the workload reads (at most {} s)", a.timeout);
    // The workload's output goes to stderr: stdout is for the summary.
    cmd.stdout(std::io::stderr());
    let mut child = cmd.spawn().context("starting naiad run")?;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(a.timeout);
    let status = loop {
        if let Some(status) = child.try_wait().context("waiting for naiad run")? {
            break Some(status);
        }
        if Instant::now() >= deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    match status {
        Some(s) => eprintln!("naiad optimize: the workload exited ({s}) after {:.1} s", started.elapsed().as_secs_f64()),
        None => {
            // Stop it the way a user would: naiad run forwards SIGTERM and cleans up.
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let grace = Instant::now() + Duration::from_secs(10);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < grace {
                std::thread::sleep(Duration::from_millis(50));
            }
            if child.try_wait().ok().flatten().is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
            eprintln!("naiad optimize: stopped the workload after {} s", a.timeout);
        }
    }
    let list = PrefetchList::load(&trace).with_context(|| format!("reading the recorded trace {}", trace.display()))?;
    if list.is_empty() {
        bail!("the workload read nothing from the image; no startup set to optimize for");
    }
    if let Some(keep) = &a.trace {
        std::fs::copy(&trace, keep).with_context(|| format!("copying the trace to {}", keep.display()))?;
    }
    let mut opts = opts;
    opts.prefetch = Some(Arc::new(list));
    eprintln!("naiad optimize: converting {source} into {destination} with the startup set first");
    convert_and_report(&source, &destination, &opts, a.json)?;
    Ok(0)
}
