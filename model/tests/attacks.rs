//! The attack suite on the tiny model. With the public weights the attacks must succeed
//! (if one stops working, the test fails: a broken attack would make the security table
//! look better than it is); against a private model and a dense key they must not.

use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use veil_model::attack::invariants::{self, InvariantOptions};
use veil_model::attack::inversion::{self, Corpus, InversionOptions, Inverter};
use veil_model::attack::key_recovery::{
    decrypt_and_match, decrypt_rows, recover_q, relative_error,
};
use veil_model::attack::sequential::{self, SequentialOptions};
use veil_model::attack::{
    finetuned, norms, perturbed, position0_table, record_views, sorted_coords, Deployment,
    NodeView, Rate,
};
use veil_model::crypto::{KeyOptions, KeyShape, ModelKey};
use veil_model::{Compute, ModelBundle};

fn prompts(b: &ModelBundle) -> Vec<Vec<u32>> {
    [
        "the quick brown fox",
        "hello there, node",
        "what does the node see?",
        "attacks on encrypted inference",
        "a b c d e f",
        "zebra crossing at noon",
    ]
    .iter()
    .map(|p| b.text.prompt_tokens(p, true).expect("tokens"))
    .collect()
}

fn key(b: &ModelBundle, permutation_only: bool, seed: u64) -> ModelKey {
    ModelKey::generate(
        KeyShape::of(&b.weights.config),
        KeyOptions {
            permutation_only,
            ..KeyOptions::default()
        },
        &mut ChaCha20Rng::seed_from_u64(seed),
    )
}

fn view(owner: &ModelBundle, k: ModelKey) -> NodeView {
    view_with(owner, k, 0)
}

fn view_with(owner: &ModelBundle, k: ModelKey, client_layers: usize) -> NodeView {
    view_at(owner, k, client_layers, 0)
}

fn view_at(owner: &ModelBundle, k: ModelKey, client_layers: usize, stage: usize) -> NodeView {
    let device = Compute::cpu().device;
    let p = prompts(owner);
    let deployment = Deployment {
        stages: 2,
        client_layers,
        client_last_layers: 0,
        observed_stage: stage,
    };
    record_views(owner, k, deployment, &p, 8, &device).expect("record")
}

fn score(view: &NodeView, guesses: &[Vec<u32>]) -> Rate {
    view.score(guesses)
}

#[test]
fn with_public_weights_the_key_and_every_token_are_recovered() {
    let public = ModelBundle::tiny().expect("tiny");
    let k = key(&public, false, 5);
    let q = k.q.clone();
    let v = view(&public, k);
    let est = recover_q(
        &v.shard.layers.f32().expect("f32")[0],
        &public.weights.layers[0],
    )
    .expect("recover");
    assert!(est.explained > 0.99, "explained {}", est.explained);
    let err = relative_error(&est.q, &q);
    assert!(err < 1e-3, "Q recovered to {err}");
    let device = Compute::cpu().device;
    let guesses = decrypt_and_match(&v, &est.q, &public.weights.embedding, &device).expect("match");
    let rate = score(&v, &guesses);
    assert_eq!(rate.hits, rate.trials, "{rate}");
    assert!(rate.trials >= 6 * 8);
}

#[test]
fn norms_and_gram_matrices_reveal_tokens_of_a_public_model() {
    let public = ModelBundle::tiny().expect("tiny");
    let v = view(&public, key(&public, false, 6));
    let first: Vec<(u32, u32)> = norms::guess(&v, &public.weights.embedding)
        .iter()
        .zip(&v.sessions)
        .map(|(g, s)| (g[0], s.truth[0]))
        .collect();
    let first_hits = first.iter().filter(|(g, t)| g == t).count();
    assert_eq!(first_hits, first.len(), "first tokens by norm: {first:?}");
    let by_norm = score(&v, &norms::guess(&v, &public.weights.embedding));
    let by_gram = score(
        &v,
        &invariants::guess(&v, &public.weights.embedding, InvariantOptions::default()),
    );
    assert!(by_norm.rate > 0.9, "norms: {by_norm}");
    assert!(
        by_gram.rate >= by_norm.rate,
        "gram {by_gram} < norms {by_norm}"
    );
}

