//! Helpers shared by the model tests.
#![allow(dead_code)]

pub mod reference;

use std::path::PathBuf;

use burn::tensor::Device;
use veil_model::{BackendKind, Compute};

/// The devices to test on: the CPU backend always, and wgpu in a build with the `wgpu`
/// feature — which CI provides through Mesa's software Vulkan device. Set
/// VEIL_TEST_NO_WGPU=1 to skip wgpu on a machine without any Vulkan driver.
pub fn devices() -> Vec<(BackendKind, Device)> {
    let mut out = vec![(BackendKind::Cpu, Compute::cpu().device)];
    if !Compute::WGPU_BUILT {
        eprintln!("note: built without the wgpu feature; testing the CPU backend only");
    } else if std::env::var_os("VEIL_TEST_NO_WGPU").is_none() {
        let wgpu = Compute::wgpu().expect(
            "no wgpu adapter: install mesa-vulkan-drivers (software Vulkan) or set VEIL_TEST_NO_WGPU=1",
        );
        out.push((BackendKind::Wgpu, wgpu.device));
    }
    out
}

/// The SmolLM2 GGUF, as cached by `veil model fetch` (or named by VEIL_TEST_MODEL).
pub fn smollm2_path() -> PathBuf {
    if let Some(p) = std::env::var_os("VEIL_TEST_MODEL") {
        return PathBuf::from(p);
    }
    cached_model("SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2")
}

/// Gemma 3 270M (Q4_K_M), fetched by `veil model fetch gemma3`.
#[allow(dead_code)]
pub fn gemma3_path() -> PathBuf {
    if let Some(p) = std::env::var_os("VEIL_TEST_GEMMA3") {
        return PathBuf::from(p);
    }
    cached_model("gemma-3-270m-q4_k_m.gguf", "gemma3")
}

/// A model in Veil's cache, fetched beforehand as `name`.
fn cached_model(file: &str, name: &str) -> PathBuf {
    let home = std::env::var_os("VEIL_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".veil")))
        .expect("HOME or VEIL_HOME");
    let path = home.join("models").join(file);
    assert!(
        path.exists(),
        "{} is missing: run `cargo run --release -p veil-client -- model fetch {name}` first",
        path.display()
    );
    path
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Token ids from a reference file's JSON array.
#[allow(dead_code)]
pub fn json_ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("array of ids")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}
