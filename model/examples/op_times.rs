//! Per-op costs on a backend: `cargo run --release --example op_times -- wgpu`.
use burn::tensor::{Distribution, Tensor};
use std::time::Instant;
use veil_model::{BackendKind, Compute};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let kind: BackendKind = std::env::args().nth(1).unwrap_or("cpu".into()).parse()?;
    let (c, _) = Compute::select(Some(kind))?;
    let d = &c.device;
    let x = Tensor::<2>::random([1, 576], Distribution::Default, d);
    let w = Tensor::<2>::random([576, 1536], Distribution::Default, d);
    let sync = |t: Tensor<2>| t.into_data();
    for label in ["warm", "timed"] {
        let n = 50;
        let t = Instant::now();
        for _ in 0..n {
            sync(x.clone().matmul(w.clone()));
        }
        println!(
            "{label} matmul+sync: {:.3} ms",
            t.elapsed().as_secs_f64() * 1e3 / n as f64
        );
        let t = Instant::now();
        let mut y = x.clone().matmul(w.clone());
        for _ in 0..n {
            y = y.matmul(w.clone().transpose()).matmul(w.clone());
        }
        sync(y);
        println!(
            "{label} chained matmul (no sync): {:.3} ms",
            t.elapsed().as_secs_f64() * 1e3 / (2 * n) as f64
        );
        let t = Instant::now();
        let mut y = x.clone();
        for _ in 0..n {
            y = (y * 1.0001 + 0.5).sqrt();
        }
        sync(y);
        println!(
            "{label} elementwise x3 (no sync): {:.3} ms",
            t.elapsed().as_secs_f64() * 1e3 / n as f64
        );
        let t = Instant::now();
        for _ in 0..n {
            sync(x.clone() + 1.0);
        }
        println!(
            "{label} tiny op + sync: {:.3} ms",
            t.elapsed().as_secs_f64() * 1e3 / n as f64
        );
    }
    Ok(())
}
