//! Tests of the discrete-event model against cases with known answers.
use super::*;

fn quiet() -> SimParams {
    SimParams {
        speed_sigma: 0.0,
        latency_ms: (0.0, 0.0),
        bandwidth_mbit: 1e12,
        duration_s: 30.0,
        warmup_s: 5.0,
        ..SimParams::default()
    }
}

#[test]
fn one_session_on_idle_uniform_nodes_takes_the_sum_of_its_stages() {
    let p = SimParams {
        nodes: 3,
        sessions: 1,
        ..quiet()
    };
    let r = simulate(&p);
    // three stages of 10 layers, one row each, plus the hop overheads and the client
    let want = 3.0 * (10.0 * (0.85 + 0.09) + 1.6) + 1.5;
    assert!(
        (r.per_token.p50_ms - want).abs() < 0.01,
        "{} vs {want}",
        r.per_token.p50_ms
    );
    assert_eq!(r.stages, 3);
    assert_eq!(r.replicas, 1);
}

#[test]
fn link_latency_adds_two_trips_per_stage() {
    let fast = simulate(&SimParams {
        nodes: 3,
        sessions: 1,
        ..quiet()
    });
    let slow = simulate(&SimParams {
        nodes: 3,
        sessions: 1,
        latency_ms: (10.0, 10.0),
        ..quiet()
    });
    let added = slow.per_token.p50_ms - fast.per_token.p50_ms;
    assert!((added - 60.0).abs() < 0.01, "added {added} ms");
}

#[test]
fn chaining_stages_saves_a_trip_per_stage_boundary() {
    let relay = |relay| {
        simulate(&SimParams {
            nodes: 3,
            sessions: 1,
            latency_ms: (10.0, 10.0),
            relay,
            ..quiet()
        })
    };
    let saved = relay(Relay::Client).per_token.p50_ms - relay(Relay::Chain).per_token.p50_ms;
    // client relay: 6 one-way trips; chain: 4
    assert!((saved - 20.0).abs() < 0.01, "saved {saved} ms");
}

#[test]
fn batching_serves_many_sessions_for_little_more_than_one() {
    let one = simulate(&SimParams {
        nodes: 3,
        sessions: 1,
        ..quiet()
    });
    let eight = simulate(&SimParams {
        nodes: 3,
        sessions: 8,
        ..quiet()
    });
    assert!(eight.tokens_per_s > 3.0 * one.tokens_per_s);
    assert!(eight.per_token.p50_ms < 8.0 * one.per_token.p50_ms);
}

#[test]
fn throughput_grows_with_the_network_and_runs_repeat() {
    let base = SimParams::default();
    let r = sweep(&base, &[9, 90], 2.0);
    assert!(r[1].tokens_per_s > 5.0 * r[0].tokens_per_s, "{r:?}");
    let again = sweep(&base, &[9], 2.0);
    assert_eq!(again[0].tokens, r[0].tokens, "the seed fixes the run");
}

#[test]
fn least_loaded_routing_beats_random_on_uneven_nodes() {
    let p = SimParams {
        nodes: 60,
        sessions: 120,
        speed_sigma: 0.8,
        ..SimParams::default()
    };
    let random = simulate(&SimParams {
        routing: Routing::Random,
        ..p.clone()
    });
    let least = simulate(&SimParams {
        routing: Routing::LeastLoaded,
        ..p
    });
    assert!(
        least.per_token.p95_ms < random.per_token.p95_ms,
        "{least:?} vs {random:?}"
    );
}

#[test]
fn known_links_add_both_uplinks_and_a_relay_twice() {
    let per_token = |relayed: Vec<bool>, relay: Relay| {
        simulate(&SimParams {
            nodes: 2,
            sessions: 1,
            layers: 20,
            layers_per_node: 10,
            links: Some(Links {
                client_ms: 5.0,
                node_ms: vec![10.0, 20.0],
                relayed,
                relay_ms: 2.0,
            }),
            relay,
            ..quiet()
        })
        .per_token
        .p50_ms
    };
    let compute = 2.0 * (10.0 * (0.85 + 0.09) + 1.6) + 1.5;
    // two stages, each a round trip over the client's uplink and the node's
    let direct = per_token(vec![false, false], Relay::Client);
    let want = compute + 2.0 * (5.0 + 10.0) + 2.0 * (5.0 + 20.0);
    assert!((direct - want).abs() < 0.01, "{direct} vs {want}");
    // the second node through a relay: its round trip crosses the relay's uplink 4 times
    let relayed = per_token(vec![false, true], Relay::Client);
    assert!(
        (relayed - direct - 4.0 * 2.0).abs() < 0.01,
        "{relayed} vs {direct}"
    );
    // chained: client → node 0 → node 1 → client
    let chain = per_token(vec![false, false], Relay::Chain);
    let want = compute + (5.0 + 10.0) + (10.0 + 20.0) + (20.0 + 5.0);
    assert!((chain - want).abs() < 0.01, "{chain} vs {want}");
}

#[test]
fn nodes_sharing_one_machine_wait_for_its_passes() {
    let p = SimParams {
        nodes: 3,
        sessions: 6,
        ..quiet()
    };
    let own = simulate(&p);
    let shared = simulate(&SimParams {
        machine_passes: 1,
        ..p.clone()
    });
    // one pass at a time: the busiest the machine can be is one node's worth
    let busy: f64 = shared.mean_utilisation * 3.0;
    assert!(busy <= 1.0 + 1e-6, "{shared:?}");
    assert!(
        shared.tokens_per_s < own.tokens_per_s,
        "{shared:?} vs {own:?}"
    );
    // with one session there is nothing to wait for
    let one = |machine_passes| {
        simulate(&SimParams {
            sessions: 1,
            machine_passes,
            ..p.clone()
        })
        .per_token
        .p50_ms
    };
    assert!((one(1) - one(0)).abs() < 0.01);
}
