//! A linear op in masked mode, from the client's side: quantize, mask, have the parties
//! multiply ([`Parties`]), unmask, check, and back to f32.
//!
//! With [`Parties::Local`] (`--local --privacy masked`) this process plays both parties: the
//! same arithmetic the network runs, so the same outputs, and a count of where the time
//! goes. Being both at once, it multiplies the masked words and the masks in one pass over
//! the weights (each party alone reads them once too).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use veil_kernels::ring::RingMatrix;

use super::party::{ComputeParty, Parties, SplitParties};
use super::{dequantize_product, quantize_positions, Freivalds, MaskSeed, RingFormat};
use crate::{Matrix, ModelError};

/// Where a masked model's time went and what its checks found, summed over its ops.
#[derive(Debug, Default)]
pub struct MaskedStats {
    /// Linear ops run (one per op per forward pass).
    pub ops: AtomicU64,
    /// Positions masked (words of an op's width).
    pub positions: AtomicU64,
    /// Products that failed their Freivalds check.
    pub check_failures: AtomicU64,
    /// Nanoseconds drawing masks (the mask provider and the client each draw them).
    pub mask_ns: AtomicU64,
    /// Nanoseconds in the products: the compute node's `W (x + r)` and the mask provider's
    /// `W r`, in one pass.
    pub product_ns: AtomicU64,
    /// Nanoseconds in the client's role: quantizing, masking, unmasking, checking.
    pub client_ns: AtomicU64,
}

/// [`MaskedStats`] read out: counts, and seconds per role.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MaskedTotals {
    pub ops: u64,
    pub positions: u64,
    pub check_failures: u64,
    pub masks_s: f64,
    pub products_s: f64,
    pub client_s: f64,
}

impl MaskedStats {
    fn add(counter: &AtomicU64, since: Instant) {
        counter.fetch_add(since.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }

    /// The totals so far.
    pub fn totals(&self) -> MaskedTotals {
        self.read(|c| c.load(Ordering::Relaxed))
    }

    /// The totals so far, and zero from here on.
    pub fn take(&self) -> MaskedTotals {
        self.read(|c| c.swap(0, Ordering::Relaxed))
    }

    fn read(&self, get: impl Fn(&AtomicU64) -> u64) -> MaskedTotals {
        let secs = |c: &AtomicU64| get(c) as f64 / 1e9;
        MaskedTotals {
            ops: get(&self.ops),
            positions: get(&self.positions),
            check_failures: get(&self.check_failures),
            masks_s: secs(&self.mask_ns),
            products_s: secs(&self.product_ns),
            client_s: secs(&self.client_ns),
        }
    }
}

/// One op: its integer weights, its address in the mask stream, and its check.
#[derive(Debug, Clone)]
pub struct MaskedLinear {
    w: Arc<RingMatrix>,
    op: u64,
    seed: Arc<MaskSeed>,
    /// Positions this op has masked so far: the next mask's address.
    next: Arc<AtomicU64>,
    check: Arc<Freivalds>,
    stats: Arc<MaskedStats>,
    parties: Parties,
}

impl MaskedLinear {
    /// The integer weights of op `op` for the f32 rows `w`: rounded per row to the widest
    /// integers that leave the activations `act_bits` bits
    /// ([`RingMatrix::quantize_within`]), stored as `format` says.
    pub fn ring(
        w: &Matrix,
        act_bits: u32,
        op: u64,
        format: RingFormat,
    ) -> Result<RingMatrix, ModelError> {
        let blocked = format == RingFormat::Blocked;
        RingMatrix::quantize_within(w.rows, w.cols, &w.data, act_bits, blocked)
            .map_err(|e| ModelError::Shape(format!("masked op {op}: {e}")))?
            .ok_or_else(|| {
                ModelError::Shape(format!(
                    "masked op {op}: rows of {} inputs are too wide for {act_bits}-bit \
                     activations modulo 2^32",
                    w.cols
                ))
            })
    }

