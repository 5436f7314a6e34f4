//! Fraud proofs this node keeps and announces: `<data>/proofs/<id>.json` with the notice
//! beside it (`<id>.notice`). A submitted proof is kept only when its receipts hold (the
//! accused signed those answers to those inputs), so nobody can make a node announce a
//! forgery. A node does not judge the answers (that takes the shard and a recomputation,
//! which clients holding the shard do before they believe a proof); it keeps the notices it
//! hears so that clients that join later can ask for them.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};

use veil_protocol::proof::{proof_id, FraudProof, ProofNotice, MAX_PROOF_BYTES};
use veil_protocol::PeerId;

/// Notices kept (oldest dropped first).
pub const MAX_NOTICES: usize = 1024;
/// Proofs kept on disk in all.
pub const MAX_HELD: usize = 256;
/// Proofs one reporter may have this node keep.
pub const MAX_PER_REPORTER: usize = 16;

pub struct ProofStore {
    dir: PathBuf,
    me: PeerId,
    /// Notices heard or made, newest last.
    notices: VecDeque<ProofNotice>,
    held: Vec<[u8; 32]>,
    per_reporter: HashMap<String, usize>,
}

impl ProofStore {
    /// Open (or create) `<data>/proofs`, announcing again what is held there.
    pub fn open(data_dir: &Path, me: PeerId) -> std::io::Result<Self> {
        let dir = data_dir.join("proofs");
        std::fs::create_dir_all(&dir)?;
        let mut store = ProofStore {
            dir,
            me,
            notices: VecDeque::new(),
            held: Vec::new(),
            per_reporter: HashMap::new(),
        };
        for entry in std::fs::read_dir(&store.dir)?.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "notice") {
                let notice = std::fs::read(&path)
                    .ok()
                    .and_then(|b| veil_protocol::codec::decode::<ProofNotice>(&b, 4096).ok());
                match notice {
                    Some(n) if path.with_extension("json").exists() => store.keep(n),
                    _ => tracing::warn!(
                        "ignoring {}: unreadable or without its proof",
                        path.display()
                    ),
                }
            }
        }
        Ok(store)
    }

    fn keep(&mut self, notice: ProofNotice) {
        *self
            .per_reporter
            .entry(notice.reporter.clone())
            .or_default() += 1;
        self.held.push(notice.id);
        self.heard_unchecked(notice);
    }

    fn path(&self, id: &[u8; 32], ext: &str) -> PathBuf {
        self.dir.join(format!("{}.{ext}", hex::encode(id)))
    }

    /// Keep a proof `reporter` submitted: its notice, and whether it is new (to be
    /// announced). An error says why it was refused.
    pub fn submit(
        &mut self,
        bytes: &[u8],
        reporter: &PeerId,
    ) -> Result<(ProofNotice, bool), String> {
        if bytes.len() > MAX_PROOF_BYTES {
            return Err(format!(
                "a proof of {} bytes exceeds this node's limit of {MAX_PROOF_BYTES}",
                bytes.len()
            ));
        }
        let id = proof_id(bytes);
        if self.held.contains(&id) {
            if let Some(n) = self.notices.iter().find(|n| n.id == id) {
                return Ok((n.clone(), false));
            }
        }
        let key = reporter.to_string();
        if self.per_reporter.get(&key).copied().unwrap_or(0) >= MAX_PER_REPORTER {
            return Err(format!(
                "this node already keeps {MAX_PER_REPORTER} proofs from {reporter}"
            ));
        }
        if self.held.len() >= MAX_HELD {
            return Err(format!("this node already keeps {MAX_HELD} proofs"));
        }
        let proof = FraudProof::from_bytes(bytes).map_err(|e| e.to_string())?;
        let opened = proof.open().map_err(|e| format!("rejected: {e}"))?;
        if opened.peer == *reporter {
            return Err("a node does not report itself".into());
        }
        let notice = proof.notice(bytes, &self.me, reporter);
        let write = |path: PathBuf, data: &[u8]| {
            veil_model::container::write_atomic(&path, data, false)
                .map_err(|e| format!("cannot keep the proof: {e}"))
        };
        write(self.path(&id, "json"), bytes)?;
        let encoded = veil_protocol::codec::encode(&notice).map_err(|e| e.to_string())?;
        write(self.path(&id, "notice"), &encoded)?;
        self.keep(notice.clone());
        Ok((notice, true))
    }

    /// A proof this node keeps.
    pub fn get(&self, id: &[u8; 32]) -> Option<Vec<u8>> {
        if !self.held.contains(id) {
            return None;
        }
        std::fs::read(self.path(id, "json")).ok()
    }

    /// A notice heard by gossip from `source`: kept when its holder sent it.
    pub fn heard(&mut self, notice: ProofNotice, source: Option<PeerId>) -> bool {
        if source.map(|s| s.to_string()).as_deref() != Some(notice.holder.as_str()) {
            tracing::debug!(
                "dropping a proof notice of {} sent by {source:?} for {}",
                notice.holder,
                notice.accused
            );
            return false;
        }
        self.heard_unchecked(notice)
    }

    fn heard_unchecked(&mut self, notice: ProofNotice) -> bool {
        if self
            .notices
            .iter()
            .any(|n| n.id == notice.id && n.holder == notice.holder)
        {
            return false;
        }
        if self.notices.len() >= MAX_NOTICES {
            self.notices.pop_front();
        }
        self.notices.push_back(notice);
        true
    }

    pub fn notices(&self) -> Vec<ProofNotice> {
        self.notices.iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use veil_protocol::receipt::frame_hash;
    use veil_protocol::wire::TensorFrame;
    use veil_protocol::{Identity, InputChain, Statement};

    use super::*;

    /// A proof against `node` with its genuine receipts over made-up answers (whether they
    /// are right takes the shard; this store never judges that).
    fn proof(node: &Identity) -> FraudProof {
        let (d, shard) = (4, [7u8; 32]);
        let inputs: Vec<f32> = (0..3 * d).map(|i| i as f32 * 0.25).collect();
        let mut chain = InputChain::new(&shard);
        let mut answers = Vec::new();
        for row in 0..3 {
            chain.push_rows(&inputs[row * d..(row + 1) * d], d);
            let out: Vec<f32> = (0..d).map(|i| (row * d + i) as f32).collect();
            let receipt = Statement {
                session: [1; 16],
                shard,
                first_row: row as u64,
                rows: 1,
                input_chain: chain.hash(),
                output_hash: frame_hash(&TensorFrame::from_f32(&[1, d], &out)),
            }
            .sign(node);
            answers.push((receipt, out));
        }
        FraudProof::new(
            &node.peer_id(),
            &shard,
            0,
            (0, 2),
            d,
            (false, false),
            &inputs,
            &answers,
            "local",
        )
    }

    #[test]
    fn keeps_proofs_whose_receipts_hold_and_refuses_forgeries_with_a_reason() {
        let dir = tempfile::tempdir().expect("dir");
        let me = Identity::generate().peer_id();
        let reporter = Identity::generate().peer_id();
        let accused = Identity::generate();
        let mut store = ProofStore::open(dir.path(), me).expect("open");
        let genuine = proof(&accused).to_bytes();
        let (notice, new) = store.submit(&genuine, &reporter).expect("accepted");
        assert!(new);
        assert_eq!(notice.accused, accused.peer_id().to_string());
        assert_eq!(notice.holder, me.to_string());
        assert_eq!(notice.reporter, reporter.to_string());
        assert_eq!(store.get(&notice.id), Some(genuine.clone()));
        // the same proof again: accepted, not announced twice
        assert!(!store.submit(&genuine, &reporter).expect("again").1);

        // an answer changed after signing
        let mut forged = proof(&accused);
        forged.answers[1].output = forged.answers[0].output.clone();
        let why = store
            .submit(&forged.to_bytes(), &reporter)
            .expect_err("forged");
        assert!(why.contains("not the answer its receipt signs"), "{why}");
        // receipts of one node, accusing another
        let mut forged = proof(&accused);
        forged.peer = Identity::generate().peer_id().to_string();
        let why = store
            .submit(&forged.to_bytes(), &reporter)
            .expect_err("forged");
        assert!(why.contains("not by the accused"), "{why}");
        let why = store.submit(b"{}", &reporter).expect_err("garbage");
        assert!(why.contains("not a fraud proof"), "{why}");
        // a node reporting itself
        let mut own = proof(&accused);
        own.referee = "itself".into();
        let why = store
            .submit(&own.to_bytes(), &accused.peer_id())
            .expect_err("self");
        assert!(why.contains("itself"), "{why}");
        assert_eq!(store.notices().len(), 1);

        // kept across a restart
        drop(store);
        let store = ProofStore::open(dir.path(), me).expect("reopen");
        assert_eq!(store.notices(), vec![notice.clone()]);
        assert_eq!(store.get(&notice.id), Some(genuine));
    }

    #[test]
    fn a_reporter_has_a_share_and_notices_count_only_from_their_holder() {
        let dir = tempfile::tempdir().expect("dir");
        let me = Identity::generate().peer_id();
        let mut store = ProofStore::open(dir.path(), me).expect("open");
        let flooder = Identity::generate().peer_id();
        for _ in 0..MAX_PER_REPORTER {
            let p = proof(&Identity::generate()).to_bytes();
            store.submit(&p, &flooder).expect("within the share");
        }
        let why = store
            .submit(&proof(&Identity::generate()).to_bytes(), &flooder)
            .expect_err("over the share");
        assert!(why.contains(&MAX_PER_REPORTER.to_string()), "{why}");
        // another reporter is still heard
        let other = Identity::generate().peer_id();
        store
            .submit(&proof(&Identity::generate()).to_bytes(), &other)
            .expect("another reporter");

        // a notice relayed in someone else's name is dropped; the holder's own is kept
        let holder = Identity::generate().peer_id();
        let p = proof(&Identity::generate());
        let bytes = p.to_bytes();
        let notice = p.notice(&bytes, &holder, &other);
        let n = store.notices().len();
        assert!(!store.heard(notice.clone(), Some(Identity::generate().peer_id())));
        assert!(!store.heard(notice.clone(), None));
        assert!(store.heard(notice.clone(), Some(holder)));
        assert!(!store.heard(notice, Some(holder)), "heard twice");
        assert_eq!(store.notices().len(), n + 1);
        // a notice is no proof: this node does not serve what it does not hold
        assert_eq!(store.get(&proof_id(&bytes)), None);
    }
}
