use std::sync::OnceLock;

use rand::SeedableRng;
use veil_model::crypto::{encrypt_model_quant, KeyOptions, KeyShape, ModelKey, ShardQuant};
use veil_model::ModelBundle;

use super::*;

/// Two valid shards of the tiny model (its two stages), as uploaded bytes.
fn shards() -> &'static [(ShardId, Vec<u8>)] {
    static SHARDS: OnceLock<Vec<(ShardId, Vec<u8>)>> = OnceLock::new();
    SHARDS.get_or_init(|| {
        let b = ModelBundle::tiny().expect("tiny");
        let key = ModelKey::generate(
            KeyShape::of(&b.weights.config),
            KeyOptions::default(),
            &mut rand_chacha::ChaCha20Rng::seed_from_u64(5),
        );
        let e =
            encrypt_model_quant(&b, key, 2, 0, ShardQuant::F32, &mut |_, _| {}).expect("encrypt");
        e.shards
            .iter()
            .map(|s| {
                let w = s.to_writer().expect("writer");
                let id: ShardId = hex::decode(w.data_sha256())
                    .expect("hex")
                    .try_into()
                    .expect("32");
                (id, w.to_bytes().expect("bytes"))
            })
            .collect()
    })
}

fn peer(n: u8) -> PeerId {
    veil_protocol::Identity::from_secret([n; 32]).peer_id()
}

fn none() -> HashSet<ShardId> {
    HashSet::new()
}

fn limits(max_bytes: u64, max_peer_bytes: u64) -> DiskLimits {
    DiskLimits {
        max_shard_bytes: 1 << 30,
        max_bytes,
        max_peer_bytes,
        partial_timeout: Duration::from_secs(600),
        evict_unused_after: Some(Duration::from_secs(3600)),
    }
}

/// Upload a whole shard in two chunks.
fn upload(
    s: &ShardStore,
    (id, bytes): &(ShardId, Vec<u8>),
    who: &PeerId,
) -> Result<(), StoreError> {
    let total = bytes.len() as u64;
    let half = bytes.len() / 2;
    s.write_chunk(id, total, 0, &bytes[..half], who, &none())?;
    let p = s.write_chunk(id, total, half as u64, &bytes[half..], who, &none())?;
    assert!(p.complete);
    Ok(())
}

fn set_age(path: &Path, age: Duration) {
    let f = std::fs::File::options()
        .write(true)
        .open(path)
        .expect("open");
    f.set_modified(SystemTime::now() - age).expect("mtime");
}

#[test]
fn an_upload_over_the_quota_is_refused_before_its_first_byte() {
    let dir = tempfile::tempdir().expect("tempdir");
    let [a, b, ..] = shards() else { panic!() };
    let quota = a.1.len() as u64 + b.1.len() as u64 / 2;
    let s = ShardStore::open(dir.path(), limits(quota, u64::MAX)).expect("store");
    upload(&s, a, &peer(1)).expect("the first fits");
    let e = s
        .admit(&b.0, b.1.len() as u64, &peer(2), &none())
        .expect_err("the second does not");
    assert!(e.is_no_space(), "{e}");
    let msg = e.to_string();
    assert!(msg.contains("max_disk_mib"), "{msg}");
    assert!(s.progress(&b.0).received == 0 && !s.partial_path(&b.0).exists());
    // a chunk sent without asking first is refused the same way
    let e = s
        .write_chunk(&b.0, b.1.len() as u64, 0, &b.1[..100], &peer(2), &none())
        .expect_err("chunk");
    assert!(e.is_no_space());
    assert_eq!(s.usage().used, a.1.len() as u64);
}

#[test]
fn partial_uploads_count_at_their_announced_size() {
    let dir = tempfile::tempdir().expect("tempdir");
    let [a, b, ..] = shards() else { panic!() };
    let quota = a.1.len() as u64 + b.1.len() as u64 - 1;
    let s = ShardStore::open(dir.path(), limits(quota, u64::MAX)).expect("store");
    // the first upload has sent nothing yet, but its size is reserved
    s.admit(&a.0, a.1.len() as u64, &peer(1), &none())
        .expect("admitted");
    assert_eq!(s.usage().used, a.1.len() as u64);
    assert!(s
        .admit(&b.0, b.1.len() as u64, &peer(2), &none())
        .expect_err("no room left")
        .is_no_space());
    // asking again about the admitted one resumes it; a different size is refused
    assert_eq!(
        s.admit(&a.0, a.1.len() as u64, &peer(1), &none())
            .expect("resume")
            .received,
        0
    );
    assert!(matches!(
        s.admit(&a.0, 7, &peer(1), &none()),
        Err(StoreError::SizeChanged { .. })
    ));
}

