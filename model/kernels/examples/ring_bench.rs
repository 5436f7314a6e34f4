//! Masked mode's products modulo 2^32 per instruction set, beside the Q8_0 kernels on the
//! same shapes, in one run: `cargo run --release -p veil-kernels --example ring_bench`.
//!
//! Weights of 8 bits (one byte each), of 12 (two bytes), and of 12 blocked (`b12`: a byte
//! per weight and one per 32). Decode (one word per input)
//! reads every weight once: its figure is weight bytes per second, to set beside the machine's memory bandwidth. Prefill (64 words) is compute:
//! multiply-adds per second.

use std::time::Instant;

use veil_kernels::ring::RingMatrix;
use veil_kernels::{GgmlType, Isa, Precision, QMatrix};

fn time(mut f: impl FnMut(), min_s: f64) -> f64 {
    f();
    let start = Instant::now();
    let mut n = 0u32;
    while start.elapsed().as_secs_f64() < min_s || n < 3 {
        f();
        n += 1;
    }
    start.elapsed().as_secs_f64() / f64::from(n)
}

fn main() {
    let shapes = [
        ("SmolLM2 qkv 960x576", 960, 576),
        ("SmolLM2 gate|up 3072x576", 3072, 576),
        ("SmolLM2 down 576x1536", 576, 1536),
        ("1B gate|up 16384x2048", 16384, 2048),
        ("1B down 2048x8192", 2048, 8192),
    ];
    let mut s = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    println!("threads {}", rayon::current_num_threads());
    for (name, rows, cols) in shapes {
        let data: Vec<f32> = (0..rows * cols)
            .map(|_| (next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0)
            .collect();
        let ring: Vec<(&str, RingMatrix)> = vec![
            (
                "i8",
                RingMatrix::quantize(rows, cols, &data, 8).expect("finite"),
            ),
            (
                "i12",
                RingMatrix::quantize(rows, cols, &data, 12).expect("finite"),
            ),
            (
                "b12",
                RingMatrix::quantize_blocked(rows, cols, &data, 12).expect("whole blocks"),
            ),
        ];
        let q8 = QMatrix::quantize(GgmlType::Q8_0, rows, cols, &data)
            .expect("whole blocks")
            .pack();
        for n in [1usize, 2, 64] {
            let u: Vec<u32> = (0..n * cols).map(|_| next() as u32).collect();
            let x: Vec<f32> = (0..n * cols)
                .map(|_| (next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0)
                .collect();
            let mut out = vec![0u32; n * rows];
            let mut outf = vec![0f32; n * rows];
            let mut line = format!("{name:26} n={n:<3}");
            for (w, m) in &ring {
                for isa in Isa::available() {
                    let t = time(|| m.mul_with(isa, &u, n, &mut out), 0.3);
                    line += &if n <= 2 {
                        format!(" {w} {isa} {:5.1} GB/s", m.byte_len() as f64 / t / 1e9)
                    } else {
                        format!(
                            " {w} {isa} {:5.1} GMAC/s",
                            (rows * cols * n) as f64 / t / 1e9
                        )
                    };
                }
            }
            let t = time(
                || veil_kernels::matmul_fused(&[&q8], &x, n, &mut outf, Precision::Fast),
                0.3,
            );
            line += &if n <= 2 {
                format!(" | q8_0 {:6.1} GB/s", q8.byte_len() as f64 / t / 1e9)
            } else {
                format!(" | q8_0 {:6.1} GMAC/s", (rows * cols * n) as f64 / t / 1e9)
            };
            println!("{line}");
        }
    }
}
