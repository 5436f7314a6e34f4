//! The MLP's gated activation `act(gate) * up` in one pass over the fused `[gate | up]`
//! product, for SiLU (Llama, Qwen) and GELU's tanh approximation (Gemma).
//!
//! Both are `g / (1 + e^z)` for some `z` of the gate value `g`:
//! - SiLU: `g σ(g)`, `z = -g`;
//! - GELU (tanh form): `g/2 (1 + tanh u) = g σ(2u)`, `u = √(2/π) (g + 0.044715 g³)`, so
//!   `z = -2u` — one exponential instead of libm's `tanhf`, with no cancellation near
//!   `tanh u = -1`.
//!
//! The exponential is our own: a Cody–Waite reduction `e^z = 2^k e^r`, `|r| ≤ ln2/2`, and a
//! degree-6 Taylor polynomial for `e^r` (truncation below 1e-7 relative, about one f32
//! ulp), with no branches or calls so that the compiler vectorises the loop. The same
//! source is compiled twice — portably and with AVX2 enabled, chosen at run time — and
//! uses no fused multiply-adds, so both give the same bits.

/// The activation on the gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    Silu,
    GeluTanh,
}

const SQRT_2_OVER_PI: f32 = 0.797_884_6;

/// `e^z` for `z` in f32's range (clamped to it), within a few ulp (4e-7 relative).
#[inline(always)]
fn exp(z: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that k * LN2_HI is exact for |k| < 2^9
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // adding and subtracting 1.5 * 2^23 rounds to the nearest integer
    const ROUND: f32 = 12_582_912.0;
    let z = z.clamp(-87.0, 88.0);
    let k = (z * LOG2E + ROUND) - ROUND;
    let r = (z - k * LN2_HI) - k * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    p * f32::from_bits(((k as i32 + 127) as u32) << 23)
}

#[inline(always)]
fn act(g: f32, gate: Gate) -> f32 {
    let z = match gate {
        Gate::Silu => -g,
        Gate::GeluTanh => -2.0 * SQRT_2_OVER_PI * (g + 0.044_715 * (g * g * g)),
    };
    g / (1.0 + exp(z))
}

#[inline(always)]
fn gated_rows(gu: &[f32], f: usize, out: &mut [f32], gate: Gate) {
    for (row, o) in gu.chunks_exact(2 * f).zip(out.chunks_exact_mut(f)) {
        let (g, u) = row.split_at(f);
        match gate {
            Gate::Silu => {
                for ((o, g), u) in o.iter_mut().zip(g).zip(u) {
                    *o = act(*g, Gate::Silu) * u;
                }
            }
            Gate::GeluTanh => {
                for ((o, g), u) in o.iter_mut().zip(g).zip(u) {
                    *o = act(*g, Gate::GeluTanh) * u;
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn gated_rows_avx2(gu: &[f32], f: usize, out: &mut [f32], gate: Gate) {
    gated_rows(gu, f, out, gate)
}

/// `act(gate) * up` of every row of `gu` (`[n, 2f]`: each row's `f` gate values, then its
/// `f` up values), as `[n, f]`.
///
/// # Panics
/// If `gu` is not a whole number of `2f`-wide rows.
pub fn gated(gu: &[f32], f: usize, gate: Gate) -> Vec<f32> {
    assert!(
        f > 0 && gu.len().is_multiple_of(2 * f),
        "[gate | up] rows of 2 x {f}"
    );
    let mut out = vec![0.0; gu.len() / 2];
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::has(crate::Isa::Avx2) {
        // SAFETY: the CPU has AVX2 (checked at run time).
        #[allow(unsafe_code)]
        unsafe {
            gated_rows_avx2(gu, f, &mut out, gate)
        };
        return out;
    }
    gated_rows(gu, f, &mut out, gate);
    out
}

/// The portable loop, whatever the CPU (for tests of the dispatched one).
pub fn gated_portable(gu: &[f32], f: usize, gate: Gate) -> Vec<f32> {
    let mut out = vec![0.0; gu.len() / 2];
    gated_rows(gu, f, &mut out, gate);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(g: f64, gate: Gate) -> f64 {
        match gate {
            Gate::Silu => g / (1.0 + (-g).exp()),
            Gate::GeluTanh => {
                let u = (2.0 / std::f64::consts::PI).sqrt() * (g + 0.044715 * g * g * g);
                0.5 * g * (1.0 + u.tanh())
            }
        }
    }

    #[test]
    fn exp_is_within_a_few_ulp_over_the_range() {
        let mut z = -87.0f32;
        while z < 88.0 {
            let (got, want) = (f64::from(exp(z)), f64::from(z).exp());
            assert!(((got - want) / want).abs() < 4e-7, "e^{z}: {got} vs {want}");
            z += 0.013;
        }
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(-1000.0) > 0.0 && exp(1000.0).is_finite());
    }

    #[test]
    fn both_activations_match_the_f64_formulas() {
        for gate in [Gate::Silu, Gate::GeluTanh] {
            let mut g = -30.0f32;
            while g < 30.0 {
                let (got, want) = (f64::from(act(g, gate)), reference(f64::from(g), gate));
                // f32 rounding of `z` (up to ~10 here) dominates: 5e-6 relative
                assert!(
                    (got - want).abs() <= 5e-6 * want.abs().max(2e-2),
                    "{gate:?}({g}): {got} vs {want}"
                );
                g += 0.0037;
            }
            // far tails: the identity and zero
            assert_eq!(act(200.0, gate), 200.0);
            assert!(act(-200.0, gate).abs() < 1e-30);
        }
    }

    #[test]
    fn the_dispatched_loop_gives_the_portable_bits() {
        let (n, f) = (3, 37);
        let gu: Vec<f32> = (0..n * 2 * f)
            .map(|i| ((i * 7919) % 1000) as f32 / 50.0 - 10.0)
            .collect();
        for gate in [Gate::Silu, Gate::GeluTanh] {
            let fast = gated(&gu, f, gate);
            let slow = gated_portable(&gu, f, gate);
            assert_eq!(fast.len(), n * f);
            for (a, b) in fast.iter().zip(&slow) {
                assert_eq!(a.to_bits(), b.to_bits());
            }
            // row 1, column 5: act(gate) * up
            let (g, u) = (gu[2 * f + 5], gu[2 * f + f + 5]);
            assert_eq!(slow[f + 5], act(g, gate) * u);
        }
    }
}
