//! Masked mode: nodes compute on uniformly random numbers.
//!
//! With public weights, any transform folded into the weights can be solved for (see
//! SECURITY.md), so masked mode hides activations the other way: each linear op's input is
//! quantized to integers `x` per position and sent as `x + r (mod 2^32)` with `r` uniform
//! ([`mask`]); a compute node returns `W (x + r)`, a mask provider — who never sees
//! anything derived from `x` — returns `W r`, and the client subtracts and lifts the
//! difference to a signed integer: exactly `W x`, since the activations are quantized
//! narrowly enough that `|W x| < 2^31` ([`quant`]). A Freivalds check ([`freivalds`])
//! catches a wrong answer from either party with probability at least `1 - 2^-60`.
//!
//! The products themselves are `veil_kernels::ring`'s. This module holds what the client
//! and the local path share; [`MaskedLinear`] runs both parties in this process (the
//! local path, `--privacy masked` with the mask provider `local`).

pub mod ahead;
pub mod freivalds;
pub mod linear;
pub mod mask;
pub mod party;
pub mod quant;

pub use ahead::{MasksAhead, MASK_POSITIONS_AHEAD};
pub use freivalds::Freivalds;
pub use linear::{MaskedLinear, MaskedStats, MaskedTotals};
pub use mask::MaskSeed;
pub use party::{
    ComputeParty, Detection, LocalParty, MaskParty, Parties, PartyError, SplitParties,
};
pub use quant::{dequantize_product, quantize_positions};

/// Bits (sign included) each activation keeps in masked mode; the weights get the rest of
/// the 31 that an exact product may use. Measured on SmolLM2 (`veil perplexity --file
/// model/tests/data/prose.txt --ctx 256 --privacy masked`, against the exact plaintext
/// model): 10 bits, top-1 agreement 99.1% and mean KL 0.0010 nats; 12 bits, 99.4% and
/// 0.0001; 14 bits, 98.7% and 0.0001 (narrower weights); int8 weights with all the
/// remaining bits for the activations, 95.1% and 0.0028 — llama.cpp's own 8-bit
/// activations reach 95.8% and 0.0028 on the same text.
pub const ACTIVATION_BITS: u32 = 12;

/// How an op's integer weights are stored, which sets both their precision and the bytes a
/// product reads. The client and every party of a session must use the same (the node is
/// told when the session opens): the integers differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RingFormat {
    /// Each row's integers (10-13 bits on SmolLM2) in two bytes: the precision
    /// `--exact` asks for.
    Wide,
    /// The same widths, each block of 32 a byte per weight times a multiplier
    /// (`veil_kernels::ring::Ints::Blocked`): half the bytes, so about half the time of a
    /// decode product (memory-bound), at each block's grid being int8's. The default, with
    /// 8-bit activations in the head, as llama.cpp trades precision for speed.
    Blocked,
}

impl RingFormat {
    /// The format for a session at `precision`.
    pub fn for_precision(precision: veil_kernels::Precision) -> RingFormat {
        match precision {
            veil_kernels::Precision::Exact => RingFormat::Wide,
            veil_kernels::Precision::Fast => RingFormat::Blocked,
        }
    }
}

/// What one position costs in masked mode's traffic, for a model of shape `c`: four round
/// trips per layer, the masked words sent to the compute nodes, and the words that come
/// back from them and from the mask providers (4 bytes each).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Traffic {
    pub round_trips: u64,
    pub bytes_to_nodes: u64,
    pub bytes_from_nodes: u64,
    pub bytes_from_providers: u64,
}

impl Traffic {
    pub fn per_position(c: &crate::LlamaConfig) -> Traffic {
        let (d, f) = (c.d_model as u64, c.d_ff as u64);
        let (q, kv) = (
            (c.n_heads * c.head_dim) as u64,
            (c.n_kv_heads * c.head_dim) as u64,
        );
        // (inputs, outputs) of query|key|value, output, gate|up, down
        let ops = [(d, q + 2 * kv), (q, d), (d, 2 * f), (f, d)];
        let layers = c.n_layers as u64;
        let ins: u64 = ops.iter().map(|o| o.0).sum();
        let outs: u64 = ops.iter().map(|o| o.1).sum();
        Traffic {
            round_trips: 4 * layers,
            bytes_to_nodes: 4 * ins * layers,
            bytes_from_nodes: 4 * outs * layers,
            bytes_from_providers: 4 * outs * layers,
        }
    }
}

/// A stage's linear ops as integers: (op number, weights), in order.
pub type StageOps = Vec<(u64, std::sync::Arc<veil_kernels::ring::RingMatrix>)>;

/// How a generation hides its activations from the nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Privacy {
    /// The key's rotations and permutations folded into the weights (the encrypted
    /// shards): cheap, but a node that knows the public weights can solve for the key.
    #[default]
    Rotated,
    /// Activations masked with fresh uniform numbers before every linear op: nodes see
    /// nothing but uniform words, whether the weights are public or not.
    Masked,
}

impl Privacy {
    pub fn name(&self) -> &'static str {
        match self {
            Privacy::Rotated => "rotated",
            Privacy::Masked => "masked",
        }
    }
}

impl std::str::FromStr for Privacy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "rotated" => Ok(Privacy::Rotated),
            "masked" => Ok(Privacy::Masked),
            other => Err(format!(
                "unknown privacy mode `{other}` (rotated or masked)"
            )),
        }
    }
}

impl std::fmt::Display for Privacy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
