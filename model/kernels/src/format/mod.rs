//! GGML's tensor types: names, block layouts, and per-format dequantization, bit-exact with
//! ggml's `dequantize_row_*` and the `gguf` Python package (the same f32 operations in the
//! same order, no fused multiply-adds). One file per format.

mod bf16;
mod f16;
mod k_scales;
mod q2_k;
mod q3_k;
mod q4_0;
mod q4_1;
pub mod q4_k;
mod q5_0;
mod q5_1;
mod q5_k;
mod q6_k;
mod q8_0;
mod q8_k;

#[cfg(test)]
mod tests;

pub use q8_0::quantize as quantize_q8_0;

/// Why values cannot be quantized.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantizeError {
    #[error("Veil writes F32, F16, Q8_0, Q4_0 and Q4_K, not {0}")]
    Unsupported(GgmlType),
    #[error("{len} values are not whole {ty} blocks of {block}")]
    PartialBlock {
        ty: GgmlType,
        len: usize,
        block: usize,
    },
}

/// Elements per block of the 32-element formats (Q4_0 … Q8_0).
pub const QK: usize = 32;
/// Elements per block ("super-block") of the k-quant formats (Q2_K … Q8_K).
pub const QK_K: usize = 256;

/// A GGML tensor type. The ones Veil reads have their own variant; the others keep their
/// id so that an error can name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_K,
    /// A type id Veil knows at most by name and cannot read.
    Other(u32),
}

impl GgmlType {
    /// Every type Veil reads.
    pub const READABLE: [GgmlType; 14] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q2_K,
        GgmlType::Q3_K,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
        GgmlType::Q8_K,
    ];

    /// The type with GGML id `id` (`ggml_type` in ggml.h).
    pub fn from_id(id: u32) -> Self {
        match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            6 => GgmlType::Q5_0,
            7 => GgmlType::Q5_1,
            8 => GgmlType::Q8_0,
            10 => GgmlType::Q2_K,
            11 => GgmlType::Q3_K,
            12 => GgmlType::Q4_K,
            13 => GgmlType::Q5_K,
            14 => GgmlType::Q6_K,
            15 => GgmlType::Q8_K,
            30 => GgmlType::BF16,
            other => GgmlType::Other(other),
        }
    }

    /// The GGML id.
    pub fn id(&self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q5_0 => 6,
            GgmlType::Q5_1 => 7,
            GgmlType::Q8_0 => 8,
            GgmlType::Q2_K => 10,
            GgmlType::Q3_K => 11,
            GgmlType::Q4_K => 12,
            GgmlType::Q5_K => 13,
            GgmlType::Q6_K => 14,
            GgmlType::Q8_K => 15,
            GgmlType::BF16 => 30,
            GgmlType::Other(id) => *id,
        }
    }

    /// The name ggml and llama.cpp use (`Q4_K`, `BF16`, …).
    pub fn name(&self) -> String {
        let known = match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::BF16 => "BF16",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q5_0 => "Q5_0",
            GgmlType::Q5_1 => "Q5_1",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q2_K => "Q2_K",
            GgmlType::Q3_K => "Q3_K",
            GgmlType::Q4_K => "Q4_K",
            GgmlType::Q5_K => "Q5_K",
            GgmlType::Q6_K => "Q6_K",
            GgmlType::Q8_K => "Q8_K",
            GgmlType::Other(id) => match id {
                9 => "Q8_1",
                16 => "IQ2_XXS",
                17 => "IQ2_XS",
                18 => "IQ3_XXS",
                19 => "IQ1_S",
                20 => "IQ4_NL",
                21 => "IQ3_S",
                22 => "IQ2_S",
                23 => "IQ4_XS",
                24 => "I8",
                25 => "I16",
                26 => "I32",
                27 => "I64",
                28 => "F64",
                29 => "IQ1_M",
                34 => "TQ1_0",
                35 => "TQ2_0",
                39 => "MXFP4",
                _ => return format!("type id {id}"),
            },
        };
        known.to_string()
    }

    /// Elements per block and bytes per block, or `None` for a type Veil cannot read.
    pub fn block_layout(&self) -> Option<(usize, usize)> {
        Some(match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 | GgmlType::BF16 => (1, 2),
            GgmlType::Q4_0 => (QK, q4_0::BLOCK_BYTES),
            GgmlType::Q4_1 => (QK, q4_1::BLOCK_BYTES),
            GgmlType::Q5_0 => (QK, q5_0::BLOCK_BYTES),
            GgmlType::Q5_1 => (QK, q5_1::BLOCK_BYTES),
            GgmlType::Q8_0 => (QK, q8_0::BLOCK_BYTES),
            GgmlType::Q2_K => (QK_K, q2_k::BLOCK_BYTES),
            GgmlType::Q3_K => (QK_K, q3_k::BLOCK_BYTES),
            GgmlType::Q4_K => (QK_K, q4_k::BLOCK_BYTES),
            GgmlType::Q5_K => (QK_K, q5_k::BLOCK_BYTES),
            GgmlType::Q6_K => (QK_K, q6_k::BLOCK_BYTES),
            GgmlType::Q8_K => (QK_K, q8_k::BLOCK_BYTES),
            GgmlType::Other(_) => return None,
        })
    }

    /// Bytes taken by `n_elements` of this type; `None` if the type is unreadable or the
    /// count is not a whole number of blocks.
    pub fn byte_size(&self, n_elements: usize) -> Option<usize> {
        let (per_block, bytes) = self.block_layout()?;
        if !n_elements.is_multiple_of(per_block) {
            return None;
        }
        (n_elements / per_block).checked_mul(bytes)
    }

    /// Dequantize `bytes` (exactly `byte_size(out.len())` of them) into `out`.
    ///
    /// # Panics
    /// If the lengths disagree or the type is unreadable; callers check with
    /// [`GgmlType::byte_size`] first.
    pub fn dequantize(&self, bytes: &[u8], out: &mut [f32]) {
        assert_eq!(
            self.byte_size(out.len()),
            Some(bytes.len()),
            "{}: {} bytes cannot hold {} values",
            self.name(),
            bytes.len(),
            out.len()
        );
        match self {
            GgmlType::F32 => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                    *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            GgmlType::F16 => f16::dequantize(bytes, out),
            GgmlType::BF16 => bf16::dequantize(bytes, out),
            GgmlType::Q4_0 => q4_0::dequantize(bytes, out),
            GgmlType::Q4_1 => q4_1::dequantize(bytes, out),
            GgmlType::Q5_0 => q5_0::dequantize(bytes, out),
            GgmlType::Q5_1 => q5_1::dequantize(bytes, out),
            GgmlType::Q8_0 => q8_0::dequantize(bytes, out),
            GgmlType::Q2_K => q2_k::dequantize(bytes, out),
            GgmlType::Q3_K => q3_k::dequantize(bytes, out),
            GgmlType::Q4_K => q4_k::dequantize(bytes, out),
            GgmlType::Q5_K => q5_k::dequantize(bytes, out),
            GgmlType::Q6_K => q6_k::dequantize(bytes, out),
            GgmlType::Q8_K => q8_k::dequantize(bytes, out),
            GgmlType::Other(_) => unreachable!("byte_size is None for unreadable types"),
        }
    }
}