    /// Op number `op` of a session with mask seed `seed`, whose weights are `w`; `check`
    /// is the client's secret for `w`.
    pub fn new(
        w: Arc<RingMatrix>,
        op: u64,
        seed: Arc<MaskSeed>,
        check: Arc<Freivalds>,
        stats: Arc<MaskedStats>,
    ) -> Self {
        MaskedLinear {
            w,
            op,
            seed,
            next: Arc::new(AtomicU64::new(0)),
            check,
            stats,
            parties: Parties::Local,
        }
    }

    /// This op with its products computed by `parties`.
    pub fn with_parties(&self, parties: Parties) -> Self {
        MaskedLinear {
            parties,
            ..self.clone()
        }
    }

    /// The op's number in the session's mask stream.
    pub fn op(&self) -> u64 {
        self.op
    }

    /// The session's mask seed (what a mask provider is given).
    pub fn seed(&self) -> &Arc<MaskSeed> {
        &self.seed
    }

    /// The op's integer weights, shared.
    pub fn weights_arc(&self) -> &Arc<RingMatrix> {
        &self.w
    }

    pub fn d_in(&self) -> usize {
        self.w.cols()
    }

    pub fn d_out(&self) -> usize {
        self.w.rows()
    }

    pub fn weights(&self) -> &RingMatrix {
        &self.w
    }

    /// `x` (`[n, d_in]`) → `x Wᵀ` (`[n, d_out]`), computed on masked words.
    pub fn forward(&self, x: &[f32], n: usize) -> Vec<f32> {
        let (rows, cols) = (self.w.rows(), self.w.cols());
        let stats = &self.stats;
        let first = self.next.fetch_add(n as u64, Ordering::Relaxed);

        // client: integers, masked
        let t = Instant::now();
        let (q, x_scales) = quantize_positions(x, n, cols, self.w.activation_bound());
        MaskedStats::add(&stats.client_ns, t);

        // the masks from the seed
        let t = Instant::now();
        let mut words = vec![0u32; 2 * n * cols];
        let (masked, r) = words.split_at_mut(n * cols);
        self.seed.fill(self.op, first, n, cols, r);
        MaskedStats::add(&stats.mask_ns, t);

        // client: the masked words (all a compute node sees)
        let t = Instant::now();
        for ((m, &x), &r) in masked.iter_mut().zip(&q).zip(r.iter()) {
            *m = (x as u32).wrapping_add(r);
        }
        MaskedStats::add(&stats.client_ns, t);

        let y = match &self.parties {
            Parties::Local => {
                // compute node, W (x + r), and mask provider, W r: one pass over the weights
                let t = Instant::now();
                let mut products = vec![0u32; 2 * n * rows];
                self.w.mul(&words, 2 * n, &mut products);
                let (wu, wr) = products.split_at(n * rows);
                MaskedStats::add(&stats.product_ns, t);
                let t = Instant::now();
                let y = unmask(wu, wr);
                if let Some(p) = self.failed_position(&q, &y, n) {
                    stats.check_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(
                        op = self.op,
                        position = first + p as u64,
                        "a masked product failed its check"
                    );
                }
                MaskedStats::add(&stats.client_ns, t);
                y
            }
            Parties::Split(parties) => {
                let (masked, r) = words.split_at(n * cols);
                self.split_products(parties, masked, r, &q, first, n)
            }
        };

        // client: back to f32
        let t = Instant::now();
        let out = dequantize_product(&y, &x_scales, self.w.scales());
        MaskedStats::add(&stats.client_ns, t);
        stats.ops.fetch_add(1, Ordering::Relaxed);
        stats.positions.fetch_add(n as u64, Ordering::Relaxed);
        out
    }

    /// The first of `n` positions whose product `y` fails its check.
    fn failed_position(&self, q: &[i32], y: &[i32], n: usize) -> Option<usize> {
        let (rows, cols) = (self.w.rows(), self.w.cols());
        (0..n).find(|&p| {
            !self
                .check
                .holds(&q[p * cols..(p + 1) * cols], &y[p * rows..(p + 1) * rows])
        })
    }

