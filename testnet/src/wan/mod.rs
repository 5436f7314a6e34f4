//! A wide-area network on one machine: Linux network namespaces joined to a switch (the
//! public segment) by links with delay, jitter and a rate ([`link`]: userspace, since not
//! every kernel has `tc netem`), home networks behind NAT routers (nftables masquerade).
//! Needs root, iproute2 (`ip`), nftables (`nft`) and TAP devices; [`Wan::check`] says what
//! is missing.
//!
//! ```text
//!                    switch (bridge, its own namespace)
//!     ┌────────────┬───────┴───────┬────────────────┐
//!   boot        relay         router r<i> (NAT)   router rc (NAT)
//!   10.200.0.2  10.200.0.3    10.200.0.(10+i)     10.200.0.9
//!                               │ 10.201.i.1         │ 10.202.0.1
//!                             home host h<i>      client host c
//!                               10.201.i.2           10.202.0.2
//! ```
//!
//! Every address lives only inside namespaces this module made; all of them are removed
//! when the [`Wan`] is dropped, and on ctrl-c through [`crate::cleanup`].

use std::net::Ipv4Addr;
use std::process::{Command, Output};

use anyhow::{bail, Context, Result};
use rand::{Rng, SeedableRng};

pub mod link;
pub mod ns;
pub mod up;

use link::DelayLink;

/// How a home router maps its hosts' flows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatKind {
    /// One public port per host port, whatever the destination (port-preserving
    /// masquerade): hole punching works.
    EndpointIndependent,
    /// A new random public port per destination: hole punching fails, relays are needed.
    Symmetric,
}

impl std::str::FromStr for NatKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "eim" | "endpoint-independent" => Ok(NatKind::EndpointIndependent),
            "symmetric" => Ok(NatKind::Symmetric),
            other => Err(format!("NAT kind must be eim or symmetric, not `{other}`")),
        }
    }
}

/// Delay, jitter and rate of one direction of a link.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkShape {
    pub delay_ms: u32,
    pub jitter_ms: u32,
    pub rate_mbit: u32,
}

/// What to build.
#[derive(Debug, Clone)]
pub struct WanOptions {
    /// One home network per entry, each with one host behind its router.
    pub homes: Vec<NatKind>,
    /// The client's own NAT.
    pub client_nat: NatKind,
    /// One-way delay of each uplink, drawn uniformly from this range (ms).
    pub delay_ms: (u32, u32),
    /// The public hosts' (bootstrap, relay) uplinks instead, when they differ: a relay in a
    /// data centre sits closer to everyone than a home does.
    pub public_delay_ms: Option<(u32, u32)>,
    pub jitter_ms: u32,
    pub rate_mbit: u32,
    pub seed: u64,
}

impl Default for WanOptions {
    /// As the simulator assumes: 5-40 ms one way, 100 Mbit/s.
    fn default() -> Self {
        WanOptions {
            homes: vec![NatKind::EndpointIndependent, NatKind::Symmetric],
            client_nat: NatKind::EndpointIndependent,
            delay_ms: (5, 40),
            public_delay_ms: None,
            jitter_ms: 1,
            rate_mbit: 100,
            seed: 7,
        }
    }
}

/// A machine of the WAN: its namespace and address, and the address others see it by.
#[derive(Debug, Clone)]
pub struct Host {
    pub name: String,
    pub ns: String,
    pub addr: Ipv4Addr,
    /// Its own address on the public segment, or its router's behind a NAT.
    pub public: Ipv4Addr,
    pub nat: Option<NatKind>,
    /// The shape of its uplink (each direction).
    pub link: LinkShape,
}

impl Host {
    /// Where a node on this host runs: its namespace and address (for
    /// [`crate::cluster::start_nodes_on`]).
    pub fn place(&self) -> Option<(String, Ipv4Addr)> {
        Some((self.ns.clone(), self.addr))
    }
}

/// A built WAN; dropping it removes everything.
pub struct Wan {
    namespaces: Vec<String>,
    links: Vec<DelayLink>,
    seed: u64,
    pub boot: Host,
    pub relay: Host,
    pub homes: Vec<Host>,
    pub client: Host,
}

