//! Fairness between peers: a token bucket of requests per second per peer, and a count of
//! each peer's requests waiting for the engine. Both are small enough to keep here rather
//! than bring a rate-limiting crate: the buckets of peers gone quiet are dropped (a node on
//! an open network meets peers without end) and the clock is a parameter (tests).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use veil_protocol::PeerId;

/// Requests per second per peer, in bursts of up to one second's worth.
#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    buckets: HashMap<PeerId, (f64, Instant)>,
    last_prune: Option<Instant>,
}

impl RateLimiter {
    pub fn new(per_second: u32) -> Self {
        RateLimiter {
            rate: f64::from(per_second),
            buckets: HashMap::new(),
            last_prune: None,
        }
    }

    /// Whether `peer` may make a request at `now` (taking a token if so).
    #[cfg(test)]
    pub fn allow(&mut self, peer: PeerId, now: Instant) -> bool {
        self.allow_cost(peer, now, 1.0)
    }

    /// Whether `peer` may make a request that counts `cost` tokens (at most one) at `now`,
    /// taking them if so.
    pub fn allow_cost(&mut self, peer: PeerId, now: Instant, cost: f64) -> bool {
        if self
            .last_prune
            .is_none_or(|t| now.saturating_duration_since(t) > Duration::from_secs(10))
        {
            // a bucket refilled to the brim is the same as none
            let rate = self.rate;
            self.buckets.retain(|_, (tokens, at)| {
                *tokens + now.saturating_duration_since(*at).as_secs_f64() * rate < rate
            });
            self.last_prune = Some(now);
        }
        let (tokens, at) = self.buckets.entry(peer).or_insert((self.rate, now));
        *tokens =
            (*tokens + now.saturating_duration_since(*at).as_secs_f64() * self.rate).min(self.rate);
        *at = now;
        if *tokens >= cost {
            *tokens -= cost;
            true
        } else {
            false
        }
    }

    /// Peers with a bucket (tests: pruning).
    #[cfg(test)]
    pub fn tracked(&self) -> usize {
        self.buckets.len()
    }
}

/// What a masked-mode op (`Linear`, `MaskProducts`) costs in the rate limit: a token takes
/// four per layer, so each counts a quarter of a request.
pub const MASKED_OP_COST: f64 = 0.25;

/// Each peer's requests that wait for the engine, within a limit per peer.
#[derive(Debug, Clone)]
pub struct Queues {
    limit: u32,
    waiting: Arc<Mutex<HashMap<PeerId, u32>>>,
}

/// One waiting request; dropping it frees its place.
#[derive(Debug)]
pub struct Place {
    peer: PeerId,
    waiting: Arc<Mutex<HashMap<PeerId, u32>>>,
}

fn lock(m: &Mutex<HashMap<PeerId, u32>>) -> MutexGuard<'_, HashMap<PeerId, u32>> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Queues {
    pub fn new(limit: u32) -> Self {
        Queues {
            limit,
            waiting: Arc::default(),
        }
    }

    /// A place in the queue for `peer`, or how many it already has waiting.
    pub fn enter(&self, peer: PeerId) -> Result<Place, u32> {
        let mut w = lock(&self.waiting);
        let n = w.entry(peer).or_insert(0);
        if *n >= self.limit {
            return Err(*n);
        }
        *n += 1;
        Ok(Place {
            peer,
            waiting: self.waiting.clone(),
        })
    }

    /// Peers with a request waiting.
    #[cfg(test)]
    pub fn peers(&self) -> usize {
        lock(&self.waiting).len()
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut w = lock(&self.waiting);
        if let Some(n) = w.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                w.remove(&self.peer);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(n: u8) -> PeerId {
        veil_protocol::Identity::from_secret([n; 32]).peer_id()
    }

    #[test]
    fn a_peer_over_its_rate_waits_while_others_pass() {
        let mut r = RateLimiter::new(10);
        let t0 = Instant::now();
        let passed = (0..25).filter(|_| r.allow(peer(1), t0)).count();
        assert_eq!(passed, 10, "a burst of one second's worth");
        assert!(r.allow(peer(2), t0), "another peer is not affected");
        assert!(!r.allow(peer(1), t0 + Duration::from_millis(50)));
        assert!(
            r.allow(peer(1), t0 + Duration::from_millis(110)),
            "refilled"
        );
        // a steady 10 per second passes, 20 per second only half
        let mut ok = 0;
        for i in 0..200 {
            ok += usize::from(r.allow(peer(3), t0 + Duration::from_millis(50 * i)));
        }
        assert!((105..=112).contains(&ok), "{ok}");
        // quiet peers are forgotten
        assert!(r.tracked() >= 3);
        r.allow(peer(4), t0 + Duration::from_secs(60));
        assert_eq!(r.tracked(), 1);
        // requests that cost a quarter: four times as many pass
        let t1 = t0 + Duration::from_secs(60);
        let cheap = (0..100)
            .filter(|_| r.allow_cost(peer(5), t1, MASKED_OP_COST))
            .count();
        assert_eq!(cheap, 40, "a burst of one second's worth, in quarters");
    }

    #[test]
    fn places_are_limited_per_peer_and_freed_on_drop() {
        let q = Queues::new(2);
        let a = q.enter(peer(1)).expect("first");
        let _b = q.enter(peer(1)).expect("second");
        assert_eq!(q.enter(peer(1)).expect_err("third"), 2);
        let _c = q.enter(peer(2)).expect("another peer");
        drop(a);
        let _d = q.enter(peer(1)).expect("freed");
        assert_eq!(q.peers(), 2);
    }
}