    /// `W x` from separate parties (see `party`): the first mask provider and compute
    /// replica not yet caught, checked, and on a mismatch found out and replaced.
    fn split_products(
        &self,
        s: &SplitParties,
        masked: &[u32],
        r: &[u32],
        q: &[i32],
        first: u64,
        n: usize,
    ) -> Vec<i32> {
        let (op, rows) = (self.op, self.w.rows());
        let stats = &self.stats;
        let own_wr = || {
            let mut out = vec![0u32; n * rows];
            self.w.mul(r, n, &mut out);
            out
        };
        let t = Instant::now();
        // the masks' products and the first replica's answer, asked at once
        let replicas: Vec<&Arc<dyn ComputeParty>> = s
            .compute
            .iter()
            .filter(|c| !s.is_caught(&c.name()))
            .collect();
        let (provided, mut first_answer) = rayon::join(
            || {
                for p in s.providers.iter().filter(|p| !s.is_caught(&p.name())) {
                    match p.mask_products(op, first, n) {
                        Ok(v) if v.len() == n * rows => return Some((p.name(), v)),
                        Ok(v) => {
                            tracing::warn!("masked op {op}: {} sent {} words", p.name(), v.len());
                            s.catch(p.name(), "mask provider", op, first);
                        }
                        Err(e) => tracing::warn!("masked op {op}: {e}"),
                    }
                }
                None
            },
            || replicas.first().map(|c| c.products(op, masked, n)),
        );
        let (mut provider, mut wr) = match provided {
            Some((name, v)) => (Some(name), v),
            None => {
                tracing::warn!(
                    "masked op {op}: no mask provider answered; the client computes the \
                     masks' products"
                );
                (None, own_wr())
            }
        };
        let mut own: Option<Vec<u32>> = None;
        for c in replicas {
            let answer = first_answer
                .take()
                .unwrap_or_else(|| c.products(op, masked, n));
            let wu = match answer {
                Ok(v) if v.len() == n * rows => v,
                Ok(v) => {
                    tracing::warn!("masked op {op}: {} sent {} words", c.name(), v.len());
                    s.catch(c.name(), "compute node", op, first);
                    continue;
                }
                Err(e) if e.reason.starts_with("skipped") => {
                    tracing::debug!("masked op {op}: {e}");
                    continue;
                }
                Err(e) => {
                    tracing::warn!("masked op {op}: {e}; trying the next replica");
                    continue;
                }
            };
            let y = unmask(&wu, &wr);
            if self.failed_position(q, &y, n).is_none() {
                MaskedStats::add(&stats.product_ns, t);
                return y;
            }
            stats.check_failures.fetch_add(1, Ordering::Relaxed);
            // who lied: the masks' products against the client's own
            let mine = own.get_or_insert_with(own_wr);
            if *mine != wr {
                if let Some(name) = provider.take() {
                    s.catch(name, "mask provider", op, first);
                }
                wr = mine.clone();
                let y = unmask(&wu, &wr);
                if self.failed_position(q, &y, n).is_none() {
                    MaskedStats::add(&stats.product_ns, t);
                    return y;
                }
            }
            s.catch(c.name(), "compute node", op, first);
        }
        tracing::error!(
            "masked op {op}: no compute replica left that answers correctly; the client \
             computes it"
        );
        let words: Vec<u32> = q.iter().map(|&v| v as u32).collect();
        let mut wx = vec![0u32; n * rows];
        self.w.mul(&words, n, &mut wx);
        MaskedStats::add(&stats.product_ns, t);
        wx.into_iter().map(|v| v as i32).collect()
    }
}

/// `W u - W r`, lifted to signed integers.
fn unmask(wu: &[u32], wr: &[u32]) -> Vec<i32> {
    wu.iter()
        .zip(wr)
        .map(|(&a, &b)| a.wrapping_sub(b) as i32)
        .collect()
}
