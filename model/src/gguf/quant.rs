//! GGML tensor types and their dequantisation to f32.

use half::f16;

/// Block layouts of the GGML tensor types that Veil can dequantise, plus the type ids of
/// the others so that an error can name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q8_0,
    /// A type id Veil knows by name but cannot dequantise.
    Other(u32),
}

const QK: usize = 32;

impl GgmlType {
    pub fn from_id(id: u32) -> Self {
        match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            8 => GgmlType::Q8_0,
            other => GgmlType::Other(other),
        }
    }

    pub fn name(&self) -> String {
        let known = match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Other(id) => match id {
                6 => "Q5_0",
                7 => "Q5_1",
                9 => "Q8_1",
                10 => "Q2_K",
                11 => "Q3_K",
                12 => "Q4_K",
                13 => "Q5_K",
                14 => "Q6_K",
                15 => "Q8_K",
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
                30 => "BF16",
                34 => "TQ1_0",
                35 => "TQ2_0",
                _ => return format!("type id {id}"),
            },
        };
        known.to_string()
    }

    /// Elements per block and bytes per block, or `None` for a type Veil cannot read.
    pub fn block_layout(&self) -> Option<(usize, usize)> {
        match self {
            GgmlType::F32 => Some((1, 4)),
            GgmlType::F16 => Some((1, 2)),
            GgmlType::Q4_0 => Some((QK, 2 + QK / 2)),
            GgmlType::Q4_1 => Some((QK, 4 + QK / 2)),
            GgmlType::Q8_0 => Some((QK, 2 + QK)),
            GgmlType::Other(_) => None,
        }
    }

    /// Bytes taken by `n_elements` of this type; `None` if the type is unreadable or the
    /// count is not a whole number of blocks.
    pub fn byte_size(&self, n_elements: usize) -> Option<usize> {
        let (per_block, bytes) = self.block_layout()?;
        if n_elements % per_block != 0 {
            return None;
        }
        (n_elements / per_block).checked_mul(bytes)
    }

    /// Dequantise `bytes` (exactly `byte_size(n)` of them) into `out` (`n` floats).
    ///
    /// # Panics
    /// Never for lengths obtained from [`GgmlType::byte_size`]; callers check them first.
    pub fn dequantize(&self, bytes: &[u8], out: &mut [f32]) {
        match self {
            GgmlType::F32 => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                    *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            GgmlType::F16 => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
                }
            }
            GgmlType::Q8_0 => {
                for (o, b) in out.chunks_exact_mut(QK).zip(bytes.chunks_exact(2 + QK)) {
                    let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
                    for (x, &q) in o.iter_mut().zip(&b[2..]) {
                        *x = f32::from(q as i8) * d;
                    }
                }
            }
            GgmlType::Q4_0 => {
                for (o, b) in out.chunks_exact_mut(QK).zip(bytes.chunks_exact(2 + QK / 2)) {
                    let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
                    let (lo, hi) = o.split_at_mut(QK / 2);
                    for (j, &q) in b[2..].iter().enumerate() {
                        lo[j] = (f32::from(q & 0x0F) - 8.0) * d;
                        hi[j] = (f32::from(q >> 4) - 8.0) * d;
                    }
                }
            }
            GgmlType::Q4_1 => {
                for (o, b) in out.chunks_exact_mut(QK).zip(bytes.chunks_exact(4 + QK / 2)) {
                    let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
                    let m = f16::from_le_bytes([b[2], b[3]]).to_f32();
                    let (lo, hi) = o.split_at_mut(QK / 2);
                    for (j, &q) in b[4..].iter().enumerate() {
                        lo[j] = f32::from(q & 0x0F) * d + m;
                        hi[j] = f32::from(q >> 4) * d + m;
                    }
                }
            }
            GgmlType::Other(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(x: f32) -> [u8; 2] {
        f16::from_f32(x).to_le_bytes()
    }

    #[test]
    fn q8_0_block_is_scale_times_signed_byte() {
        let mut block = h(0.5).to_vec();
        block.extend((0..32).map(|i| (i as i8 - 16) as u8));
        let mut out = [0.0f32; 32];
        GgmlType::Q8_0.dequantize(&block, &mut out);
        for (i, x) in out.iter().enumerate() {
            assert_eq!(*x, (i as f32 - 16.0) * 0.5);
        }
    }

    #[test]
    fn q4_0_low_nibbles_first_then_high_nibbles() {
        let mut block = h(2.0).to_vec();
        // byte j holds element j (low nibble) and element j+16 (high nibble)
        block.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let mut out = [0.0f32; 32];
        GgmlType::Q4_0.dequantize(&block, &mut out);
        for j in 0..16 {
            assert_eq!(out[j], (j as f32 - 8.0) * 2.0);
            assert_eq!(out[j + 16], ((15 - j) as f32 - 8.0) * 2.0);
        }
    }

    #[test]
    fn q4_1_adds_the_block_minimum() {
        let mut block = h(0.25).to_vec();
        block.extend(h(-1.0));
        block.extend((0..16u8).map(|j| j | (3 << 4)));
        let mut out = [0.0f32; 32];
        GgmlType::Q4_1.dequantize(&block, &mut out);
        for j in 0..16 {
            assert_eq!(out[j], j as f32 * 0.25 - 1.0);
            assert_eq!(out[j + 16], 3.0 * 0.25 - 1.0);
        }
    }

    #[test]
    fn f16_and_f32_round_trip() {
        let mut out = [0.0f32; 2];
        let bytes: Vec<u8> = [1.5f32, -3.25]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        GgmlType::F32.dequantize(&bytes, &mut out);
        assert_eq!(out, [1.5, -3.25]);
        let bytes: Vec<u8> = [h(1.5), h(-3.25)].concat();
        GgmlType::F16.dequantize(&bytes, &mut out);
        assert_eq!(out, [1.5, -3.25]);
    }

    #[test]
    fn sizes_and_names() {
        assert_eq!(GgmlType::Q4_1.byte_size(64), Some(40));
        assert_eq!(GgmlType::Q8_0.byte_size(33), None);
        assert_eq!(GgmlType::from_id(12).name(), "Q4_K");
        assert_eq!(GgmlType::from_id(12).byte_size(256), None);
    }
}
