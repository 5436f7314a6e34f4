//! Fraud proofs: what convicts a node, checkable offline by anyone with `veil verify-proof`.
//!
//! A proof holds every input row the node's session was sent up to its wrong answers, those
//! answers, and the node's signed receipts for them. Checking it: the receipts must carry
//! the node's signature and commit to exactly these inputs (their hash chain) and answers
//! (their hash), so the node did give these answers to these inputs; then the stage is
//! recomputed from its shard, and the node is guilty if an answer differs beyond the
//! tolerance. A forged proof fails the first step (it cannot carry the node's signature over
//! answers the node did not give); a genuine receipt over a correct answer fails the second:
//! a proof never convicts an honest node.

use std::path::Path;

use anyhow::{bail, Context, Result};
use veil_model::container::Container;
use veil_model::crypto::Shard;
use veil_model::integrity::{first_disagreement, row_errors};
use veil_model::StageRunner;
pub use veil_protocol::proof::FraudProof;
#[cfg(test)]
use veil_protocol::proof::{from_hex, to_hex};

/// What checking a proof found.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// The node signed an answer that differs from the recomputed one.
    Guilty { row: usize, error: f32 },
    /// Every answer it signed is right: the proof does not hold.
    Innocent { largest_error: f32 },
    /// The receipts are genuine, but without the shard nothing was recomputed.
    Unchecked,
}

pub fn read(path: &Path) -> Result<FraudProof> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    FraudProof::from_bytes(&bytes).with_context(|| format!("{}", path.display()))
}

pub fn write(proof: &FraudProof, path: &Path) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, proof.to_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Check `proof`: the receipts first (an error says why the proof is rejected), then, with
/// `shard`, the answers, recomputed here.
pub fn check(proof: &FraudProof, shard: Option<(&Shard, [u8; 32])>) -> Result<Verdict> {
    let opened = proof.open()?;
    let Some((shard, id)) = shard else {
        return Ok(Verdict::Unchecked);
    };
    if id != opened.shard {
        bail!(
            "the shard given is not the proof's ({})",
            &proof.shard[..12]
        );
    }
    let d = proof.d_model;
    let device = veil_model::Compute::cpu().device;
    let runner = StageRunner::new(shard, &device)?;
    if runner.meta().layers != proof.layers {
        bail!(
            "the proof says layers {:?}, the shard holds {:?}",
            proof.layers,
            runner.meta().layers
        );
    }
    let n = opened.inputs.len() / d;
    let mut cache = runner.new_cache(n);
    let truth = runner
        .forward_host_with(&[&opened.inputs], &mut [&mut cache], proof.exact)?
        .remove(0);
    let tol = crate::remote::tolerance(proof.gpu, false);
    let mut largest = 0.0f32;
    for (first, out) in &opened.answers {
        let right = &truth[first * d..first * d + out.len()];
        if let Some((k, error)) = first_disagreement(out, right, d, tol) {
            return Ok(Verdict::Guilty {
                row: first + k,
                error,
            });
        }
        largest = row_errors(out, right, d)
            .into_iter()
            .fold(largest, f32::max);
    }
    Ok(Verdict::Innocent {
        largest_error: largest,
    })
}

#[derive(clap::Args, Debug)]
pub struct VerifyProofArgs {
    /// The proof (`$VEIL_HOME/proofs/*.json`, or one received from someone else).
    pub file: std::path::PathBuf,
    /// The stage's shard file [default: found among this client's deployments].
    #[arg(long)]
    pub shard: Option<std::path::PathBuf>,
}