#[test]
fn a_private_model_defeats_the_attacks_that_a_public_one_does_not() {
    let public = ModelBundle::tiny().expect("tiny");
    let private = perturbed(&public, 0.3, 9).expect("private");
    let v = view(&private, key(&private, false, 7));
    let est = recover_q(
        &v.shard.layers.f32().expect("f32")[0],
        &public.weights.layers[0],
    )
    .expect("recover");
    assert!(est.explained < 0.5, "explained {}", est.explained);
    let device = Compute::cpu().device;
    let decrypted = score(
        &v,
        &decrypt_and_match(&v, &est.q, &public.weights.embedding, &device).expect("match"),
    );
    let by_norm = score(&v, &norms::guess(&v, &public.weights.embedding));
    assert!(
        decrypted.rate < 0.5,
        "key recovery on a private model: {decrypted}"
    );
    assert!(by_norm.rate < 0.5, "norms on a private model: {by_norm}");
}

#[test]
fn sorted_coordinates_break_a_permutation_key_but_not_a_rotation() {
    let public = ModelBundle::tiny().expect("tiny");
    let perm = view(&public, key(&public, true, 8));
    let dense = view(&public, key(&public, false, 8));
    let on_perm = score(
        &perm,
        &sorted_coords::guess(&perm, &public.weights.embedding),
    );
    let on_dense = score(
        &dense,
        &sorted_coords::guess(&dense, &public.weights.embedding),
    );
    assert_eq!(on_perm.hits, on_perm.trials, "{on_perm}");
    assert!(on_dense.rate < 0.2, "{on_dense}");
    // a lightly perturbed private model still leaks through a permutation key
    let private = perturbed(&public, 0.05, 9).expect("private");
    let leaky = view(&private, key(&private, true, 8));
    let on_private = score(
        &leaky,
        &sorted_coords::guess(&leaky, &public.weights.embedding),
    );
    assert!(on_private.rate > 0.5, "{on_private}");
}

#[test]
fn client_layers_send_no_embedding_yet_the_key_and_first_token_still_fall() {
    let public = ModelBundle::tiny().expect("tiny");
    let device = Compute::cpu().device;
    let k = key(&public, false, 10);
    let q = k.q.clone();
    let v = view_with(&public, k, 1);
    assert_eq!(v.shard.meta.layers.0, 1, "the first node starts at layer 1");
    // the key still falls to the public weights of layer 1
    let est = recover_q(
        &v.shard.layers.f32().expect("f32")[0],
        &public.weights.layers[1],
    )
    .expect("recover");
    assert!(relative_error(&est.q, &q) < 1e-3, "the key still falls");
    // what the node decrypts is no embedding row
    let rows = decrypt_rows(&v, &est.q);
    let s = &v.sessions[0];
    let e = public.weights.embedding.row(s.truth[0] as usize);
    let diff: f32 = rows[0][..v.d_model]
        .iter()
        .zip(e)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(diff > 1e-3, "the first node received an embedding row");
    // position 0 depends on its token alone: the attacker's table finds it
    let table = position0_table(&public.weights, 1, &device).expect("table");
    let first = norms::guess(&v, &table);
    let hits = v
        .sessions
        .iter()
        .zip(&first)
        .filter(|(s, g)| g[0] == s.truth[0])
        .count();
    assert_eq!(
        hits,
        v.sessions.len(),
        "first tokens via the position-0 table"
    );
    // and the decrypted first vector is exactly the table's row
    let exact = decrypt_and_match(&v, &est.q, &table, &device).expect("match");
    assert!(v
        .sessions
        .iter()
        .zip(&exact)
        .all(|(s, g)| g[0] == s.truth[0]));
}

