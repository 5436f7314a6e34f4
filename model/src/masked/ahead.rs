//! Masks' products fetched ahead: a mask provider never sees anything derived from the
//! client's inputs, only the seed, op and positions, so the client can ask it for the
//! products of the next several decode positions of an op at once. One request (and one
//! pass over the op's weights, a matrix-matrix product) then serves that many tokens
//! instead of one: decode asks the provider an eighth as often, a provider's pass over
//! `k` positions costs far less than `k` passes, and the next positions' products are
//! asked for in the background while the client waits on its compute nodes.
//!
//! Masks are never reused: every position of an op has its own, whether it is used or
//! not, so fetching ahead changes nothing a node sees but how often it is asked.

use std::collections::HashMap;
use std::sync::{mpsc, Arc, Mutex, OnceLock};

use super::party::{MaskParty, PartyError};

/// Decode positions whose masks' products are fetched in one request.
pub const MASK_POSITIONS_AHEAD: usize = 8;

/// The products one request fetched for an op: positions `first..first + n`.
#[derive(Debug)]
struct Held {
    first: u64,
    n: usize,
    words: Vec<u32>,
}

impl Held {
    /// The products of positions `first..first + n`, if this holds them all.
    fn get(&self, first: u64, n: usize) -> Option<Vec<u32>> {
        let rows = self.words.len() / self.n.max(1);
        let start = usize::try_from(first.checked_sub(self.first)?).ok()?;
        (start + n <= self.n).then(|| self.words[start * rows..(start + n) * rows].to_vec())
    }

    fn end(&self) -> u64 {
        self.first + self.n as u64
    }
}

type Answer = Result<Vec<u32>, PartyError>;

/// One op's products: those held, and the next ones' request if it is under way.
#[derive(Debug, Default)]
struct OpAhead {
    held: Option<Held>,
    /// The first position of the request under way, and where its answer will arrive.
    next: Option<(u64, mpsc::Receiver<Answer>)>,
}

/// A mask provider asked for `ahead` positions whenever the client needs fewer (decode),
/// and answered from what it sent while the client's positions fall inside it; before they
/// are all used (when depends on the op: [`refill_at`]), the next `ahead` are asked for in
/// the background, so that decode rarely waits for the provider. Requests of at least
/// `ahead` positions (a prefill) go straight through, and the `ahead` positions after them
/// are asked for in the background.
#[derive(Debug)]
pub struct MasksAhead {
    inner: Arc<dyn MaskParty>,
    ahead: usize,
    ops: Mutex<HashMap<u64, Arc<Mutex<OpAhead>>>>,
}

impl MasksAhead {
    pub fn new(inner: Arc<dyn MaskParty>, ahead: usize) -> Self {
        MasksAhead {
            inner,
            ahead: ahead.max(1),
            ops: Mutex::new(HashMap::new()),
        }
    }

    /// Positions `first..first + ahead` of `op`, as held products (or the provider's
    /// answer as it is, when it is not whole positions: the caller's check catches it).
    fn fetched(&self, first: u64, answer: Answer) -> Result<Held, Answer> {
        match answer {
            Ok(words) if !words.is_empty() && words.len().is_multiple_of(self.ahead) => Ok(Held {
                first,
                n: self.ahead,
                words,
            }),
            other => Err(other),
        }
    }

    /// Ask for positions `first..first + ahead` of `op` in the background.
    fn request_next(&self, op: u64, first: u64, state: &mut OpAhead) {
        // without threads, the next request is made when it is needed
        let Some(pool) = ahead_pool() else { return };
        let (tx, rx) = mpsc::sync_channel(1);
        let (inner, n) = (self.inner.clone(), self.ahead);
        pool.spawn(move || {
            let _ = tx.send(inner.mask_products(op, first, n));
        });
        state.next = Some((first, rx));
    }
}

