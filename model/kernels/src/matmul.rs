//! Quantized weight matrices and their products with f32 activations, on every core.

use std::borrow::Cow;
use std::sync::Arc;

use rayon::prelude::*;

use crate::act::{Q8Acts, Q8KActs};
use crate::cpu::Isa;
use crate::dot::packed::PackedDot;
use crate::dot::{self, ActFormat, RowDot};
use crate::format::GgmlType;
use crate::pack::{self, GROUP};

/// Bytes shared by many matrices: a whole file's tensor data (owned or memory-mapped) and
/// a range of it.
#[derive(Clone)]
pub struct Bytes {
    owner: Arc<dyn AsRef<[u8]> + Send + Sync>,
    start: usize,
    len: usize,
}

impl std::fmt::Debug for Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bytes({} bytes)", self.len)
    }
}

impl Bytes {
    pub fn new(owner: Arc<dyn AsRef<[u8]> + Send + Sync>) -> Self {
        let len = (*owner).as_ref().len();
        Bytes {
            owner,
            start: 0,
            len,
        }
    }

    pub fn from_vec(v: Vec<u8>) -> Self {
        Bytes::new(Arc::new(v))
    }

    /// The sub-range `start..start + len` of these bytes, sharing the owner.
    ///
    /// # Panics
    /// If the range lies outside these bytes.
    pub fn slice(&self, start: usize, len: usize) -> Bytes {
        assert!(start.checked_add(len).is_some_and(|end| end <= self.len));
        Bytes {
            owner: self.owner.clone(),
            start: self.start + start,
            len,
        }
    }

    pub fn as_slice(&self) -> &[u8] {
        &(*self.owner).as_ref()[self.start..self.start + self.len]
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// What a product may round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// Activations quantized to 8 bits per block, integer dot products: llama.cpp's
    /// trade-off, several times faster.
    #[default]
    Fast,
    /// f32 activations against the dequantized weights: the f32 model's result up to the
    /// order of additions.
    Exact,
}

/// Why a matrix cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MatrixError {
    #[error("{ty} weights cannot be multiplied (Veil reads F32, F16, BF16 and Q*_0/1/K)")]
    Unsupported { ty: GgmlType },
    #[error("{ty} rows of {cols} values are not whole blocks of {block}")]
    PartialBlock {
        ty: GgmlType,
        cols: usize,
        block: usize,
    },
    #[error("{rows} rows of {ty} cannot be interleaved in groups of {GROUP}")]
    NotPackable { ty: GgmlType, rows: usize },
    #[error("{rows} rows of {cols} {ty} values take {want} bytes, not {got}")]
    Size {
        ty: GgmlType,
        rows: usize,
        cols: usize,
        want: usize,
        got: usize,
    },
}

/// A weight matrix of `rows` outputs by `cols` inputs in a GGML format: row by row (the
/// layout of a GGUF tensor with dimensions `[cols, rows]`), or with its rows interleaved
/// in groups of eight ([`crate::pack`]), the layout the fastest kernels read.
#[derive(Debug, Clone)]
pub struct QMatrix {
    ty: GgmlType,
    rows: usize,
    cols: usize,
    row_bytes: usize,
    data: Bytes,
    packed: bool,
}

/// Rows per task: enough work to pay for the hand-off, and several tasks per core.
const MIN_ROWS_PER_TASK: usize = 16;

impl QMatrix {
    pub fn new(ty: GgmlType, rows: usize, cols: usize, data: Bytes) -> Result<Self, MatrixError> {
        let (block, _) = ty
            .block_layout()
            .filter(|_| ty != GgmlType::Q8_K)
            .ok_or(MatrixError::Unsupported { ty })?;
        let row_bytes = ty
            .byte_size(cols)
            .ok_or(MatrixError::PartialBlock { ty, cols, block })?;
        let want = row_bytes * rows;
        if data.len() != want {
            return Err(MatrixError::Size {
                ty,
                rows,
                cols,
                want,
                got: data.len(),
            });
        }
        Ok(QMatrix {
            ty,
            rows,
            cols,
            row_bytes,
            data,
            packed: false,
        })
    }

