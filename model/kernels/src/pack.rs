//! Weight rows interleaved in groups of eight, so that one pass over memory feeds eight
//! outputs at once (llama.cpp's "repack" of Q4_0 into `block_q4_0x8` has the same aim; this
//! layout is Veil's own, chosen for its kernels).
//!
//! A row-major matrix keeps each row's blocks together: a kernel that reads eight rows at
//! once follows eight streams, and one that reads a row at a time must reduce every row's
//! vector to one number. Interleaved, the eight rows' blocks of one column sit side by side:
//!
//! ```text
//! packed block (block column b of rows 8g..8g+8):
//!   the rows' 2-byte header fields, field by field: d₀…d₇ (Q4_0, Q8_0), then m₀…m₇ (Q4_1,
//!   and Q4_K's dmin)
//!   the rows' other bytes in chunks of 32: chunk c holds bytes 4c..4c+4 of row r at 4r
//!   (for Q4_K the 12 bytes of scales first, then the 128 of nibbles; for Q5_0 the four
//!   bytes of fifth bits, a whole chunk, then the 16 of nibbles)
//! ```
//!
//! so a 32-byte load holds four bytes of each of the eight rows, one row per 32-bit lane:
//! an integer dot product against four activation bytes broadcast to every lane leaves
//! row r's partial sum in lane r, and the eight scales load as one vector. A packed block is
//! as large as the eight blocks it holds, so packing permutes bytes in place.

use crate::format::{GgmlType, QK, QK_K};

/// Rows per interleaved group.
pub const GROUP: usize = 8;

/// Where a format's bytes sit in a block: 2-byte header fields, then quant bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BlockShape {
    /// Header fields of 2 bytes (f16 scales and minimums) per block.
    pub fields: usize,
    /// Quant bytes per block (a multiple of 4).
    pub quants: usize,
}

impl BlockShape {
    pub fn of(ty: GgmlType) -> Option<BlockShape> {
        let (fields, quants) = match ty {
            GgmlType::Q4_0 => (1, QK / 2),
            GgmlType::Q4_1 => (2, QK / 2),
            // d; then the 4 bytes of fifth bits, then the 16 of nibbles
            GgmlType::Q5_0 => (1, 4 + QK / 2),
            GgmlType::Q8_0 => (1, QK),
            // d and dmin; then 12 bytes of 6-bit scales and minimums and 128 of nibbles
            GgmlType::Q4_K => (2, 12 + QK_K / 2),
            _ => return None,
        };
        Some(BlockShape { fields, quants })
    }

    /// Bytes of one row's block.
    pub fn bytes(&self) -> usize {
        2 * self.fields + self.quants
    }

    /// Offset in a packed block of byte `j` of row `r`'s block.
    #[inline]
    fn packed_offset(&self, r: usize, j: usize) -> usize {
        let head = 2 * self.fields;
        if j < head {
            let (field, byte) = (j / 2, j % 2);
            (field * GROUP + r) * 2 + byte
        } else {
            let q = j - head;
            GROUP * head + (q / 4) * 4 * GROUP + 4 * r + q % 4
        }
    }
}

/// Whether a `rows`-row matrix of `ty` can be interleaved (a format with a packed kernel,
/// and whole groups of rows).
pub fn packable(ty: GgmlType, rows: usize) -> bool {
    BlockShape::of(ty).is_some() && rows > 0 && rows.is_multiple_of(GROUP)
}

/// Interleave `data` (`rows` rows of `row_bytes` bytes of `ty`, row-major) in place.
///
/// # Panics
/// If the matrix is not [`packable`] or `data` is not `rows * row_bytes` bytes of whole
/// blocks.
pub fn pack_in_place(ty: GgmlType, rows: usize, data: &mut [u8]) {
    assert!(packable(ty, rows), "{ty} with {rows} rows cannot be packed");
    let shape = BlockShape::of(ty).expect("packable");
    let bytes = shape.bytes();
    assert!(data.len().is_multiple_of(rows * bytes), "whole blocks");
    let row_bytes = data.len() / rows;
    let head = 2 * shape.fields;
    let mut scratch = vec![0u8; GROUP * row_bytes];
    for group in data.chunks_exact_mut(GROUP * row_bytes) {
        for (r, row) in group.chunks_exact(row_bytes).enumerate() {
            for (b, blk) in row.chunks_exact(bytes).enumerate() {
                let packed = &mut scratch[b * GROUP * bytes..(b + 1) * GROUP * bytes];
                // two bytes per header field, four per quant chunk (see `packed_offset`)
                for f in 0..shape.fields {
                    let at = shape.packed_offset(r, 2 * f);
                    packed[at..at + 2].copy_from_slice(&blk[2 * f..2 * f + 2]);
                }
                for (c, q) in blk[head..].chunks_exact(4).enumerate() {
                    let at = shape.packed_offset(r, head + 4 * c);
                    packed[at..at + 4].copy_from_slice(q);
                }
            }
        }
        group.copy_from_slice(&scratch);
    }
}