impl GgmlType {
    /// The types Veil writes (shards are re-quantized into one of these).
    pub const WRITABLE: [GgmlType; 5] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::Q8_0,
        GgmlType::Q4_0,
        GgmlType::Q4_K,
    ];

    /// Append `x` in this format to `out`; `x` must be whole blocks.
    pub fn quantize(&self, x: &[f32], out: &mut Vec<u8>) -> Result<(), QuantizeError> {
        if !Self::WRITABLE.contains(self) {
            return Err(QuantizeError::Unsupported(*self));
        }
        let (block, _) = self
            .block_layout()
            .ok_or(QuantizeError::Unsupported(*self))?;
        if !x.len().is_multiple_of(block) {
            return Err(QuantizeError::PartialBlock {
                ty: *self,
                len: x.len(),
                block,
            });
        }
        match self {
            GgmlType::F32 => out.extend(x.iter().flat_map(|v| v.to_le_bytes())),
            GgmlType::F16 => {
                out.extend(x.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()))
            }
            GgmlType::Q8_0 => q8_0::quantize(x, out),
            GgmlType::Q4_0 => q4_0::quantize(x, out),
            GgmlType::Q4_K => q4_k::quantize(x, out),
            _ => return Err(QuantizeError::Unsupported(*self)),
        }
        Ok(())
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

/// The little-endian f16 at `b[i..i + 2]`, as f32 (exact).
#[inline]
fn f16_at(b: &[u8], i: usize) -> f32 {
    half::f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}