    /// A matrix whose `data` is already interleaved ([`pack::pack_in_place`]).
    pub fn new_packed(
        ty: GgmlType,
        rows: usize,
        cols: usize,
        data: Bytes,
    ) -> Result<Self, MatrixError> {
        if !pack::packable(ty, rows) {
            return Err(MatrixError::NotPackable { ty, rows });
        }
        Ok(QMatrix {
            packed: true,
            ..QMatrix::new(ty, rows, cols, data)?
        })
    }

    /// This matrix with its rows interleaved, if its format and row count allow it (a copy
    /// of the bytes); otherwise unchanged.
    pub fn pack(self) -> QMatrix {
        if self.packed || !pack::packable(self.ty, self.rows) {
            return self;
        }
        let mut bytes = self.data.as_slice().to_vec();
        pack::pack_in_place(self.ty, self.rows, &mut bytes);
        QMatrix {
            data: Bytes::from_vec(bytes),
            packed: true,
            ..self
        }
    }

    /// A new matrix of the rows `order` (row `i` of the result is row `order[i]` of this
    /// one), interleaved if this one is.
    ///
    /// # Panics
    /// If an index in `order` is not a row.
    pub fn select_rows(&self, order: &[usize]) -> QMatrix {
        let mut bytes = Vec::with_capacity(self.row_bytes * order.len());
        for &r in order {
            assert!(r < self.rows, "row {r} of {}", self.rows);
            bytes.extend_from_slice(&self.row(r));
        }
        let m = QMatrix::new(self.ty, order.len(), self.cols, Bytes::from_vec(bytes))
            .expect("whole rows of a readable type");
        if self.packed {
            m.pack()
        } else {
            m
        }
    }

    /// Whether the rows are interleaved in groups of eight.
    pub fn is_packed(&self) -> bool {
        self.packed
    }

    /// Quantize `data` (`rows` rows of `cols` values) to `ty`, row by row.
    pub fn quantize(
        ty: GgmlType,
        rows: usize,
        cols: usize,
        data: &[f32],
    ) -> Result<Self, crate::QuantizeError> {
        assert_eq!(data.len(), rows * cols, "{rows} x {cols} values");
        let mut bytes = Vec::with_capacity(ty.byte_size(rows * cols).unwrap_or(0));
        for row in data.chunks_exact(cols.max(1)) {
            ty.quantize(row, &mut bytes)?;
        }
        let m = QMatrix::new(ty, rows, cols, Bytes::from_vec(bytes));
        Ok(m.expect("whole blocks of a readable type"))
    }

    /// The blocks, row by row (GGML's layout: a copy if the rows are interleaved).
    pub fn bytes(&self) -> Cow<'_, [u8]> {
        if !self.packed {
            return Cow::Borrowed(self.data.as_slice());
        }
        let mut out = vec![0u8; self.data.len()];
        for (r, o) in out.chunks_exact_mut(self.row_bytes).enumerate() {
            self.copy_row(r, o);
        }
        Cow::Owned(out)
    }

    pub fn ggml_type(&self) -> GgmlType {
        self.ty
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes held (shared with other matrices of the same file).
    pub fn byte_len(&self) -> usize {
        self.data.len()
    }

    /// Row `r`'s blocks in GGML's layout.
    pub fn row(&self, r: usize) -> Cow<'_, [u8]> {
        if !self.packed {
            return Cow::Borrowed(
                &self.data.as_slice()[r * self.row_bytes..(r + 1) * self.row_bytes],
            );
        }
        let mut out = vec![0u8; self.row_bytes];
        self.copy_row(r, &mut out);
        Cow::Owned(out)
    }

    /// Row `r`'s blocks in GGML's layout, into `out` (`row_bytes` long).
    fn copy_row(&self, r: usize, out: &mut [u8]) {
        if !self.packed {
            out.copy_from_slice(
                &self.data.as_slice()[r * self.row_bytes..(r + 1) * self.row_bytes],
            );
            return;
        }
        let g = r / GROUP;
        let group =
            &self.data.as_slice()[g * GROUP * self.row_bytes..(g + 1) * GROUP * self.row_bytes];
        pack::unpack_row(self.ty, group, r % GROUP, out);
    }

    /// The whole matrix in f32, row-major `[rows, cols]`.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.rows * self.cols];
        for (r, o) in out.chunks_exact_mut(self.cols).enumerate() {
            dot::dequantize_row(self.ty, &self.row(r), o);
        }
        out
    }

    /// `out = x Wᵀ`: `x` is `[m, cols]` row-major, `out` is `[m, rows]`, with the kernels
    /// of [`Isa::current`].
    ///
    /// # Panics
    /// If `x` or `out` do not hold `m` rows of the right width.
    pub fn matmul(&self, x: &[f32], m: usize, out: &mut [f32], precision: Precision) {
        matmul_fused_with(Isa::current(), &[self], x, m, out, precision);
    }

    /// [`QMatrix::matmul`] with the kernels of `isa` (which this CPU must have).
    pub fn matmul_with(
        &self,
        isa: Isa,
        x: &[f32],
        m: usize,
        out: &mut [f32],
        precision: Precision,
    ) {
        matmul_fused_with(isa, &[self], x, m, out, precision);
    }
}

