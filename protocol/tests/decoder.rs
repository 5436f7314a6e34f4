//! The decoders on hostile input (the fuzz target in `fuzz/` explores further): random
//! bytes, truncations and bit flips of valid messages, oversized frames and bad tensors are
//! errors, never panics; valid messages round-trip.

use rand::{Rng, SeedableRng};
use veil_protocol::codec::{decode, encode};
use veil_protocol::wire::{
    bytes_to_words, words_to_bytes, ErrorCode, InferRequest, InferResponse, TensorFrame,
    UploadRequest, UploadResponse,
};
use veil_protocol::{Identity, SignedAd};

fn samples() -> Vec<Vec<u8>> {
    let hidden = TensorFrame::from_f32(&[2, 4], &[0.5, -1.0, 2.0, 3.5, 1e-3, 7.0, -8.0, 0.0]);
    vec![
        encode(&InferRequest::Open {
            session: [7; 16],
            shard: [9; 32],
            max_len: 512,
            exact: true,
        })
        .expect("encode"),
        encode(&InferRequest::Step {
            session: [1; 16],
            hidden: hidden.clone(),
        })
        .expect("encode"),
        encode(&InferRequest::Close { session: [2; 16] }).expect("encode"),
        encode(&InferResponse::Hidden {
            receipt: veil_protocol::Statement {
                session: [1; 16],
                shard: [9; 32],
                first_row: 0,
                rows: 1,
                input_chain: [5; 32],
                output_hash: veil_protocol::receipt::frame_hash(&hidden),
            }
            .sign(&veil_protocol::Identity::generate()),
            hidden,
        })
        .expect("encode"),
        encode(&InferResponse::Error {
            code: ErrorCode::Busy,
            message: "full".into(),
        })
        .expect("encode"),
        encode(&UploadRequest::Chunk {
            shard: [3; 32],
            total: 100,
            offset: 0,
            data: vec![1; 100],
        })
        .expect("encode"),
        encode(&UploadResponse::Progress {
            received: 5,
            complete: false,
        })
        .expect("encode"),
        encode(&InferRequest::OpenMasked {
            session: [6; 16],
            shard: [9; 32],
            seed: Some([4; 32]),
            exact: true,
        })
        .expect("encode"),
        encode(&InferRequest::Linear {
            session: [6; 16],
            op: 5,
            words: words_to_bytes(&[1, u32::MAX, 0x8000_0000]),
        })
        .expect("encode"),
        encode(&InferRequest::MaskProducts {
            session: [6; 16],
            op: 5,
            first: 3,
            n: 2,
        })
        .expect("encode"),
        encode(&InferResponse::Words {
            words: words_to_bytes(&[7, 8]),
        })
        .expect("encode"),
    ]
}

fn try_all(bytes: &[u8]) {
    let limit = 1 << 20;
    if let Ok(InferRequest::Linear { words, .. }) = decode::<InferRequest>(bytes, limit) {
        let _ = bytes_to_words(&words);
    }
    if let Ok(InferRequest::Step { hidden, .. }) = decode::<InferRequest>(bytes, limit) {
        let _ = hidden.to_f32();
    }
    let _ = decode::<InferResponse>(bytes, limit);
    let _ = decode::<UploadRequest>(bytes, limit);
    let _ = decode::<UploadResponse>(bytes, limit);
    if let Ok(ad) = SignedAd::from_bytes(bytes) {
        let _ = ad.verify(0);
    }
}

#[test]
fn valid_messages_round_trip() {
    let step = InferRequest::Step {
        session: [4; 16],
        hidden: TensorFrame::from_f32(&[1, 3], &[1.0, 2.0, 3.0]),
    };
    let bytes = encode(&step).expect("encode");
    assert_eq!(
        decode::<InferRequest>(&bytes, bytes.len()).expect("decode"),
        step
    );
    assert!(
        decode::<InferRequest>(&bytes, bytes.len() - 1).is_err(),
        "the size limit holds"
    );
    let mut extra = bytes.clone();
    extra.push(0);
    assert!(
        decode::<InferRequest>(&extra, 1 << 20).is_err(),
        "trailing bytes are refused"
    );
}