fn sequential_rate(public: &ModelBundle, v: &NodeView, opts: SequentialOptions) -> Rate {
    let device = Compute::cpu().device;
    let t = &public.text.tokenizer;
    let bos = t.bos.filter(|_| t.add_bos);
    let r = sequential::guess(v, &public.weights, bos, opts, &device).expect("sequential");
    score(v, &r.guesses)
}

#[test]
fn the_whole_vocabulary_prefilter_alone_finds_every_token_of_a_public_model() {
    // one candidate per position, from the prefilter only: it must predict the node's
    // first-layer scores exactly (RoPE turned back on the keys, heads sorted)
    let public = ModelBundle::tiny().expect("tiny");
    let v = view(&public, key(&public, false, 12));
    let only_prefilter = SequentialOptions {
        layers: 1,
        lm_candidates: 0,
        norm_candidates: 1,
    };
    let rate = sequential_rate(&public, &v, only_prefilter);
    assert_eq!(rate.hits, rate.trials, "{rate}");
}

#[test]
fn sequential_matching_recovers_a_public_model_behind_client_layers_and_on_a_middle_stage() {
    // every token of the tiny vocabulary as a candidate: the attack is exact wherever the
    // public model is the owner's, whatever the node's position in the pipeline
    let public = ModelBundle::tiny().expect("tiny");
    let vocab = public.weights.config.vocab_size;
    let all = SequentialOptions {
        layers: 2,
        lm_candidates: vocab,
        norm_candidates: 0,
    };
    for (client_layers, stage) in [(0, 0), (1, 0), (0, 1)] {
        let v = view_at(&public, key(&public, false, 13), client_layers, stage);
        if stage == 1 {
            assert!(v.shard.meta.layers.0 > 0, "a middle stage");
        }
        let rate = sequential_rate(&public, &v, all);
        assert_eq!(
            rate.hits, rate.trials,
            "{client_layers} client layers, stage {stage}: {rate}"
        );
    }
}

#[test]
fn sequential_matching_sees_through_a_finetune_but_not_a_distant_private_model() {
    let public = ModelBundle::tiny().expect("tiny");
    let opts = SequentialOptions::default();
    // a LoRA-style fine-tune keeps the token table and moves the projections a little
    let tuned = finetuned(&public, 0.05, 4, 3).expect("finetune");
    let v = view(&tuned, key(&tuned, false, 14));
    let on_tuned = sequential_rate(&public, &v, opts);
    assert!(on_tuned.rate > 0.6, "fine-tune: {on_tuned}");
    // a model far from the public one: its computation is not the public one's
    let far = perturbed(&public, 0.3, 9).expect("private");
    let v = view(&far, key(&far, false, 14));
    let on_far = sequential_rate(&public, &v, opts);
    assert!(on_far.rate < 0.3, "distant private model: {on_far}");
}

fn inversion_rate(public: &ModelBundle, v: &NodeView) -> (Rate, inversion::TrainReport) {
    let device = Compute::cpu().device;
    let opts = InversionOptions::default();
    let corpus = Corpus::build(public, opts, &device).expect("corpus");
    let inverter =
        Inverter::train(public, &corpus, v.shard.meta.layers, opts, &device).expect("train");
    let guesses = inverter.guess(v, &device).expect("guess");
    (score(v, &guesses), inverter.report)
}

#[test]
fn learned_inversion_reads_a_public_model_but_not_a_distant_private_one() {
    let public = ModelBundle::tiny().expect("tiny");
    let v = view(&public, key(&public, false, 15));
    let (on_public, report) = inversion_rate(&public, &v);
    eprintln!("public: {on_public}, {report:?}");
    let far = perturbed(&public, 0.3, 9).expect("private");
    let v = view(&far, key(&far, false, 15));
    let (on_far, _) = inversion_rate(&public, &v);
    eprintln!("distant private: {on_far}");
    assert!(on_public.rate > 0.5, "public model: {on_public}");
    assert!(on_far.rate < 0.3, "distant private model: {on_far}");
}