/// `out = x [W₀; W₁; …]ᵀ`: the products with several matrices of the same width, their
/// outputs side by side (`out` is `[m, Σ rows]`), as one parallel pass that quantizes the
/// activations once — a fused query/key/value or gate/up projection. The matrices may be
/// of different formats (a Q4_K_M file keeps some of them in Q6_K).
///
/// # Panics
/// If `parts` is empty, their widths differ, or `x`/`out` have the wrong size.
pub fn matmul_fused(parts: &[&QMatrix], x: &[f32], m: usize, out: &mut [f32], p: Precision) {
    matmul_fused_with(Isa::current(), parts, x, m, out, p);
}

/// [`matmul_fused`] with the kernels of `isa` (which this CPU must have).
pub fn matmul_fused_with(
    isa: Isa,
    parts: &[&QMatrix],
    x: &[f32],
    m: usize,
    out: &mut [f32],
    precision: Precision,
) {
    let cols = parts.first().expect("at least one matrix").cols;
    assert!(parts.iter().all(|p| p.cols == cols), "widths differ");
    let total: usize = parts.iter().map(|p| p.rows).sum();
    assert_eq!(x.len(), m * cols, "x must be [m, cols]");
    assert_eq!(out.len(), m * total, "out must be [m, rows]");
    if m == 0 {
        return;
    }
    let formats: Vec<ActFormat> = parts
        .iter()
        .map(|p| match precision {
            Precision::Exact => ActFormat::F32,
            Precision::Fast => ActFormat::of(p.ty),
        })
        .collect();
    let q8 = formats
        .contains(&ActFormat::Q8)
        .then(|| Q8Acts::quantize(x, m, cols));
    let q8k = formats
        .contains(&ActFormat::Q8K)
        .then(|| Q8KActs::quantize(x, m, cols));
    let mut starts = Vec::with_capacity(parts.len());
    let mut s = 0;
    for p in parts {
        starts.push(s);
        s += p.rows;
    }
    let kernels: Vec<Option<RowDot>> = parts
        .iter()
        .zip(&formats)
        .map(|(p, f)| (*f != ActFormat::F32 && !p.packed).then(|| RowDot::new(isa, p.ty)))
        .collect();
    let packed: Vec<Option<PackedDot>> = parts
        .iter()
        .zip(&formats)
        .map(|(p, f)| (*f != ActFormat::F32 && p.packed).then(|| PackedDot::new(isa, p.ty)))
        .collect();
    // rows g0..g1 of the matrices side by side into out ([g1 - g0, m]), part by part
    let rows = |g0: usize, g1: usize, out: &mut [f32]| {
        let mut g = g0;
        while g < g1 {
            let k = starts.partition_point(|&s| s <= g) - 1;
            let part = parts[k];
            let (r0, r1) = (g - starts[k], (g1 - starts[k]).min(part.rows));
            let w = &part.data.as_slice()[r0 * part.row_bytes..r1 * part.row_bytes];
            let o = &mut out[(g - g0) * m..(g - g0 + r1 - r0) * m];
            match (formats[k], &q8, &q8k, &packed[k], &kernels[k]) {
                (ActFormat::Q8, Some(a), _, Some(p), _) => {
                    packed_rows(part, r0, r1, m, o, |w, out| p.block(w, a, out))
                }
                (ActFormat::Q8K, _, Some(a), Some(p), _) => {
                    packed_rows(part, r0, r1, m, o, |w, out| p.block_q8k(w, a, out))
                }
                (ActFormat::Q8, Some(a), _, _, Some(kernel)) => {
                    kernel.q8_block(w, part.row_bytes, a, o)
                }
                (ActFormat::Q8K, _, Some(a), _, Some(kernel)) => {
                    kernel.q8k_block(w, part.row_bytes, a, o)
                }
                // f32 activations against each row dequantized (either layout)
                _ => ROW.with_borrow_mut(|(buf, bytes)| {
                    buf.resize(cols, 0.0);
                    bytes.resize(part.row_bytes, 0);
                    for (r, col) in (r0..r1).zip(o.chunks_exact_mut(m)) {
                        part.copy_row(r, bytes);
                        dot::dequantize_row(part.ty, bytes, buf);
                        for (i, v) in col.iter_mut().enumerate() {
                            *v = dot::dot_f32(isa, buf, &x[i * cols..(i + 1) * cols]);
                        }
                    }
                }),
            }
            g += r1 - r0;
        }
    };
    for_rows(total, m, out, rows);
}