#[test]
fn one_peer_cannot_take_more_than_its_share() {
    let dir = tempfile::tempdir().expect("tempdir");
    let [a, b, ..] = shards() else { panic!() };
    let share = a.1.len() as u64 + 10;
    let s = ShardStore::open(dir.path(), limits(u64::MAX, share)).expect("store");
    upload(&s, a, &peer(1)).expect("within the share");
    let e = s
        .admit(&b.0, b.1.len() as u64, &peer(1), &none())
        .expect_err("over the share");
    assert!(matches!(e, StoreError::PeerQuotaFull { .. }), "{e}");
    assert!(e.to_string().contains("peer_disk_share"));
    // another peer still can
    upload(&s, b, &peer(2)).expect("another peer");
    // re-uploading a held shard costs nothing
    s.admit(&a.0, a.1.len() as u64, &peer(1), &none())
        .expect("held");
}

#[test]
fn stalled_partial_uploads_expire() {
    let dir = tempfile::tempdir().expect("tempdir");
    let [a, ..] = shards() else { panic!() };
    let s = ShardStore::open(dir.path(), limits(u64::MAX, u64::MAX)).expect("store");
    let total = a.1.len() as u64;
    s.write_chunk(&a.0, total, 0, &a.1[..64], &peer(1), &none())
        .expect("chunk");
    assert_eq!(s.sweep(&none(), SystemTime::now()).partial_removed, 0);
    set_age(&s.partial_path(&a.0), Duration::from_secs(601));
    let swept = s.sweep(&none(), SystemTime::now());
    assert_eq!(swept.partial_removed, 1);
    assert!(!s.partial_path(&a.0).exists() && !s.partial_owner_path(&a.0).exists());
    assert_eq!(s.usage().used, 0);
    assert_eq!(std::fs::read_dir(&s.partial).expect("dir").count(), 0);
}

#[test]
fn unused_shards_are_evicted_oldest_first_but_never_one_in_use() {
    let dir = tempfile::tempdir().expect("tempdir");
    let [a, b] = shards() else { panic!() };
    let s = ShardStore::open(dir.path(), limits(u64::MAX, u64::MAX)).expect("store");
    upload(&s, a, &peer(1)).expect("a");
    upload(&s, b, &peer(1)).expect("b");
    set_age(&s.path(&a.0), Duration::from_secs(7200));
    set_age(&s.path(&b.0), Duration::from_secs(5000));
    let in_use: HashSet<ShardId> = [a.0].into();
    let swept = s.sweep(&in_use, SystemTime::now());
    assert_eq!(swept.shards_evicted, vec![b.0]);
    assert!(s.has(&a.0) && !s.has(&b.0) && !s.owner_path(&b.0).exists());
    // a used shard is young again
    s.touch(&a.0);
    assert!(s
        .sweep(&none(), SystemTime::now())
        .shards_evicted
        .is_empty());
    let swept = s.sweep(&none(), SystemTime::now() + Duration::from_secs(3601));
    assert_eq!(swept.shards_evicted, vec![a.0]);
}

#[test]
fn a_full_quota_makes_room_by_evicting_unused_shards() {
    let dir = tempfile::tempdir().expect("tempdir");
    let [a, b] = shards() else { panic!() };
    let quota = a.1.len().max(b.1.len()) as u64 + 10;
    let s = ShardStore::open(dir.path(), limits(quota, u64::MAX)).expect("store");
    upload(&s, a, &peer(1)).expect("a");
    // in use or recently used: no room
    assert!(s.admit(&b.0, b.1.len() as u64, &peer(2), &none()).is_err());
    set_age(&s.path(&a.0), Duration::from_secs(7200));
    assert!(s
        .admit(&b.0, b.1.len() as u64, &peer(2), &[a.0].into())
        .is_err());
    // unused for long enough: evicted for the new one
    s.admit(&b.0, b.1.len() as u64, &peer(2), &none())
        .expect("room made");
    assert!(!s.has(&a.0));
}

#[test]
fn a_bad_upload_leaves_nothing_behind() {
    let dir = tempfile::tempdir().expect("tempdir");
    let [a, b] = shards() else { panic!() };
    let s = ShardStore::open(dir.path(), limits(u64::MAX, u64::MAX)).expect("store");
    // a's bytes announced as b
    let e = s
        .write_chunk(&b.0, a.1.len() as u64, 0, &a.1, &peer(1), &none())
        .expect_err("wrong hash");
    assert!(matches!(e, StoreError::Invalid(_)), "{e}");
    assert_eq!(std::fs::read_dir(&s.partial).expect("dir").count(), 0);
    assert_eq!(
        s.usage(),
        Usage {
            limit: u64::MAX,
            ..Usage::default()
        }
    );
    let e = s
        .admit(&b.0, 2 << 30, &peer(1), &none())
        .expect_err("too large");
    assert!(e.to_string().contains("max_shard_mib"), "{e}");
}
