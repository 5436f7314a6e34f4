//! The honest differences a verifier sees, measured: a stage's rows run one way (a prompt,
//! then one row per step, as a node serves a session on the CPU) and again another way (one
//! prefill, or chunks of other sizes, as a verifier catches up; on the CPU and on wgpu), for
//! every shard format and both precisions, on the tiny model and on SmolLM2. CPU against CPU
//! must stay far below `integrity::TOLERANCE` (quantized shards: identical), CPU against
//! wgpu far below `GPU_TOLERANCE`.

mod common;

use common::{devices, smollm2_path};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use veil_model::crypto::{
    encrypt_model_quant, ClientModel, KeyOptions, KeyShape, ModelKey, ShardQuant,
};
use veil_model::integrity::{row_errors, GPU_TOLERANCE, TOLERANCE};
use veil_model::nn::tensor_to_vec;
use veil_model::BackendKind;
use veil_model::{Compute, QuantBundle, StageRunner};

/// Run `x` (`[n, d]`) through `runner` in steps of `steps` rows (the last one takes the
/// rest).
fn run(runner: &StageRunner, x: &[f32], d: usize, steps: &[usize], exact: bool) -> Vec<f32> {
    let n = x.len() / d;
    let mut cache = runner.new_cache(n);
    let mut out = Vec::with_capacity(x.len());
    let mut at = 0;
    let mut i = 0;
    while at < n {
        let t = steps.get(i).copied().unwrap_or(n - at).min(n - at);
        i += 1;
        let y = runner
            .forward_host_with(&[&x[at * d..(at + t) * d]], &mut [&mut cache], exact)
            .expect("forward")
            .remove(0);
        out.extend_from_slice(&y);
        at += t;
    }
    out
}

/// Every row's honest difference for `bundle` encrypted as `quant`, over both stages: CPU
/// against CPU, and CPU against wgpu.
fn differences(
    bundle: &QuantBundle,
    quant: ShardQuant,
    exact: bool,
    text: &str,
) -> (Vec<f32>, Vec<f32>) {
    let key = ModelKey::generate(
        KeyShape::of(&bundle.weights.config),
        KeyOptions::default(),
        &mut ChaCha20Rng::seed_from_u64(11),
    );
    let e = encrypt_model_quant(bundle, key, 2, 0, quant, &mut |_, _| {}).expect("encrypt");
    let cpu = Compute::cpu().device;
    let client = ClientModel::new(&e.client, &cpu).expect("client");
    let ids = bundle.text.tokenizer.encode(text, false).expect("tokens");
    let n = ids.len();
    let d = bundle.weights.config.d_model;
    let mut cache = client.new_cache(n);
    let mut x = tensor_to_vec(client.encode(&ids, &mut cache).expect("encode")).expect("rows");
    // a session: a prompt of 24 rows, then one row per step
    let prompt = 24.min(n);
    let session: Vec<usize> = std::iter::once(prompt)
        .chain(std::iter::repeat_n(1, n - prompt))
        .collect();
    let mut shards: Vec<_> = e.shards.iter().collect();
    shards.sort_by_key(|s| s.meta.layers.0);
    let (mut cpu_cpu, mut cpu_gpu) = (Vec::new(), Vec::new());
    for shard in shards {
        let primary = StageRunner::new(shard, &cpu).expect("runner");
        let y = run(&primary, &x, d, &session, exact);
        for (kind, device) in devices() {
            let verifier = match StageRunner::new(shard, &device) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("{quant:?} on {kind}: not re-executed ({e})");
                    continue;
                }
            };
            // the CPU every way; software wgpu is slow: one prefill
            let ways = match kind {
                BackendKind::Cpu => vec![vec![n], vec![13], vec![prompt, 5]],
                BackendKind::Wgpu => vec![vec![n]],
            };
            for steps in ways {
                let again = run(&verifier, &x, d, &steps, exact);
                let mut e = row_errors(&again, &y, d);
                let (p50, p99, max) = quantiles(&mut e);
                eprintln!(
                    "{quant:?}{} layers {:?} on {kind}, steps {steps:?}: row differences p50 \
                     {p50:.1e}, p99 {p99:.1e}, max {max:.1e}",
                    if exact { " exact" } else { "" },
                    shard.meta.layers
                );
                match kind {
                    BackendKind::Cpu => cpu_cpu.extend(e),
                    BackendKind::Wgpu => cpu_gpu.extend(e),
                }
            }
        }
        x = y;
    }
    (cpu_cpu, cpu_gpu)
}

/// Median, 99th percentile and largest of `v` (sorted in place).
fn quantiles(v: &mut [f32]) -> (f32, f32, f32) {
    v.sort_by(f32::total_cmp);
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.99), at(1.0))
}

fn check(bundle: &QuantBundle, name: &str) {
    let mut worst = Vec::new();
    for (quant, exact) in [
        (ShardQuant::F32, false),
        (ShardQuant::Q8_0, false),
        (ShardQuant::Q8_0, true),
        (ShardQuant::Q4_0, false),
    ] {
        let (mut cpu, mut gpu) = differences(bundle, quant, exact, TEXT);
        let (p50, p99, cpu_max) = quantiles(&mut cpu);
        eprintln!(
            "{name} {quant:?} exact={exact}: CPU against CPU, {} rows: p50 {p50:.1e}, p99 \
             {p99:.1e}, max {cpu_max:.1e}",
            cpu.len()
        );
        let gpu_max = if gpu.is_empty() {
            0.0
        } else {
            let (p50, p99, max) = quantiles(&mut gpu);
            eprintln!(
                "{name} {quant:?} exact={exact}: CPU against wgpu, {} rows: p50 {p50:.1e}, \
                 p99 {p99:.1e}, max {max:.1e}",
                gpu.len()
            );
            max
        };
        worst.push((quant, exact, cpu_max, gpu_max));
    }
    for (quant, exact, cpu, gpu) in worst {
        assert!(
            cpu < TOLERANCE / 10.0,
            "{name} {quant:?} exact={exact}: {cpu:.2e}"
        );
        assert!(
            gpu < GPU_TOLERANCE / 2.0,
            "{name} {quant:?} exact={exact}: {gpu:.2e}"
        );
        if quant != ShardQuant::F32 {
            // the quantized kernels compute each row alike whatever shares its step
            assert_eq!(cpu, 0.0, "{name} {quant:?} exact={exact}");
        }
    }
}

const TEXT: &str = "The committee met on a cold morning in March to decide where the new \
    library would stand. Some wanted it near the river, where the old mill had been; others \
    argued for the square, close to the school and the station. After three hours the vote \
    was eleven to four, and the river won.";

#[test]
fn honest_re_executions_of_tiny_stay_far_below_the_tolerance() {
    check(&QuantBundle::tiny().expect("tiny"), "tiny");
}

#[test]
fn honest_re_executions_of_smollm2_stay_far_below_the_tolerance() {
    check(
        &QuantBundle::load(&smollm2_path()).expect("load"),
        "smollm2",
    );
}
