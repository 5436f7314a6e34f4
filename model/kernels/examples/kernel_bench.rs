//! Quantized matrix products per format and instruction set, in one run:
//! `cargo build --release --workspace --examples && target/release/examples/kernel_bench`.
//!
//! Decode (one activation row) reads every weight once: its figure is the weight bytes
//! read per second, to set beside the machine's memory bandwidth. Prefill (64 rows) is
//! compute: its figure is multiply-adds per second.

use std::time::Instant;

use veil_kernels::{Bytes, GgmlType, Isa, Precision, QMatrix};

fn random_matrix(ty: GgmlType, rows: usize, cols: usize, seed: u64) -> QMatrix {
    // quantize random f32 rows through a Q8_0 round trip is not available for every type;
    // random bits with sane scales exercise the same code
    let (per_block, bytes) = ty.block_layout().expect("readable");
    let mut s = seed | 1;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    let mut data: Vec<u8> = (0..rows * cols / per_block * bytes)
        .map(|_| next() as u8)
        .collect();
    let scales: &[usize] = match ty {
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => &[0],
        GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4_K | GgmlType::Q5_K => &[0, 2],
        GgmlType::Q2_K => &[80, 82],
        GgmlType::Q3_K => &[108],
        GgmlType::Q6_K => &[208],
        _ => &[],
    };
    for blk in data.chunks_exact_mut(bytes) {
        for &at in scales {
            blk[at..at + 2].copy_from_slice(&half::f16::from_f32(0.01).to_le_bytes());
        }
    }
    QMatrix::new(ty, rows, cols, Bytes::from_vec(data)).expect("matrix")
}

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
        ("SmolLM2 attn 576x576", 576, 576),
        ("SmolLM2 ffn 1536x576", 1536, 576),
        ("SmolLM2 head 49152x576", 49152, 576),
        ("1B ffn 8192x2048", 8192, 2048),
        ("1B down 2048x8192", 2048, 8192),
    ];
    let types = [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q8_0,
        GgmlType::Q4_K,
        GgmlType::Q6_K,
    ];
    println!(
        "threads: {}; kernels: {:?}",
        rayon::current_num_threads(),
        Isa::available()
    );
    println!("| shape | type | kernels | decode GB/s | prefill GMAC/s (64 rows) |");
    println!("|---|---|---|---|---|");
    // KERNEL_BENCH=Q4_0 (a type name) or a shape's first word limits the run
    let only = std::env::var("KERNEL_BENCH").unwrap_or_default();
    for (name, rows, cols) in shapes {
        for ty in types {
            if ty.byte_size(cols).is_none()
                || !(only.is_empty() || only == ty.name() || name.starts_with(&only))
            {
                continue;
            }
            let plain = random_matrix(ty, rows, cols, 7);
            let packed = plain.clone().pack();
            let layouts: Vec<(&str, &QMatrix)> = if packed.is_packed() {
                vec![("rows", &plain), ("packed", &packed)]
            } else {
                vec![("rows", &plain)]
            };
            let x1: Vec<f32> = (0..cols)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
                .collect();
            let x64: Vec<f32> = (0..64 * cols)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
                .collect();
            for (isa, (layout, w)) in Isa::available()
                .into_iter()
                .flat_map(|isa| layouts.iter().map(move |l| (isa, *l)))
            {
                let mut out = vec![0.0; rows];
                let t1 = time(
                    || w.matmul_with(isa, &x1, 1, &mut out, Precision::Fast),
                    0.3,
                );
                let mut out64 = vec![0.0; 64 * rows];
                let t64 = time(
                    || w.matmul_with(isa, &x64, 64, &mut out64, Precision::Fast),
                    0.3,
                );
                println!(
                    "| {name} | {ty} {layout} | {isa} | {:.1} | {:.1} |",
                    w.byte_len() as f64 / t1 / 1e9,
                    (64 * rows * cols) as f64 / t64 / 1e9
                );
            }
        }
    }
}
