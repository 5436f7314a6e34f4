//! Local node processes: create their data directories, start them on loopback, find their
//! listen addresses in their logs, stop, kill and restart them. Every process is killed
//! when its handle is dropped, so nothing is left running.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Settings written into a node's `node.toml`.
#[derive(Debug, Clone)]
pub struct NodeSettings {
    pub backend: String,
    pub memory_limit_mib: u64,
    pub ad_interval_s: u64,
    pub ad_ttl_s: u32,
    pub step_delay_ms: u64,
    pub record_traffic: bool,
    /// Each node writes every activation payload it receives to `<dir>/<node name>/<n>.bin`
    /// (`record_payloads`).
    pub record_payloads: Option<std::path::PathBuf>,
    pub request_timeout_s: u64,
    /// Also listen on QUIC.
    pub quic: bool,
    pub session_idle_timeout_s: u64,
    /// TCP port of the first node; node `i` listens on `base_port + i` (0: any free port).
    pub base_port: u16,
    /// Serve Prometheus metrics on a free loopback port (`metrics on http://…` in the log).
    pub metrics: bool,
    /// Byzantine nodes: the last `nodes` of the network corrupt a fraction of their answers.
    pub byzantine: Option<Byzantine>,
    /// The first `relays` nodes relay for nodes behind NAT (`relay = true`), with these
    /// further `node.toml` lines (limits, declared addresses).
    pub relays: usize,
    pub relay_config: String,
    /// Further `node.toml` lines for every node (limits, allow-lists).
    pub extra_config: String,
}

/// How the testnet's lying nodes lie (`lie_mode` / `lie_rate` in their `node.toml`).
#[derive(Debug, Clone, PartialEq)]
pub struct Byzantine {
    pub nodes: usize,
    /// noise, zeros, skip-layers or replay-stale.
    pub mode: String,
    /// Fraction of answers corrupted.
    pub rate: f64,
}

impl Default for NodeSettings {
    fn default() -> Self {
        NodeSettings {
            backend: "cpu".into(),
            memory_limit_mib: 4096,
            ad_interval_s: 1,
            ad_ttl_s: 10,
            step_delay_ms: 0,
            record_traffic: false,
            record_payloads: None,
            request_timeout_s: 30,
            quic: false,
            session_idle_timeout_s: 300,
            base_port: 0,
            metrics: false,
            byzantine: None,
            relays: 0,
            relay_config: String::new(),
            extra_config: String::new(),
        }
    }
}

/// A `veil-node` process on 127.0.0.1, or on a host of a WAN topology.
#[derive(Debug)]
pub struct NodeProcess {
    /// The network namespace it runs in and the address it listens on there (see
    /// [`crate::wan`]); `None`: this namespace, 127.0.0.1.
    pub host: Option<(String, std::net::Ipv4Addr)>,
    pub name: String,
    pub data_dir: PathBuf,
    pub peer_id: String,
    /// `/ip4/127.0.0.1/tcp/<port>/p2p/<peer id>` once started.
    pub addr: Option<String>,
    /// `/ip4/127.0.0.1/udp/<port>/quic-v1/p2p/<peer id>` with `quic`.
    pub quic_addr: Option<String>,
    quic: bool,
    bin: PathBuf,
    child: Option<Child>,
    port: u16,
}