/// Row `r` of a group of `GROUP` packed rows (`group` holds the whole group) in GGML's own
/// block layout, into `out` (one row's bytes).
///
/// # Panics
/// If `ty` has no packed layout or the sizes disagree.
pub fn unpack_row(ty: GgmlType, group: &[u8], r: usize, out: &mut [u8]) {
    let shape = BlockShape::of(ty).expect("a packed format");
    let bytes = shape.bytes();
    assert_eq!(group.len(), GROUP * out.len(), "a group of eight rows");
    assert!(r < GROUP);
    let head = 2 * shape.fields;
    for (b, blk) in out.chunks_exact_mut(bytes).enumerate() {
        let packed = &group[b * GROUP * bytes..(b + 1) * GROUP * bytes];
        // the layout of `packed_offset`, a field and four quant bytes at a time
        for f in 0..shape.fields {
            let at = (f * GROUP + r) * 2;
            blk[2 * f..2 * f + 2].copy_from_slice(&packed[at..at + 2]);
        }
        let quants = &packed[GROUP * head..];
        for (c, dst) in blk[head..].chunks_exact_mut(4).enumerate() {
            let at = c * 4 * GROUP + 4 * r;
            dst.copy_from_slice(&quants[at..at + 4]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packing_permutes_and_unpacking_restores_every_row() {
        for ty in [
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q5_0,
            GgmlType::Q8_0,
            GgmlType::Q4_K,
        ] {
            let (rows, bytes) = (16, BlockShape::of(ty).expect("shape").bytes());
            let row_bytes = 3 * bytes;
            let original: Vec<u8> = (0..rows * row_bytes).map(|i| (i * 7 % 251) as u8).collect();
            let mut packed = original.clone();
            pack_in_place(ty, rows, &mut packed);
            assert_ne!(packed, original, "{ty}");
            let mut sorted = (original.clone(), packed.clone());
            sorted.0.sort_unstable();
            sorted.1.sort_unstable();
            assert_eq!(sorted.0, sorted.1, "{ty}: a permutation");
            let mut row = vec![0u8; row_bytes];
            for r in 0..rows {
                let g = r / GROUP;
                let group = &packed[g * GROUP * row_bytes..(g + 1) * GROUP * row_bytes];
                unpack_row(ty, group, r % GROUP, &mut row);
                assert_eq!(
                    row,
                    original[r * row_bytes..(r + 1) * row_bytes],
                    "{ty} {r}"
                );
            }
        }
    }

    #[test]
    fn a_packed_block_starts_with_the_eight_scales() {
        let ty = GgmlType::Q4_0;
        let mut data = vec![0u8; GROUP * 18];
        for r in 0..GROUP {
            data[r * 18] = r as u8; // low byte of row r's d
            data[r * 18 + 2] = 0x10 + r as u8; // its first quant byte
        }
        pack_in_place(ty, GROUP, &mut data);
        for r in 0..GROUP {
            assert_eq!(data[2 * r], r as u8);
            assert_eq!(data[16 + 4 * r], 0x10 + r as u8);
        }
    }

    #[test]
    fn only_whole_groups_of_known_formats_pack() {
        assert!(packable(GgmlType::Q8_0, 2048));
        assert!(!packable(GgmlType::Q8_0, 12));
        assert!(packable(GgmlType::Q4_K, 2048));
        assert!(!packable(GgmlType::Q6_K, 2048));
        assert!(!packable(GgmlType::F32, 2048));
    }
}