/// Masked mode's words travel as little-endian bytes and come back the same; a payload
/// that is not whole words is an error.
#[test]
fn masked_words_round_trip_and_partial_words_are_refused() {
    let words = [0, 1, 0x7fff_ffff, 0x8000_0000, u32::MAX];
    let linear = InferRequest::Linear {
        session: [1; 16],
        op: 9,
        words: words_to_bytes(&words),
    };
    let bytes = encode(&linear).expect("encode");
    let back = decode::<InferRequest>(&bytes, bytes.len()).expect("decode");
    assert_eq!(back, linear);
    let InferRequest::Linear { words: payload, .. } = back else {
        panic!("not a Linear request");
    };
    assert_eq!(bytes_to_words(&payload).expect("words"), words);
    assert!(bytes_to_words(&payload[..payload.len() - 1]).is_err());
    assert_eq!(payload.len(), 4 * words.len(), "raw words, no varints");
}

#[test]
fn random_mutated_and_truncated_input_never_panics() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    for _ in 0..20_000 {
        let n = rng.gen_range(0..256);
        let bytes: Vec<u8> = (0..n).map(|_| rng.gen()).collect();
        try_all(&bytes);
    }
    for s in samples() {
        for cut in 0..s.len() {
            try_all(&s[..cut]);
        }
        for _ in 0..2_000 {
            let mut m = s.clone();
            for _ in 0..rng.gen_range(1..4) {
                let i = rng.gen_range(0..m.len());
                m[i] ^= 1 << rng.gen_range(0..8);
            }
            try_all(&m);
        }
    }
}

#[test]
fn huge_claimed_lengths_do_not_allocate_or_panic() {
    // a Step whose tensor claims 2^40 bytes
    let mut bytes = encode(&InferRequest::Step {
        session: [0; 16],
        hidden: TensorFrame::from_f32(&[1], &[1.0]),
    })
    .expect("encode");
    let n = bytes.len();
    bytes.truncate(n - 5);
    bytes.extend([0xfd, 0, 0, 0, 0, 0, 1, 0, 0]);
    assert!(decode::<InferRequest>(&bytes, 1 << 20).is_err());
}

#[test]
fn bad_tensors_are_rejected() {
    let bad = [
        TensorFrame {
            dtype: veil_protocol::wire::WireDType::F32,
            shape: vec![2, 2],
            data: vec![0; 15],
        },
        TensorFrame {
            dtype: veil_protocol::wire::WireDType::F32,
            shape: vec![],
            data: vec![],
        },
        TensorFrame {
            dtype: veil_protocol::wire::WireDType::F32,
            shape: vec![u32::MAX, u32::MAX, u32::MAX],
            data: vec![],
        },
        TensorFrame::from_f32(&[1, 2], &[1.0, f32::NAN]),
        TensorFrame::from_f32(&[1, 1], &[f32::INFINITY]),
    ];
    for t in bad {
        assert!(t.to_f32().is_err(), "{t:?}");
    }
}

#[test]
fn signed_ads_survive_the_wire_and_reject_tampering() {
    let id = Identity::generate();
    let ad = veil_protocol::CapacityAd {
        peer_id: id.peer_id().to_string(),
        addrs: vec![],
        reachability: Default::default(),
        backend: "cpu".into(),
        adapter: "flex".into(),
        free_memory_bytes: 1,
        free_disk_bytes: 0,
        throughput_gflops: 1.0,
        shards: vec![],
        active_sessions: 0,
        max_sessions: 1,
        version: "0.1.0".into(),
        timestamp_ms: 1_000,
        ttl_s: 60,
    };
    let s = SignedAd::sign(&ad, &id).expect("sign");
    let bytes = s.to_bytes().expect("bytes");
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    for _ in 0..500 {
        let mut m = bytes.clone();
        let i = rng.gen_range(0..m.len());
        m[i] ^= 1 << rng.gen_range(0..8);
        if let Ok(ad) = SignedAd::from_bytes(&m) {
            if ad != s {
                assert!(ad.verify(1_500).is_err(), "a tampered ad verified");
            }
        }
    }
}