/// `veil verify-proof`: prints the verdict on stdout; returns the exit code (0: the node is
/// proven to have lied, 1: it is not, 2: receipts genuine but nothing to recompute with).
pub fn run(args: VerifyProofArgs) -> Result<i32> {
    let proof = read(&args.file)?;
    let shard = match &args.shard {
        Some(p) => Some(read_shard(p)?),
        None => find_shard(&proof.shard)?,
    };
    let verdict = match check(&proof, shard.as_ref().map(|(s, id)| (s, *id))) {
        Ok(v) => v,
        Err(e) => {
            println!("rejected: {e:#}");
            return Ok(1);
        }
    };
    Ok(match verdict {
        Verdict::Guilty { row, error } => {
            println!(
                "proven: {} signed a wrong answer for position {row} of stage {} (relative \
                 error {error:.3} from the recomputed answer)",
                proof.peer, proof.stage
            );
            0
        }
        Verdict::Innocent { largest_error } => {
            println!(
                "not proven: every answer {} signed is right (largest relative difference \
                 {largest_error:.1e})",
                proof.peer
            );
            1
        }
        Verdict::Unchecked => {
            println!(
                "the receipts are genuine ({} signed these answers to these inputs), but the \
                 shard {} is not here to recompute them: pass --shard FILE",
                proof.peer,
                &proof.shard[..12]
            );
            2
        }
    })
}

/// A shard file and its content hash.
pub fn read_shard(path: &Path) -> Result<(Shard, [u8; 32])> {
    let c = Container::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let shard =
        Shard::from_container(&c).with_context(|| format!("{} is not a shard", path.display()))?;
    let id = hex::decode(c.data_sha256())
        .ok()
        .and_then(|b| b.try_into().ok())
        .context("the shard's hash")?;
    Ok((shard, id))
}

