//! Running the harness's own client inside a namespace of the WAN. A network namespace
//! belongs to a thread, and threads inherit it from the thread that spawns them: work run
//! through [`in_namespace`] (with the async runtimes, sessions and child processes it
//! starts) lives in that namespace, and the calling thread stays where it was.

use std::fs::File;

use anyhow::{Context, Result};
use nix::sched::{setns, CloneFlags};

/// Run `f` on a thread inside network namespace `ns` (a name under `/var/run/netns`, as
/// `ip netns add` makes), or right here when `ns` is `None`.
pub fn in_namespace<T: Send>(ns: Option<&str>, f: impl FnOnce() -> T + Send) -> Result<T> {
    let Some(ns) = ns else { return Ok(f()) };
    let path = format!("/var/run/netns/{ns}");
    std::thread::scope(|scope| {
        let worker = scope.spawn(move || -> Result<T> {
            let file = File::open(&path).with_context(|| format!("no namespace {path}"))?;
            setns(&file, CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("cannot enter the network namespace {ns}"))?;
            Ok(f())
        });
        match worker.join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}