/// Run `f` on one of rayon's worker threads while the caller waits asleep, so that the
/// parallel products inside `f` run on the pool's threads alone: from a thread outside the
/// pool, every product would hand its work over and wait for it (two wake-ups each, a
/// hundred products per token), and the pool's idle threads would spin beside the caller.
pub fn on_workers<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        return f();
    }
    rayon::join(f, || ()).0
}

thread_local! {
    /// A dequantized weight row (the exact path) and its blocks, one per thread.
    static ROW: std::cell::RefCell<(Vec<f32>, Vec<u8>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// Rows `r0..r1` of the packed matrix `part`, into `out` (`[r1 - r0, m]`), by `run` (which
/// multiplies whole groups): whole groups straight into `out`, a group cut by the range
/// through a scratch buffer.
fn packed_rows(
    part: &QMatrix,
    r0: usize,
    r1: usize,
    m: usize,
    out: &mut [f32],
    run: impl Fn(&[u8], &mut [f32]),
) {
    let (g0, g1) = (r0 / GROUP, r1.div_ceil(GROUP));
    let group_bytes = GROUP * part.row_bytes;
    let w = &part.data.as_slice()[g0 * group_bytes..g1 * group_bytes];
    if r0.is_multiple_of(GROUP) && r1.is_multiple_of(GROUP) {
        run(w, out);
        return;
    }
    let mut all = vec![0.0; (g1 - g0) * GROUP * m];
    run(w, &mut all);
    let skip = (r0 - g0 * GROUP) * m;
    out.copy_from_slice(&all[skip..skip + (r1 - r0) * m]);
}

/// Run `f(r0, r1, block)` over the weight rows `0..rows` in parallel chunks, where `block`
/// receives the `[r1 - r0, m]` outputs of those rows (output `[i, r]` of activation row `i`
/// at `block[(r - r0) * m + i]`), then lay them out as `out` (`[m, rows]`).
fn for_rows(rows: usize, m: usize, out: &mut [f32], f: impl Fn(usize, usize, &mut [f32]) + Sync) {
    let threads = rayon::current_num_threads().max(1);
    // whole groups of interleaved rows per task where the matrices allow it
    let per_task = (rows / (4 * threads))
        .max(MIN_ROWS_PER_TASK)
        .next_multiple_of(GROUP)
        .min(rows);
    if m == 1 {
        out.par_chunks_mut(per_task)
            .enumerate()
            .for_each(|(t, chunk)| f(t * per_task, t * per_task + chunk.len(), chunk));
        return;
    }
    let blocks: Vec<Vec<f32>> = (0..rows.div_ceil(per_task))
        .into_par_iter()
        .map(|t| {
            let r0 = t * per_task;
            let r1 = (r0 + per_task).min(rows);
            let mut block = vec![0.0; (r1 - r0) * m];
            f(r0, r1, &mut block);
            block
        })
        .collect();
    // activation row by activation row: contiguous writes, reads from a block in cache
    for (t, block) in blocks.iter().enumerate() {
        let r0 = t * per_task;
        let n = block.len() / m;
        for (i, o) in out.chunks_exact_mut(rows).enumerate() {
            for (k, v) in o[r0..r0 + n].iter_mut().enumerate() {
                *v = block[k * m + i];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dot::tests::{random_rows, Rng};

    #[test]
    fn matmul_equals_row_by_row_dequantized_products() {
        let (rows, cols, m) = (70, 512, 6);
        let mut rng = Rng::new(7);
        let x: Vec<f32> = (0..m * cols).map(|_| rng.f32()).collect();
        // every type a weight matrix may have (Q8_K holds activations only)
        for ty in GgmlType::READABLE
            .into_iter()
            .filter(|t| *t != GgmlType::Q8_K)
        {
            let bytes = match ty {
                GgmlType::F32 => (0..rows * cols)
                    .flat_map(|_| rng.f32().to_le_bytes())
                    .collect(),
                GgmlType::F16 | GgmlType::BF16 => (0..rows * cols)
                    .flat_map(|_| {
                        let v = rng.f32();
                        if ty == GgmlType::F16 {
                            half::f16::from_f32(v).to_le_bytes()
                        } else {
                            half::bf16::from_f32(v).to_le_bytes()
                        }
                    })
                    .collect(),
                _ => random_rows(ty, rows, cols, &mut rng),
            };
            let w = QMatrix::new(ty, rows, cols, Bytes::from_vec(bytes)).expect("matrix");
            let wf = w.dequantize();
            for precision in [Precision::Exact, Precision::Fast] {
                for isa in Isa::available() {
                    let mut out = vec![0.0; m * rows];
                    w.matmul_with(isa, &x, m, &mut out, precision);
                    for i in 0..m {
                        for r in 0..rows {
                            let (want, scale) = wf[r * cols..(r + 1) * cols]
                                .iter()
                                .zip(&x[i * cols..(i + 1) * cols])
                                .fold((0.0f64, 0.0f32), |(s, a), (w, x)| {
                                    (s + f64::from(w * x), a + (w * x).abs())
                                });
                            // 8-bit activations: about 1/254 of each term
                            let tol = match precision {
                                Precision::Exact => 1e-4 * scale + 1e-5,
                                Precision::Fast => 2e-2 * scale + 1e-3,
                            };
                            let got = out[i * rows + r];
                            assert!(
                                (f64::from(got) - want).abs() <= f64::from(tol),
                                "{ty} {precision:?} {isa} [{i}, {r}]: {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn a_fused_product_equals_its_parts_side_by_side() {
        let (cols, m) = (256, 2);
        let mut rng = Rng::new(9);
        let x: Vec<f32> = (0..m * cols).map(|_| rng.f32()).collect();
        let parts: Vec<QMatrix> = [
            (GgmlType::Q4_K, 40),
            (GgmlType::Q6_K, 24),
            (GgmlType::Q8_0, 8),
        ]
        .into_iter()
        .map(|(ty, rows)| {
            let bytes = random_rows(ty, rows, cols, &mut rng);
            QMatrix::new(ty, rows, cols, Bytes::from_vec(bytes)).expect("matrix")
        })
        .collect();
        let refs: Vec<&QMatrix> = parts.iter().collect();
        for precision in [Precision::Fast, Precision::Exact] {
            let mut fused = vec![0.0; m * 72];
            matmul_fused(&refs, &x, m, &mut fused, precision);
            let mut at = 0;
            for p in &parts {
                let mut alone = vec![0.0; m * p.rows()];
                p.matmul(&x, m, &mut alone, precision);
                for i in 0..m {
                    assert_eq!(
                        &fused[i * 72 + at..i * 72 + at + p.rows()],
                        &alone[i * p.rows()..(i + 1) * p.rows()],
                        "{} {precision:?}",
                        p.ggml_type()
                    );
                }
                at += p.rows();
            }
        }
    }

    /// A node batches concurrent sessions' rows into one product: a session's result must
    /// not depend on the others in the batch, to the last bit.
    #[test]
    fn each_row_of_a_batch_equals_its_product_alone() {
        let (rows, cols, m) = (37, 512, 5);
        let mut rng = Rng::new(11);
        let x: Vec<f32> = (0..m * cols).map(|_| rng.f32()).collect();
        for ty in [
            GgmlType::Q4_0,
            GgmlType::Q8_0,
            GgmlType::Q4_K,
            GgmlType::Q6_K,
            GgmlType::Q5_K,
        ] {
            let w = QMatrix::new(
                ty,
                rows,
                cols,
                Bytes::from_vec(random_rows(ty, rows, cols, &mut rng)),
            )
            .expect("matrix");
            for isa in Isa::available() {
                for precision in [Precision::Fast, Precision::Exact] {
                    let mut batch = vec![0.0; m * rows];
                    w.matmul_with(isa, &x, m, &mut batch, precision);
                    for i in 0..m {
                        let mut alone = vec![0.0; rows];
                        w.matmul_with(isa, &x[i * cols..(i + 1) * cols], 1, &mut alone, precision);
                        assert_eq!(
                            &batch[i * rows..(i + 1) * rows],
                            &alone[..],
                            "{ty} {isa} {precision:?} row {i}"
                        );
                    }
                }
            }
        }
    }

    /// Interleaved matrices read back as their rows and multiply like them, alone or
    /// fused behind a matrix whose rows do not fill whole groups (so tasks cut groups).
    #[test]
    fn packed_matrices_read_and_multiply_as_their_rows() {
        let (cols, m) = (256, 5);
        let mut rng = Rng::new(13);
        let x: Vec<f32> = (0..m * cols).map(|_| rng.f32()).collect();
        for ty in [
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q8_0,
            GgmlType::Q4_K,
        ] {
            let odd = QMatrix::new(
                GgmlType::Q8_0,
                12,
                cols,
                Bytes::from_vec(random_rows(GgmlType::Q8_0, 12, cols, &mut rng)),
            )
            .expect("matrix");
            let plain = QMatrix::new(
                ty,
                48,
                cols,
                Bytes::from_vec(random_rows(ty, 48, cols, &mut rng)),
            )
            .expect("matrix");
            let packed = plain.clone().pack();
            assert!(packed.is_packed() && !plain.is_packed());
            assert_eq!(packed.bytes(), plain.bytes(), "{ty}");
            assert_eq!(packed.row(13), plain.row(13), "{ty}");
            assert_eq!(packed.dequantize(), plain.dequantize(), "{ty}");
            assert!(
                !odd.clone().pack().is_packed(),
                "12 rows are not whole groups"
            );
            for precision in [Precision::Fast, Precision::Exact] {
                for isa in Isa::available() {
                    let mut want = vec![0.0; m * 60];
                    matmul_fused_with(isa, &[&odd, &plain], &x, m, &mut want, precision);
                    let mut got = vec![0.0; m * 60];
                    matmul_fused_with(isa, &[&odd, &packed], &x, m, &mut got, precision);
                    for (g, w) in got.iter().zip(&want) {
                        assert!(
                            (g - w).abs() <= 1e-4 * w.abs().max(1.0),
                            "{ty} {isa} {precision:?}: {g} vs {w}"
                        );
                    }
                }
            }
        }
        let e = QMatrix::new_packed(GgmlType::Q6_K, 8, 256, Bytes::from_vec(vec![0; 8 * 210]))
            .expect_err("no packed Q6_K");
        assert!(e.to_string().contains("interleaved"), "{e}");
    }

    #[test]
    fn selected_rows_are_those_rows_packed_or_not() {
        let mut rng = Rng::new(17);
        let plain = QMatrix::new(
            GgmlType::Q8_0,
            16,
            64,
            Bytes::from_vec(random_rows(GgmlType::Q8_0, 16, 64, &mut rng)),
        )
        .expect("matrix");
        let order: Vec<usize> = (0..16).map(|i| (i * 5 + 3) % 16).collect();
        for m in [plain.clone(), plain.clone().pack()] {
            let s = m.select_rows(&order);
            assert_eq!(s.is_packed(), m.is_packed());
            for (i, &r) in order.iter().enumerate() {
                assert_eq!(s.row(i), plain.row(r));
            }
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        let e = QMatrix::new(GgmlType::Q4_K, 2, 128, Bytes::from_vec(vec![0; 144]))
            .expect_err("partial block");
        assert!(e.to_string().contains("256"), "{e}");
        let e =
            QMatrix::new(GgmlType::Q8_0, 2, 64, Bytes::from_vec(vec![0; 10])).expect_err("size");
        assert!(e.to_string().contains("136"), "{e}");
        let e =
            QMatrix::new(GgmlType::Other(20), 1, 32, Bytes::from_vec(vec![])).expect_err("type");
        assert!(e.to_string().contains("IQ4_NL"), "{e}");
    }
}