/// The shard `id` among this client's deployments, if it holds it.
pub fn find_shard(id: &str) -> Result<Option<(Shard, [u8; 32])>> {
    let dir = crate::deployment::deployments_dir()?;
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Ok(None);
    };
    for e in entries.flatten() {
        let Ok(record) = crate::deployment::Deployment::load(&e.file_name().to_string_lossy())
        else {
            continue;
        };
        if let Some(s) = record.stages.iter().find(|s| s.shard == id) {
            let path = e.path().join(format!("shard-{}.veil", s.stage));
            if path.exists() {
                return read_shard(&path).map(Some);
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use veil_model::crypto::{encrypt_model_quant, KeyOptions, KeyShape, ModelKey, ShardQuant};
    use veil_model::QuantBundle;
    use veil_protocol::receipt::frame_hash;
    use veil_protocol::wire::TensorFrame;
    use veil_protocol::{Identity, InputChain, Receipt, Statement};

    use super::*;

    /// A tiny stage's shard, its id, and `n` input rows.
    fn stage(n: usize) -> (Shard, [u8; 32], Vec<f32>, usize) {
        let b = QuantBundle::tiny().expect("tiny");
        let key = ModelKey::generate(
            KeyShape::of(&b.weights.config),
            KeyOptions::default(),
            &mut rand_chacha::ChaCha20Rng::seed_from_u64(5),
        );
        let e =
            encrypt_model_quant(&b, key, 1, 0, ShardQuant::Q8_0, &mut |_, _| {}).expect("encrypt");
        let dir = tempfile::tempdir().expect("dir");
        e.write(dir.path()).expect("write");
        let (shard, id) = read_shard(&dir.path().join("shard-0.veil")).expect("shard");
        let d = b.weights.config.d_model;
        let inputs = (0..n * d)
            .map(|i| ((i * 37 % 101) as f32 / 101.0) - 0.5)
            .collect();
        (shard, id, inputs, d)
    }

    /// A node's signed answers to `inputs` in one-row steps after a 3-row prompt, with
    /// `corrupt` applied to the answer of row 5.
    fn answers(
        node: &Identity,
        shard: &Shard,
        id: [u8; 32],
        inputs: &[f32],
        d: usize,
        corrupt: impl Fn(&mut [f32]),
    ) -> Vec<(Receipt, Vec<f32>)> {
        let runner = StageRunner::new(shard, &veil_model::Compute::cpu().device).expect("runner");
        let n = inputs.len() / d;
        let mut cache = runner.new_cache(n);
        let mut chain = InputChain::new(&id);
        let mut out = Vec::new();
        let mut at = 0;
        while at < n {
            let t = if at == 0 { 3 } else { 1 };
            let x = &inputs[at * d..(at + t) * d];
            let mut y = runner
                .forward_host_with(&[x], &mut [&mut cache], false)
                .expect("forward")
                .remove(0);
            if at == 5 {
                corrupt(&mut y);
            }
            chain.push_rows(x, d);
            let receipt = Statement {
                session: [1; 16],
                shard: id,
                first_row: at as u64,
                rows: t as u32,
                input_chain: chain.hash(),
                output_hash: frame_hash(&TensorFrame::from_f32(&[t, d], &y)),
            }
            .sign(node);
            out.push((receipt, y));
            at += t;
        }
        out
    }

    fn proof(
        node: &Identity,
        id: [u8; 32],
        inputs: &[f32],
        d: usize,
        a: &[(Receipt, Vec<f32>)],
    ) -> FraudProof {
        FraudProof::new(
            &node.peer_id(),
            &id,
            0,
            (0, 4),
            d,
            (false, false),
            inputs,
            a,
            "local",
        )
    }

    #[test]
    fn a_signed_wrong_answer_convicts_and_a_right_one_does_not() {
        let (shard, id, inputs, d) = stage(8);
        let liar = Identity::generate();
        let wrong = answers(&liar, &shard, id, &inputs, d, |y| y[0] += 1.0);
        let p = proof(&liar, id, &inputs, d, &wrong);
        assert_eq!(
            check(&p, None).expect("genuine receipts"),
            Verdict::Unchecked
        );
        match check(&p, Some((&shard, id))).expect("checked") {
            Verdict::Guilty { row, .. } => assert_eq!(row, 5),
            other => panic!("expected guilty, got {other:?}"),
        }
        // an honest node's signed answers, put in a proof: innocent
        let honest = Identity::generate();
        let right = answers(&honest, &shard, id, &inputs, d, |_| {});
        let p = proof(&honest, id, &inputs, d, &right);
        match check(&p, Some((&shard, id))).expect("checked") {
            Verdict::Innocent { largest_error } => assert_eq!(largest_error, 0.0),
            other => panic!("expected innocent, got {other:?}"),
        }
        // written and read back
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("p.json");
        write(&p, &path).expect("write");
        assert_eq!(
            check(&read(&path).expect("read"), Some((&shard, id))).expect("check"),
            Verdict::Innocent { largest_error: 0.0 }
        );
    }

    #[test]
    fn forged_proofs_are_rejected_with_a_reason() {
        let (shard, id, inputs, d) = stage(8);
        let honest = Identity::generate();
        let right = answers(&honest, &shard, id, &inputs, d, |_| {});
        let reason =
            |p: &FraudProof| format!("{:#}", check(p, Some((&shard, id))).expect_err("rejected"));
        // the answer changed after signing: its receipt no longer signs it
        let mut forged = proof(&honest, id, &inputs, d, &right);
        let mut out = from_hex(&forged.answers[2].output, "o").expect("hex");
        out[0] += 1.0;
        forged.answers[2].output = to_hex(&out);
        assert!(reason(&forged).contains("not the answer its receipt signs"));
        // another input than the node was sent
        let mut forged = proof(&honest, id, &inputs, d, &right);
        let mut x = from_hex(&forged.inputs, "i").expect("hex");
        x[d] += 1.0;
        forged.inputs = to_hex(&x);
        assert!(reason(&forged).contains("other inputs"));
        // someone else's signature, or an accusation of another peer
        let mut forged = proof(&honest, id, &inputs, d, &right);
        forged.peer = Identity::generate().peer_id().to_string();
        assert!(reason(&forged).contains("not by the accused"));
        // a tampered receipt
        let mut forged = proof(&honest, id, &inputs, d, &right);
        forged.answers[0].receipt.rows += 1;
        assert!(reason(&forged).contains("signature"));
        // garbage
        let mut forged = proof(&honest, id, &inputs, d, &right);
        forged.inputs = "zz".into();
        assert!(reason(&forged).contains("not hex"));
    }
}