/// Positions left of an op's held products when its next ones are asked for: from 1 to
/// `ahead - 1` by op, so that the ops of a model ask on different tokens (all at once,
/// the provider's work for every op lands on one decode step).
fn refill_at(op: u64, ahead: usize) -> u64 {
    match ahead {
        0..=2 => 1,
        _ => 1 + op % (ahead as u64 - 1),
    }
}

/// The threads that make background requests: a pool of their own, so that a local
/// provider's product (which runs on the pool it is called from) never waits for the
/// workers of the client's pool, which may all be waiting for it.
fn ahead_pool() -> Option<&'static rayon::ThreadPool> {
    static POOL: OnceLock<Option<rayon::ThreadPool>> = OnceLock::new();
    POOL.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(std::thread::available_parallelism().map_or(2, |n| n.get()))
            .thread_name(|i| format!("veil-masks-ahead-{i}"))
            .build()
            .map_err(|e| tracing::warn!("no threads to fetch masks ahead: {e}"))
            .ok()
    })
    .as_ref()
}

impl MaskParty for MasksAhead {
    fn name(&self) -> String {
        self.inner.name()
    }

    fn mask_products(&self, op: u64, first: u64, n: usize) -> Answer {
        let slot = self
            .ops
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(op)
            .or_default()
            .clone();
        if n >= self.ahead {
            let answer = self.inner.mask_products(op, first, n);
            // the decode that follows a prefill starts at its end: ask for that now (what
            // was asked for before, for another position, is dropped)
            let mut state = slot.lock().unwrap_or_else(|e| e.into_inner());
            if answer.is_ok() {
                state.held = None;
                self.request_next(op, first + n as u64, &mut state);
            }
            return answer;
        }
        let mut state = slot.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(h) = &state.held {
                if let Some(words) = h.get(first, n) {
                    let end = h.end();
                    let left = end - (first + n as u64);
                    if state.next.is_none() && left <= refill_at(op, self.ahead) {
                        self.request_next(op, end, &mut state);
                    }
                    return Ok(words);
                }
            }
            state.held = None;
            let answer = match state.next.take() {
                Some((next, rx)) if next == first => rx.recv().unwrap_or_else(|_| {
                    // the thread ended without an answer: ask again here
                    self.inner.mask_products(op, first, self.ahead)
                }),
                _ => self.inner.mask_products(op, first, self.ahead),
            };
            match self.fetched(first, answer) {
                Ok(h) => state.held = Some(h),
                Err(answer) => return answer,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::masked::{LocalParty, MaskSeed};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use veil_kernels::ring::{Ints, RingMatrix};

    /// A provider that counts the positions it is asked for.
    #[derive(Debug)]
    struct Counting(LocalParty, AtomicUsize, AtomicUsize);

    impl MaskParty for Counting {
        fn name(&self) -> String {
            "counting".into()
        }
        fn mask_products(&self, op: u64, first: u64, n: usize) -> Result<Vec<u32>, PartyError> {
            self.1.fetch_add(1, Ordering::Relaxed);
            self.2.fetch_add(n, Ordering::Relaxed);
            self.0.mask_products(op, first, n)
        }
    }

    #[test]
    fn decode_positions_are_answered_from_one_request_and_equal_the_providers() {
        let w = RingMatrix::from_parts(3, 2, Ints::I8(vec![1, -2, 3, 4, -5, 6]), vec![1.0; 3])
            .expect("sizes");
        let ops = Arc::new(HashMap::from([(4, Arc::new(w.clone())), (9, Arc::new(w))]));
        let local = LocalParty::new("p", ops, Some(Arc::new(MaskSeed::new([5; 32]))));
        let counting = Arc::new(Counting(local.clone(), 0.into(), 0.into()));
        let ahead = MasksAhead::new(counting.clone(), 4);
        // a prefill of 6 goes straight through; then 9 decode positions of two ops
        assert_eq!(ahead.mask_products(4, 0, 6), local.mask_products(4, 0, 6));
        for p in 6..15 {
            for op in [4, 9] {
                assert_eq!(
                    ahead.mask_products(op, p, 1),
                    local.mask_products(op, p, 1),
                    "op {op} position {p}"
                );
            }
        }
        // 1 prefill request, then per op positions 6..10, 10..14 and 14..18: op 4's first
        // ones asked for in the background after its prefill, the others when 2 (op 4) or 1
        // (op 9) of the positions held were left
        assert_eq!(counting.1.load(Ordering::Relaxed), 1 + 2 * 3);
        assert_eq!(counting.2.load(Ordering::Relaxed), 6 + 2 * 3 * 4);
        // a position before what is held (a replay) is fetched again, correctly
        assert_eq!(ahead.mask_products(4, 7, 1), local.mask_products(4, 7, 1));
        assert_eq!(counting.1.load(Ordering::Relaxed), 1 + 2 * 3 + 1);
        for p in 8..20 {
            assert_eq!(ahead.mask_products(4, p, 1), local.mask_products(4, p, 1));
        }
        assert_eq!(ahead.name(), "counting");
    }

    #[test]
    fn every_worker_of_the_pool_waiting_leaves_the_background_requests_room() {
        // each of the global pool's workers decodes with a local provider, whose products
        // use the pool they run on: were the background requests made on this pool, every
        // worker could end up waiting for one that no worker is free to run
        let (done, finished) = mpsc::channel();
        std::thread::spawn(move || {
            rayon::broadcast(|ctx| {
                // rows enough for the product to be split among workers
                let (rows, cols) = (512, 8);
                let ints = (0..rows * cols).map(|i| (i % 251) as i8).collect();
                let w = RingMatrix::from_parts(rows, cols, Ints::I8(ints), vec![1.0; rows])
                    .expect("sizes");
                let local = LocalParty::new(
                    "p",
                    Arc::new(HashMap::from([(0, Arc::new(w))])),
                    Some(Arc::new(MaskSeed::new([ctx.index() as u8; 32]))),
                );
                let ahead = MasksAhead::new(Arc::new(local.clone()), 4);
                for p in 0..200 {
                    assert_eq!(ahead.mask_products(0, p, 1), local.mask_products(0, p, 1));
                }
            });
            let _ = done.send(());
        });
        // a deadlock fails the test instead of hanging it
        finished
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("decode finished: no background request was left waiting");
    }

    #[test]
    fn ops_ask_for_their_next_positions_on_different_tokens() {
        // any `ahead - 1` consecutive ops (a model's are numbered in order) ask when
        // 1, 2, … `ahead - 1` of their positions are left: one each
        for ahead in [3, 4, 8, 16] {
            for start in 0..20u64 {
                let mut at: Vec<u64> = (start..start + ahead as u64 - 1)
                    .map(|op| refill_at(op, ahead))
                    .collect();
                at.sort_unstable();
                assert_eq!(at, (1..ahead as u64).collect::<Vec<_>>(), "{ahead} ahead");
            }
        }
        assert_eq!(refill_at(5, 1), 1);
        assert_eq!(refill_at(5, 2), 1);
    }

    #[test]
    fn errors_and_bad_lengths_pass_through() {
        #[derive(Debug)]
        struct Short;
        impl MaskParty for Short {
            fn name(&self) -> String {
                "short".into()
            }
            fn mask_products(&self, op: u64, _: u64, n: usize) -> Result<Vec<u32>, PartyError> {
                if op == 1 {
                    return Err(PartyError {
                        party: "short".into(),
                        reason: "down".into(),
                    });
                }
                Ok(vec![0; 2 * n + 1])
            }
        }
        let ahead = MasksAhead::new(Arc::new(Short), 4);
        assert!(ahead.mask_products(1, 0, 1).is_err());
        assert_eq!(ahead.mask_products(2, 0, 1).map(|v| v.len()), Ok(9));
    }
}