/// The path of a workspace binary next to the running executable (tests live in
/// `target/<profile>/deps`, binaries in `target/<profile>`).
pub fn find_bin(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("current executable")?;
    for dir in exe.ancestors().skip(1).take(3) {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!(
        "cannot find the `{name}` binary next to {} (build the workspace first)",
        exe.display()
    )
}

impl NodeProcess {
    /// `veil-node init` in `data_dir` and write its configuration.
    pub fn init(bin: &Path, name: &str, data_dir: &Path, settings: &NodeSettings) -> Result<Self> {
        Self::init_lying(bin, name, data_dir, settings, None)
    }

    /// [`NodeProcess::init`] for a node that lies as `lie` says (mode, rate).
    pub fn init_lying(
        bin: &Path,
        name: &str,
        data_dir: &Path,
        settings: &NodeSettings,
        lie: Option<(&str, f64)>,
    ) -> Result<Self> {
        let out = Command::new(bin)
            .args(["init", "--data-dir"])
            .arg(data_dir)
            .env("VEIL_LOG", "warn")
            .output()
            .with_context(|| format!("cannot run {}", bin.display()))?;
        if !out.status.success() {
            bail!(
                "{name}: init failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let peer_id = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let mut record = if settings.record_traffic {
            "record_traffic = \"traffic.bin\"\n".to_string()
        } else {
            String::new()
        };
        if let Some(dir) = &settings.record_payloads {
            let dir = std::path::absolute(dir.join(name))?;
            record += &format!("record_payloads = {:?}\n", dir.display().to_string());
        }
        let metrics = if settings.metrics {
            "metrics_listen = \"127.0.0.1:0\"\n"
        } else {
            ""
        };
        let lie = lie.map_or(String::new(), |(mode, rate)| {
            format!("lie_mode = \"{mode}\"\nlie_rate = {rate}\n")
        });
        let config = format!(
            "backend = \"{}\"\nmemory_limit_mib = {}\nad_interval_s = {}\nad_ttl_s = {}\n\
             step_delay_ms = {}\nrequest_timeout_s = {}\nsession_idle_timeout_s = {}\n{record}{metrics}{lie}{}\n",
            settings.backend,
            settings.memory_limit_mib,
            settings.ad_interval_s,
            settings.ad_ttl_s,
            settings.step_delay_ms,
            settings.request_timeout_s,
            settings.session_idle_timeout_s,
            settings.extra_config,
        );
        std::fs::write(data_dir.join("node.toml"), config)?;
        Ok(NodeProcess {
            host: None,
            name: name.to_string(),
            data_dir: data_dir.to_path_buf(),
            peer_id,
            addr: None,
            quic_addr: None,
            quic: settings.quic,
            bin: bin.to_path_buf(),
            child: None,
            port: 0,
        })
    }

    fn log_path(&self) -> PathBuf {
        self.data_dir.join("node.log")
    }

    /// Start (or restart, on the same port) and wait until it listens.
    pub fn start(&mut self, bootstrap: &[String]) -> Result<()> {
        if self.child.is_some() {
            bail!("{} is already running", self.name);
        }
        let log = File::create(self.log_path())?;
        let ip = self
            .host
            .as_ref()
            .map_or("127.0.0.1".to_string(), |(_, ip)| ip.to_string());
        // `ip netns exec` execs the node: the child's pid is the node's
        let mut cmd = match &self.host {
            Some((ns, _)) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&self.bin);
                c
            }
            None => Command::new(&self.bin),
        };
        cmd.args(["run", "--data-dir"])
            .arg(&self.data_dir)
            .args(["--listen", &format!("/ip4/{ip}/tcp/{}", self.port)])
            .args(if self.quic {
                vec!["--listen".to_string(), format!("/ip4/{ip}/udp/0/quic-v1")]
            } else {
                vec![]
            })
            .env("VEIL_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        for b in bootstrap {
            cmd.args(["--bootstrap", b]);
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", self.name))?;
        crate::cleanup::add_process(child.id());
        self.child = Some(child);
        let addr = self.wait_for_listen("/tcp/", Duration::from_secs(180))?;
        if self.quic {
            self.quic_addr = Some(self.wait_for_listen("/quic-v1", Duration::from_secs(180))?);
        }
        self.port = addr
            .split('/')
            .nth(4)
            .and_then(|p| p.parse().ok())
            .context("listen address without a port")?;
        self.addr = Some(addr);
        Ok(())
    }

    fn wait_for_listen(&mut self, transport: &str, limit: Duration) -> Result<String> {
        let start = Instant::now();
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    crate::cleanup::remove_process(child.id());
                    self.child = None;
                    bail!(
                        "{} exited ({status}) before listening:\n{}",
                        self.name,
                        self.log_tail(20)
                    );
                }
            }
            if let Ok(f) = File::open(self.log_path()) {
                for line in BufReader::new(f).lines().map_while(Result::ok) {
                    if let Some(addr) = line.split("listening on ").nth(1) {
                        if addr.contains(transport) {
                            return Ok(addr.trim().to_string());
                        }
                    }
                }
            }
            if start.elapsed() > limit {
                bail!(
                    "{} did not start listening within {limit:?}:\n{}",
                    self.name,
                    self.log_tail(20)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The last `n` lines of the node's log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The node process's id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// SIGKILL: a crash.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
            crate::cleanup::remove_process(c.id());
        }
    }

    /// SIGTERM and wait: a graceful shutdown. Returns whether it exited within `limit`.
    pub fn stop(&mut self, limit: Duration) -> bool {
        let Some(mut c) = self.child.take() else {
            return true;
        };
        crate::cleanup::remove_process(c.id());
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Ok(Some(_)) = c.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        let _ = c.wait();
        false
    }

    /// Bytes this node recorded (with `record_traffic`).
    pub fn traffic(&self) -> Vec<u8> {
        std::fs::read(self.data_dir.join("traffic.bin")).unwrap_or_default()
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Start `n` nodes under `root`, the first one bootstrapping the others.
pub fn start_nodes(root: &Path, n: usize, settings: &NodeSettings) -> Result<Vec<NodeProcess>> {
    start_nodes_on(root, &vec![None; n], settings)
}

/// Start a node per entry of `hosts` (a namespace and its address, or `None` for loopback
/// here), the first one bootstrapping the others.
pub fn start_nodes_on(
    root: &Path,
    hosts: &[Option<(String, std::net::Ipv4Addr)>],
    settings: &NodeSettings,
) -> Result<Vec<NodeProcess>> {
    let bin = find_bin("veil-node")?;
    let n = hosts.len();
    let mut nodes: Vec<NodeProcess> = Vec::with_capacity(n);
    for (i, host) in hosts.iter().enumerate() {
        let dir = root.join(format!("node-{i}"));
        std::fs::create_dir_all(&dir)?;
        let lie = settings
            .byzantine
            .as_ref()
            .filter(|b| i + b.nodes >= n)
            .map(|b| (b.mode.as_str(), b.rate));
        let mut node = NodeProcess::init_lying(&bin, &format!("node-{i}"), &dir, settings, lie)?;
        if i < settings.relays {
            let toml = dir.join("node.toml");
            let mut config = std::fs::read_to_string(&toml)?;
            config.push_str("relay = true\n");
            config.push_str(&settings.relay_config);
            config.push('\n');
            std::fs::write(&toml, config)?;
        }
        node.host = host.clone();
        if settings.base_port != 0 {
            node.port = settings
                .base_port
                .checked_add(i as u16)
                .context("--base-port is too high for that many nodes")?;
        }
        let bootstrap: Vec<String> = nodes
            .first()
            .and_then(|b| b.addr.clone())
            .into_iter()
            .collect();
        node.start(&bootstrap)?;
        nodes.push(node);
    }
    Ok(nodes)
}
