//! A plain row-major f32 matrix on the host, used for weights before they reach a device.

/// Row-major `[rows, cols]` matrix of f32.
#[derive(Debug, Clone, PartialEq)]
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

impl Matrix {
    /// # Panics
    /// If `data.len() != rows * cols` (a programming error, never input-dependent).
    pub fn new(rows: usize, cols: usize, data: Vec<f32>) -> Self {
        assert_eq!(
            data.len(),
            rows * cols,
            "matrix data does not match its shape"
        );
        Matrix { rows, cols, data }
    }

    pub fn zeros(rows: usize, cols: usize) -> Self {
        Matrix::new(rows, cols, vec![0.0; rows * cols])
    }

    pub fn identity(n: usize) -> Self {
        let mut m = Matrix::zeros(n, n);
        for i in 0..n {
            m.data[i * n + i] = 1.0;
        }
        m
    }

    pub fn shape(&self) -> [usize; 2] {
        [self.rows, self.cols]
    }

    pub fn get(&self, r: usize, c: usize) -> f32 {
        self.data[r * self.cols + c]
    }

    pub fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.cols..(r + 1) * self.cols]
    }

    pub fn transpose(&self) -> Matrix {
        let mut out = vec![0.0; self.data.len()];
        for r in 0..self.rows {
            for c in 0..self.cols {
                out[c * self.rows + r] = self.data[r * self.cols + c];
            }
        }
        Matrix::new(self.cols, self.rows, out)
    }

    /// `self * other`, accumulated in f64 for reproducibility across machines.
    ///
    /// # Panics
    /// If the inner dimensions differ.
    pub fn matmul(&self, other: &Matrix) -> Matrix {
        assert_eq!(self.cols, other.rows, "matmul inner dimensions differ");
        let mut out = vec![0.0f64; self.rows * other.cols];
        for r in 0..self.rows {
            let acc = &mut out[r * other.cols..(r + 1) * other.cols];
            for (k, &a) in self.row(r).iter().enumerate() {
                if a == 0.0 {
                    continue;
                }
                let a = f64::from(a);
                for (o, &b) in acc.iter_mut().zip(other.row(k)) {
                    *o += a * f64::from(b);
                }
            }
        }
        Matrix::new(
            self.rows,
            other.cols,
            out.into_iter().map(|x| x as f32).collect(),
        )
    }

    /// Columns `[start, start + n)` as a new matrix.
    pub fn columns(&self, start: usize, n: usize) -> Matrix {
        let mut out = Vec::with_capacity(self.rows * n);
        for r in 0..self.rows {
            out.extend_from_slice(&self.row(r)[start..start + n]);
        }
        Matrix::new(self.rows, n, out)
    }

    /// Concatenate matrices with the same number of rows side by side.
    ///
    /// # Panics
    /// If the row counts differ.
    pub fn hcat(parts: &[&Matrix]) -> Matrix {
        let rows = parts.first().map_or(0, |m| m.rows);
        assert!(
            parts.iter().all(|m| m.rows == rows),
            "hcat row counts differ"
        );
        let cols = parts.iter().map(|m| m.cols).sum();
        let mut out = Vec::with_capacity(rows * cols);
        for r in 0..rows {
            for m in parts {
                out.extend_from_slice(m.row(r));
            }
        }
        Matrix::new(rows, cols, out)
    }

    /// Largest absolute element-wise difference.
    pub fn max_abs_diff(&self, other: &Matrix) -> f32 {
        self.data
            .iter()
            .zip(&other.data)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max)
    }
}
