//! Nothing left running: node processes and temporary directories are registered here, and
//! ctrl-c or SIGTERM at any moment stops the processes and removes the directories before
//! the harness exits.

use std::io::Write;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;

#[derive(Default)]
struct Registry {
    pids: Vec<u32>,
    dirs: Vec<PathBuf>,
    /// Network namespaces of a WAN topology.
    namespaces: Vec<String>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    pids: Vec::new(),
    dirs: Vec::new(),
    namespaces: Vec::new(),
});

fn with<T>(f: impl FnOnce(&mut Registry) -> T) -> T {
    let mut r = REGISTRY.lock().unwrap_or_else(|p| p.into_inner());
    f(&mut r)
}

pub fn add_process(pid: u32) {
    with(|r| r.pids.push(pid));
}

pub fn remove_process(pid: u32) {
    with(|r| r.pids.retain(|&p| p != pid));
}

pub fn add_dir(dir: PathBuf) {
    with(|r| r.dirs.push(dir));
}

pub fn remove_dir(dir: &std::path::Path) {
    with(|r| r.dirs.retain(|d| d != dir));
}

pub fn add_netns(name: String) {
    with(|r| r.namespaces.push(name));
}

pub fn remove_netns(name: &str) {
    with(|r| r.namespaces.retain(|n| n != name));
}

/// Stop every registered process (SIGTERM, then SIGKILL), remove every directory and
/// network namespace.
pub fn clean_everything() {
    let (pids, dirs, namespaces) = with(|r| {
        (
            std::mem::take(&mut r.pids),
            std::mem::take(&mut r.dirs),
            std::mem::take(&mut r.namespaces),
        )
    });
    let signal = |sig: &str, pid: u32| {
        let _ = Command::new("kill")
            .args([sig, &pid.to_string()])
            .stderr(std::process::Stdio::null())
            .status();
    };
    for &pid in &pids {
        signal("-TERM", pid);
    }
    wait_until_gone(&pids, std::time::Duration::from_secs(5));
    for &pid in &pids {
        if alive(pid) {
            signal("-KILL", pid);
        }
    }
    wait_until_gone(&pids, std::time::Duration::from_secs(5));
    for d in dirs {
        let _ = std::fs::remove_dir_all(d);
    }
    for ns in namespaces.iter().rev() {
        let _ = Command::new("ip").args(["netns", "del", ns]).status();
    }
}

/// Whether `pid` still runs (not gone, not a zombie). Without `/proc`, assume it does.
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // the state follows the command name in parentheses
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => !std::path::Path::new("/proc/self").exists(),
    }
}

/// Wait until every process in `pids` has exited, or `limit` has passed.
fn wait_until_gone(pids: &[u32], limit: std::time::Duration) {
    let deadline = std::time::Instant::now() + limit;
    while pids.iter().any(|&p| alive(p)) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// On ctrl-c or SIGTERM: clean everything up and exit with status 130.
pub fn install_signal_handler() {
    let spawned = std::thread::Builder::new()
        .name("signals".into())
        .spawn(|| {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                let Ok(mut term) =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                else {
                    return;
                };
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
                // stderr may be a closed pipe: a failed write must not stop the cleanup
                let _ = writeln!(std::io::stderr(), "\nstopping the testnet…");
                clean_everything();
                std::process::exit(130);
            });
        });
    if let Err(e) = spawned {
        tracing::warn!("cannot watch for ctrl-c: {e}");
    }
}
