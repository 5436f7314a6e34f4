//! Per-step decode times on a backend: `cargo run --release --example step_times -- wgpu [tiny]`.
use std::time::Instant;
use veil_model::{BackendKind, Compute, LocalModel, ModelBundle, TokenModel};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let kind: BackendKind = args.get(1).map_or("cpu", |s| s.as_str()).parse()?;
    let bundle = match args.get(2).map(String::as_str) {
        Some("tiny") => ModelBundle::tiny()?,
        _ => ModelBundle::load(
            &std::path::PathBuf::from(std::env::var("HOME")?)
                .join(".veil/models/SmolLM2-135M-Instruct.Q4_1.gguf"),
        )?,
    };
    let (compute, _) = Compute::select(Some(kind))?;
    let mut m = LocalModel::new(&bundle.weights, &compute.device, Some(512));
    let prompt = bundle
        .text
        .tokenizer
        .encode("The quick brown fox jumps over the lazy dog.", false)?;
    for round in 0..2 {
        m.reset();
        let t = Instant::now();
        let mut logits = m.feed(&prompt)?;
        println!(
            "round {round} prefill {} tokens: {:?}",
            prompt.len(),
            t.elapsed()
        );
        let mut times = Vec::new();
        for _ in 0..24 {
            let next = veil_model::sampling::argmax(&logits);
            let t = Instant::now();
            logits = m.feed(&[next])?;
            times.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        println!(
            "round {round} step ms: {:?}",
            times.iter().map(|x| x.round() as i64).collect::<Vec<_>>()
        );
    }
    Ok(())
}
