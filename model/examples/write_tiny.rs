//! Write a tiny random model of one architecture family as a GGUF file, for reference data
//! computed outside the project (`tools/reference/make_arch_data.py`).
//!
//! `cargo run --release -p veil-model --example write_tiny -- qwen3 /tmp/tiny-qwen3.gguf`

use veil_model::tiny::{tiny_variant_gguf, TinyVariant, TINY_SEED};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [variant, out] = args.as_slice() else {
        let names: Vec<&str> = TinyVariant::ALL.iter().map(|v| v.name()).collect();
        return Err(format!("usage: write_tiny {} OUT.gguf", names.join("|")).into());
    };
    let v: TinyVariant = variant.parse()?;
    std::fs::write(out, tiny_variant_gguf(v, TINY_SEED)?)?;
    eprintln!("wrote {out}");
    Ok(())
}