fn run(cmd: &mut Command) -> Result<Output> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {shown}"))?;
    if !out.status.success() {
        bail!(
            "{shown} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

fn ip(args: &[&str]) -> Result<Output> {
    run(Command::new("ip").args(args))
}

/// `program args…` inside namespace `ns`.
fn in_ns(ns: &str, program: &str, args: &[&str]) -> Result<Output> {
    run(Command::new("ip")
        .args(["netns", "exec", ns, program])
        .args(args))
}

const PREFIX: &str = "veilwan";

impl Wan {
    /// Why a WAN cannot be built here, if it cannot: not root, or a tool missing.
    pub fn check() -> Result<(), String> {
        let uid = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("Uid:"))
                    .and_then(|l| l.split_whitespace().nth(1).map(str::to_string))
            });
        if uid.as_deref() != Some("0") {
            return Err("the WAN topology needs root (network namespaces)".into());
        }
        if !std::path::Path::new("/dev/net/tun").exists() {
            return Err("the WAN topology needs TAP devices (/dev/net/tun)".into());
        }
        for (tool, package) in [("ip", "iproute2"), ("nft", "nftables")] {
            let found = Command::new(tool)
                .arg("-V")
                .output()
                .is_ok_and(|o| o.status.success());
            if !found {
                return Err(format!(
                    "the WAN topology needs `{tool}` (Debian package {package}; \
                     scripts/setup.sh installs it)"
                ));
            }
        }
        Ok(())
    }

    /// Build it; on error, whatever was made is removed.
    pub fn build(opts: &WanOptions) -> Result<Wan> {
        if let Err(e) = Wan::check() {
            bail!(e);
        }
        remove_stale();
        // unique per WAN: a process may build several (tests do)
        static BUILT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let k = BUILT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tag = format!("{PREFIX}{}x{k}", std::process::id());
        let mut rng = rand::rngs::StdRng::seed_from_u64(opts.seed);
        let mut shape = |public: bool| {
            let (lo, hi) = match opts.public_delay_ms {
                Some(range) if public => range,
                _ => opts.delay_ms,
            };
            LinkShape {
                delay_ms: rng.gen_range(lo..=hi.max(lo)),
                jitter_ms: opts.jitter_ms,
                rate_mbit: opts.rate_mbit,
            }
        };
        let public = |n: u8| Ipv4Addr::new(10, 200, 0, n);
        let mut wan = Wan {
            namespaces: Vec::new(),
            links: Vec::new(),
            seed: opts.seed,
            boot: Host {
                name: "boot".into(),
                ns: format!("{tag}-boot"),
                addr: public(2),
                public: public(2),
                nat: None,
                link: shape(true),
            },
            relay: Host {
                name: "relay".into(),
                ns: format!("{tag}-relay"),
                addr: public(3),
                public: public(3),
                nat: None,
                link: shape(true),
            },
            homes: Vec::new(),
            client: Host {
                name: "client".into(),
                ns: format!("{tag}-c"),
                addr: Ipv4Addr::new(10, 202, 0, 2),
                public: public(9),
                nat: Some(opts.client_nat),
                link: shape(false),
            },
        };
        for (i, &nat) in opts.homes.iter().enumerate() {
            if i >= 200 {
                bail!("at most 200 home networks");
            }
            wan.homes.push(Host {
                name: format!("home{i}"),
                ns: format!("{tag}-h{i}"),
                addr: Ipv4Addr::new(10, 201, i as u8, 2),
                public: public(10 + i as u8),
                nat: Some(nat),
                link: shape(false),
            });
        }
        // on error, `wan` is dropped and removes what was made
        wan.make(&tag)?;
        Ok(wan)
    }

    fn add_ns(&mut self, ns: &str) -> Result<()> {
        ip(&["netns", "add", ns])?;
        self.namespaces.push(ns.to_string());
        crate::cleanup::add_netns(ns.to_string());
        in_ns(ns, "ip", &["link", "set", "lo", "up"])?;
        Ok(())
    }

    fn make(&mut self, tag: &str) -> Result<()> {
        let switch = format!("{tag}-sw");
        self.add_ns(&switch)?;
        in_ns(&switch, "ip", &["link", "add", "br0", "type", "bridge"])?;
        in_ns(&switch, "ip", &["link", "set", "br0", "up"])?;
        let mut port = 0;
        // public hosts: straight on the switch
        for host in [self.boot.clone(), self.relay.clone()] {
            self.add_ns(&host.ns)?;
            self.uplink(&switch, &mut port, &host.ns, host.public, host.link)?;
        }
        // hosts behind a NAT router each
        let mut natted: Vec<(Host, Ipv4Addr, String)> = self
            .homes
            .iter()
            .enumerate()
            .map(|(i, h)| {
                (
                    h.clone(),
                    Ipv4Addr::new(10, 201, i as u8, 1),
                    format!("{tag}-r{i}"),
                )
            })
            .collect();
        natted.push((
            self.client.clone(),
            Ipv4Addr::new(10, 202, 0, 1),
            format!("{tag}-rc"),
        ));
        for (host, gateway, router) in natted {
            self.add_ns(&router)?;
            self.add_ns(&host.ns)?;
            self.uplink(&switch, &mut port, &router, host.public, host.link)?;
            ip(&[
                "link", "add", "name", "lan", "netns", &router, "type", "veth", "peer", "name",
                "eth0", "netns", &host.ns,
            ])?;
            in_ns(
                &router,
                "ip",
                &["addr", "add", &format!("{gateway}/24"), "dev", "lan"],
            )?;
            in_ns(&router, "ip", &["link", "set", "lan", "up"])?;
            in_ns(
                &host.ns,
                "ip",
                &["addr", "add", &format!("{}/24", host.addr), "dev", "eth0"],
            )?;
            in_ns(&host.ns, "ip", &["link", "set", "eth0", "up"])?;
            in_ns(
                &host.ns,
                "ip",
                &["route", "add", "default", "via", &gateway.to_string()],
            )?;
            in_ns(&router, "sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
            let masquerade = match host.nat.unwrap_or(NatKind::EndpointIndependent) {
                NatKind::EndpointIndependent => "masquerade persistent",
                NatKind::Symmetric => "masquerade random",
            };
            let rules = format!(
                "table ip nat {{\n  chain post {{\n    type nat hook postrouting priority 100;\n    \
                 oifname \"wan0\" {masquerade}\n  }}\n}}\n"
            );
            let path = std::env::temp_dir().join(format!("{router}.nft"));
            std::fs::write(&path, rules).context("cannot write the NAT rules")?;
            let r = in_ns(&router, "nft", &["-f", &path.to_string_lossy()]);
            let _ = std::fs::remove_file(&path);
            r?;
        }
        Ok(())
    }

    /// Join namespace `ns` to the switch: `wan0` (address `addr`) in `ns`, a port on the
    /// bridge, and a link of shape `link` between them.
    fn uplink(
        &mut self,
        switch: &str,
        port: &mut usize,
        ns: &str,
        addr: Ipv4Addr,
        link: LinkShape,
    ) -> Result<()> {
        let p = format!("p{port}");
        // names unique in this namespace until the devices are moved (at most 15 bytes)
        static LINKS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = LINKS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let pid = std::process::id() % 100_000;
        let (a, b) = (format!("vw{pid}_{n}a"), format!("vw{pid}_{n}b"));
        *port += 1;
        let carrier = DelayLink::new(&a, &b, link, self.seed + *port as u64 * 2)
            .with_context(|| format!("cannot create the TAP devices {a} and {b}"))?;
        self.links.push(carrier);
        ip(&["link", "set", "dev", &a, "netns", ns])?;
        in_ns(ns, "ip", &["link", "set", "dev", &a, "name", "wan0"])?;
        ip(&["link", "set", "dev", &b, "netns", switch])?;
        in_ns(switch, "ip", &["link", "set", "dev", &b, "name", &p])?;
        in_ns(switch, "ip", &["link", "set", &p, "master", "br0"])?;
        in_ns(switch, "ip", &["link", "set", &p, "up"])?;
        in_ns(
            ns,
            "ip",
            &["addr", "add", &format!("{addr}/24"), "dev", "wan0"],
        )?;
        in_ns(ns, "ip", &["link", "set", "dev", "wan0", "up"])?;
        Ok(())
    }

    /// A command that runs `program` inside `host`'s namespace.
    pub fn command(&self, host: &Host, program: &std::path::Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &host.ns]).arg(program);
        c
    }

    /// The namespaces this WAN made.
    pub fn namespaces(&self) -> &[String] {
        &self.namespaces
    }

    fn remove(&mut self) {
        // the carriers first: their devices go with them
        self.links.clear();
        for ns in self.namespaces.drain(..).rev() {
            let _ = ip(&["netns", "del", &ns]);
            crate::cleanup::remove_netns(&ns);
        }
    }
}

impl Drop for Wan {
    fn drop(&mut self) {
        self.remove();
    }
}

/// Remove the namespaces of WANs whose process is gone (a harness killed with SIGKILL).
pub fn remove_stale() {
    let Ok(out) = ip(&["netns", "list"]) else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let pid: u32 = rest
            .split(['-', 'x'])
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        if pid != 0 && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            tracing::info!("removing the stale namespace {name}");
            let _ = ip(&["netns", "del", name]);
        }
    }
}
