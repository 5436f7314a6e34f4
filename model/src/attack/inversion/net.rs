//! The inverter's network: one hidden ReLU layer and a softmax over the token classes,
//! trained with Adam on cross-entropy. Written out by hand (a dozen tensor operations)
//! because the workspace's burn has no autodiff backend and this is all it needs.

use burn::tensor::activation::{relu, softmax};
use burn::tensor::{Device, Tensor, TensorData};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

use crate::nn::tensor_to_vec;
use crate::ModelError;

/// How the network is trained.
#[derive(Debug, Clone, Copy)]
pub struct TrainOptions {
    pub hidden: usize,
    pub epochs: usize,
    pub batch: usize,
    pub learning_rate: f64,
    pub seed: u64,
}

/// `x W1 + b1 → ReLU → W2 + b2`.
pub struct Mlp {
    /// `[w1 (D x H), b1 (1 x H), w2 (H x C), b2 (1 x C)]`.
    params: [Tensor<2>; 4],
}

fn matrix(data: Vec<f32>, rows: usize, cols: usize, device: &Device) -> Tensor<2> {
    Tensor::<2>::from_data(TensorData::new(data, [rows, cols]), device)
}

fn uniform(rows: usize, cols: usize, rng: &mut ChaCha20Rng, device: &Device) -> Tensor<2> {
    // Glorot: keeps the activations' scale through the layer
    let a = (6.0 / (rows + cols) as f64).sqrt() as f32;
    let data = (0..rows * cols).map(|_| rng.gen_range(-a..a)).collect();
    matrix(data, rows, cols, device)
}

impl Mlp {
    /// Train on `x` (`[n, d]` rows, standardized) labelled with class ids `< classes`.
    pub fn train(
        x: &[f32],
        labels: &[usize],
        d: usize,
        classes: usize,
        opts: TrainOptions,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let n = labels.len();
        if n == 0 || x.len() != n * d || classes == 0 {
            return Err(ModelError::Shape(format!(
                "training on {n} labels, {} values of width {d}, {classes} classes",
                x.len()
            )));
        }
        let mut rng = ChaCha20Rng::seed_from_u64(opts.seed);
        let h = opts.hidden.max(1);
        let mut net = Mlp {
            params: [
                uniform(d, h, &mut rng, device),
                Tensor::<2>::zeros([1, h], device),
                uniform(h, classes, &mut rng, device),
                Tensor::<2>::zeros([1, classes], device),
            ],
        };
        let mut adam = Adam::new(&net.params, opts.learning_rate);
        let mut order: Vec<usize> = (0..n).collect();
        let batch = opts.batch.clamp(1, n);
        for epoch in 0..opts.epochs {
            order.shuffle(&mut rng);
            let mut loss = 0.0;
            for rows in order.chunks(batch) {
                let mut xb = Vec::with_capacity(rows.len() * d);
                let mut yb = vec![0f32; rows.len() * classes];
                for (k, &r) in rows.iter().enumerate() {
                    xb.extend_from_slice(&x[r * d..(r + 1) * d]);
                    yb[k * classes + labels[r]] = 1.0;
                }
                let xb = matrix(xb, rows.len(), d, device);
                let yb = matrix(yb, rows.len(), classes, device);
                let (grads, l) = net.gradients(xb, yb)?;
                loss += l * rows.len() as f64;
                adam.step(&mut net.params, grads);
            }
            tracing::debug!("inverter epoch {epoch}: loss {:.3}", loss / n as f64);
        }
        Ok(net)
    }

