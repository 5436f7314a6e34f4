//! Activations to integers and products back to f32.
//!
//! Each position (row of an op's input) gets its own scale, so that its largest magnitude
//! lands on the op's activation bound (`RingMatrix::activation_bound`): as many bits as
//! exactness allows, typically 16-18 for the widths of small models.

/// `x` (`[n, cols]`) to integers in `-bound..=bound`, position by position; returns the
/// integers and each position's scale (`x ≈ scale · q`; 0 for a zero row).
pub fn quantize_positions(x: &[f32], n: usize, cols: usize, bound: i32) -> (Vec<i32>, Vec<f32>) {
    assert_eq!(x.len(), n * cols, "activations of the wrong size");
    let bound = bound.max(1);
    let mut q = vec![0i32; n * cols];
    let mut scales = vec![0f32; n];
    for ((row, out), scale) in x
        .chunks_exact(cols.max(1))
        .zip(q.chunks_exact_mut(cols.max(1)))
        .zip(scales.iter_mut())
    {
        let amax = row
            .iter()
            .fold(0f32, |m, v| if v.is_finite() { m.max(v.abs()) } else { m });
        if amax == 0.0 {
            continue;
        }
        *scale = amax / bound as f32;
        let inv = bound as f32 / amax;
        for (o, v) in out.iter_mut().zip(row) {
            // a non-finite activation has no integer: it becomes 0 (a finite model never
            // produces one)
            *o = if v.is_finite() {
                ((v * inv).round() as i32).clamp(-bound, bound)
            } else {
                0
            };
        }
    }
    (q, scales)
}

/// The integer products `y` (`[n, rows]`) back to f32 with each position's scale and each
/// weight row's scale.
pub fn dequantize_product(y: &[i32], x_scales: &[f32], w_scales: &[f32]) -> Vec<f32> {
    let rows = w_scales.len();
    assert_eq!(y.len(), x_scales.len() * rows, "products of the wrong size");
    y.chunks_exact(rows.max(1))
        .zip(x_scales)
        .flat_map(|(row, &sx)| {
            row.iter()
                .zip(w_scales)
                .map(move |(&v, &sw)| v as f32 * sx * sw)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_position_spans_the_bound() {
        let x = [0.5f32, -1.0, 0.25, 0.0, 0.0, 0.0, 3.0, f32::NAN, -3.0];
        let (q, s) = quantize_positions(&x, 3, 3, 1000);
        assert_eq!(&q[..3], &[500, -1000, 250]);
        assert_eq!(s[0], 1.0 / 1000.0);
        assert_eq!(&q[3..6], &[0, 0, 0]);
        assert_eq!(s[1], 0.0);
        assert_eq!(&q[6..], &[1000, 0, -1000]);
        let y = dequantize_product(&[1000, -500, 2, 4], &[0.5, 0.25], &[2.0, 1.0]);
        assert_eq!(y, vec![1000.0, -250.0, 1.0, 1.0]);
    }
}
