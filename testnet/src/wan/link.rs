//! A link with delay, jitter and a rate, carried in userspace: two TAP devices, and for each
//! direction a thread that reads frames from one and another that writes them to the other
//! once the link's delay has passed. (`tc netem` would do this in the kernel, but not every
//! kernel has it: the machines Veil's CI runs on do not.)
//!
//! Each direction models a serial line: a frame departs when the previous one has been sent
//! (`bytes · 8 / rate` later), arrives `delay ± jitter` after departing, and never overtakes
//! an earlier frame; at most [`QUEUE`] frames wait, and more are dropped, as a router's
//! buffer would.

use std::io::{Read, Write};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

use super::LinkShape;

/// Frames in flight per direction before the link drops.
pub const QUEUE: usize = 1000;

/// Create TAP device `name` in this process's network namespace; it lives as long as the
/// returned device is open, or until the namespace it is moved to is deleted.
fn open_tap(name: &str) -> std::io::Result<tun::Device> {
    let mut config = tun::Configuration::default();
    config.tun_name(name).layer(tun::Layer::L2);
    tun::create(&config).map_err(|e| std::io::Error::other(format!("TAP device {name}: {e}")))
}

/// A link between TAP devices `a` and `b`. Its threads end when a device goes away: move
/// both into namespaces, and deleting the namespaces ends the link.
pub struct DelayLink {
    _threads: Vec<JoinHandle<()>>,
}

impl DelayLink {
    /// Create TAP devices `a` and `b` here (move them with `ip link set … netns`) and start
    /// carrying frames between them.
    pub fn new(a: &str, b: &str, shape: LinkShape, seed: u64) -> std::io::Result<Self> {
        let (ra, wa) = open_tap(a)?.split();
        let (rb, wb) = open_tap(b)?.split();
        let mut threads = Vec::new();
        let directions: [(tun::Reader, tun::Writer); 2] = [(ra, wb), (rb, wa)];
        for (k, (from, to)) in directions.into_iter().enumerate() {
            let (tx, rx) = sync_channel(QUEUE);
            let name = format!("{a}-{k}");
            threads.push(
                std::thread::Builder::new()
                    .name(format!("{name}-in"))
                    .spawn(move || receive(from, tx, shape, seed + k as u64))?,
            );
            threads.push(
                std::thread::Builder::new()
                    .name(format!("{name}-out"))
                    .spawn(move || deliver(to, rx))?,
            );
        }
        Ok(DelayLink { _threads: threads })
    }
}

/// Read frames and schedule their arrival, until the device goes away.
fn receive(mut from: impl Read, tx: SyncSender<(Instant, Vec<u8>)>, shape: LinkShape, seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let bits_per_s = f64::from(shape.rate_mbit.max(1)) * 1e6;
    let delay = Duration::from_millis(u64::from(shape.delay_ms));
    let jitter = u64::from(shape.jitter_ms) * 1000;
    let mut sent = Instant::now();
    let mut last = Instant::now();
    let mut buf = vec![0u8; 65536];
    loop {
        let n = match from.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        if n == 0 {
            return;
        }
        let now = Instant::now();
        sent = sent.max(now) + Duration::from_secs_f64(n as f64 * 8.0 / bits_per_s);
        let wobble = if jitter > 0 {
            Duration::from_micros(rng.gen_range(0..=2 * jitter))
        } else {
            Duration::ZERO
        };
        // delay ± jitter, never before an earlier frame
        let arrive = (sent + delay + wobble)
            .checked_sub(Duration::from_micros(jitter))
            .unwrap_or(sent)
            .max(last);
        last = arrive;
        match tx.try_send((arrive, buf[..n].to_vec())) {
            Ok(()) | Err(TrySendError::Full(_)) => {}
            Err(TrySendError::Disconnected(_)) => return,
        }
    }
}

/// Write each frame when it is due, until the receiving side stops.
fn deliver(mut to: impl Write, rx: Receiver<(Instant, Vec<u8>)>) {
    while let Ok((at, frame)) = rx.recv() {
        let now = Instant::now();
        if at > now {
            std::thread::sleep(at - now);
        }
        // a device that went away (its namespace deleted) only loses the frame
        let _ = to.write(&frame);
    }
}