    /// Cross-entropy's gradients for one batch, and its mean loss.
    fn gradients(&self, x: Tensor<2>, y: Tensor<2>) -> Result<([Tensor<2>; 4], f64), ModelError> {
        let [w1, b1, w2, b2] = self.params.clone();
        let [b, _] = x.dims();
        let z1 = x.clone().matmul(w1) + b1;
        let h = relu(z1.clone());
        let p = softmax(h.clone().matmul(w2.clone()) + b2, 1);
        let loss = -tensor_to_vec((p.clone() * y.clone()).sum_dim(1).clamp_min(1e-12).log())?
            .iter()
            .map(|v| f64::from(*v))
            .sum::<f64>()
            / b as f64;
        let g = (p - y).div_scalar(b as f32);
        let dw2 = h.transpose().matmul(g.clone());
        let db2 = g.clone().sum_dim(0);
        let dh = g.matmul(w2.transpose());
        let dz1 = dh.mask_fill(z1.lower_equal_elem(0.0), 0.0);
        let dw1 = x.transpose().matmul(dz1.clone());
        let db1 = dz1.sum_dim(0);
        Ok(([dw1, db1, dw2, db2], loss))
    }

    /// Class scores `[n, C]` of standardized rows `x` (`[n, d]`).
    pub fn logits(&self, x: &[f32], d: usize, device: &Device) -> Result<Vec<f32>, ModelError> {
        let n = x.len() / d.max(1);
        let [w1, b1, w2, b2] = self.params.clone();
        let x = matrix(x.to_vec(), n, d, device);
        tensor_to_vec(relu(x.matmul(w1) + b1).matmul(w2) + b2)
    }
}

/// Adam (Kingma & Ba) with the usual constants.
struct Adam {
    m: Vec<Tensor<2>>,
    v: Vec<Tensor<2>>,
    t: i32,
    lr: f64,
}

impl Adam {
    fn new(params: &[Tensor<2>], lr: f64) -> Self {
        Adam {
            m: params.iter().map(Tensor::zeros_like).collect(),
            v: params.iter().map(Tensor::zeros_like).collect(),
            t: 0,
            lr,
        }
    }

    fn step(&mut self, params: &mut [Tensor<2>], grads: [Tensor<2>; 4]) {
        const B1: f64 = 0.9;
        const B2: f64 = 0.999;
        self.t += 1;
        let c1 = 1.0 - B1.powi(self.t);
        let c2 = 1.0 - B2.powi(self.t);
        for (i, g) in grads.into_iter().enumerate() {
            self.m[i] = self.m[i].clone().mul_scalar(B1) + g.clone().mul_scalar(1.0 - B1);
            self.v[i] = self.v[i].clone().mul_scalar(B2) + g.square().mul_scalar(1.0 - B2);
            let step =
                self.m[i].clone().div_scalar(c1) / (self.v[i].clone().div_scalar(c2).sqrt() + 1e-8);
            params[i] = params[i].clone() - step.mul_scalar(self.lr);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Compute;

    #[test]
    fn learns_a_separable_problem() {
        // three classes, each a different coordinate set high
        let device = Compute::cpu().device;
        let mut rng = ChaCha20Rng::seed_from_u64(3);
        let (d, n) = (6, 300);
        let mut x = Vec::with_capacity(n * d);
        let mut labels = Vec::with_capacity(n);
        for i in 0..n {
            let c = i % 3;
            for j in 0..d {
                let signal = if j / 2 == c { 2.0 } else { 0.0 };
                x.push(signal + rng.gen_range(-0.5f32..0.5));
            }
            labels.push(c);
        }
        let opts = TrainOptions {
            hidden: 16,
            epochs: 30,
            batch: 32,
            learning_rate: 1e-2,
            seed: 1,
        };
        let net = Mlp::train(&x, &labels, d, 3, opts, &device).expect("train");
        let logits = net.logits(&x, d, &device).expect("logits");
        let right = (0..n)
            .filter(|&i| {
                let row = &logits[i * 3..(i + 1) * 3];
                let best = (0..3)
                    .max_by(|a, b| row[*a].total_cmp(&row[*b]))
                    .expect("three classes");
                best == labels[i]
            })
            .count();
        assert!(right > n * 95 / 100, "{right} of {n}");
    }
}
