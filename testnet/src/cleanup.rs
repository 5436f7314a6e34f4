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
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    pids: Vec::new(),
    dirs: Vec::new(),
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

/// Stop every registered process (SIGTERM, then SIGKILL) and remove every directory.
pub fn clean_everything() {
    let (pids, dirs) = with(|r| (std::mem::take(&mut r.pids), std::mem::take(&mut r.dirs)));
    let signal = |sig: &str, pid: u32| {
        let _ = Command::new("kill")
            .args([sig, &pid.to_string()])
            .stderr(std::process::Stdio::null())
            .status();
    };
    for &pid in &pids {
        signal("-TERM", pid);
    }
    if !pids.is_empty() {
        std::thread::sleep(std::time::Duration::from_millis(1500));
    }
    for &pid in &pids {
        signal("-KILL", pid);
    }
    for d in dirs {
        let _ = std::fs::remove_dir_all(d);
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
