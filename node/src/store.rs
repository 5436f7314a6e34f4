//! Shards on disk: `<data>/shards/<hash>.veil`, uploads in progress in
//! `<data>/partial/<hash>.part`, each beside a `<hash>.owner` record of who uploaded it and
//! the size announced. An upload is accepted only when the bytes form a valid shard whose
//! content hash is the one announced.
//!
//! The disk is shared fairly: an upload is admitted (before its first byte) only if the
//! announced size fits the node's quota, the uploader's share of it and the disk's real free
//! space; partial uploads count at their announced size, so concurrent uploads cannot
//! overrun the quota together. Partial uploads without a chunk for a while are removed, and
//! so are shards no session has used for a while (never one in use). A shard file's
//! modification time is its last use.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use veil_model::container::Container;
use veil_model::crypto::Shard;
use veil_protocol::wire::ShardId;
use veil_protocol::PeerId;

const MIB: u64 = 1 << 20;
/// Free space an upload must leave on the disk, whatever the quota says.
pub const DISK_MARGIN: u64 = 64 * MIB;

/// Why an upload or load failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("shard of {} MiB exceeds this node's limit of {} MiB per shard (max_shard_mib)", mib(*size), mib(*limit))]
    TooLarge { size: u64, limit: u64 },
    #[error(
        "no room for a shard of {} MiB: {} of this node's {} MiB for shards are in use \
         (max_disk_mib)",
        mib(*need),
        mib(*used),
        mib(*limit)
    )]
    QuotaFull { need: u64, used: u64, limit: u64 },
    #[error(
        "no room for a shard of {} MiB: your shards here take {} of the {} MiB one peer may use \
         (peer_disk_share)",
        mib(*need),
        mib(*used),
        mib(*limit)
    )]
    PeerQuotaFull { need: u64, used: u64, limit: u64 },
    #[error(
        "no room for a shard of {} MiB: the node's disk has {} MiB free (it keeps {} MiB spare)",
        mib(*need),
        mib(*free),
        mib(DISK_MARGIN)
    )]
    DiskFull { need: u64, free: u64 },
    #[error("chunk at {offset}+{len} runs past the announced {total} bytes")]
    PastEnd { offset: u64, len: u64, total: u64 },
    #[error("this upload was announced as {announced} bytes, not {total}")]
    SizeChanged { announced: u64, total: u64 },
    #[error("the uploaded bytes are not a valid shard: {0}")]
    Invalid(String),
    #[error("no shard {0}")]
    Unknown(String),
    #[error("disk: {0}")]
    Io(String),
}

fn mib(bytes: u64) -> String {
    let m = bytes as f64 / MIB as f64;
    if m >= 10.0 || m == m.round() {
        format!("{m:.0}")
    } else {
        format!("{m:.1}")
    }
}

impl StoreError {
    /// Whether the refusal is for lack of room (the uploader should place the shard
    /// elsewhere) rather than a bad request.
    pub fn is_no_space(&self) -> bool {
        matches!(
            self,
            StoreError::QuotaFull { .. }
                | StoreError::PeerQuotaFull { .. }
                | StoreError::DiskFull { .. }
        )
    }
}

/// What the node has of a shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    pub received: u64,
    pub complete: bool,
}

/// The store's limits (from `node.toml`).
#[derive(Debug, Clone, PartialEq)]
pub struct DiskLimits {
    /// Largest shard accepted.
    pub max_shard_bytes: u64,
    /// Shards and partial uploads together (partial ones at their announced size).
    pub max_bytes: u64,
    /// What one peer's uploads may take of `max_bytes`.
    pub max_peer_bytes: u64,
    /// A partial upload without a new chunk for this long is removed.
    pub partial_timeout: Duration,
    /// A shard no session used for this long is removed (`None`: kept forever).
    pub evict_unused_after: Option<Duration>,
}

impl DiskLimits {
    /// No limit but the per-shard one (tests, tools).
    pub fn unlimited(max_shard_bytes: u64) -> Self {
        DiskLimits {
            max_shard_bytes,
            max_bytes: u64::MAX,
            max_peer_bytes: u64::MAX,
            partial_timeout: Duration::from_secs(3600),
            evict_unused_after: None,
        }
    }
}

/// Who uploaded a shard and the size they announced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Owner {
    peer: String,
    total: u64,
}

/// What a sweep removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sweep {
    pub partial_removed: usize,
    pub shards_evicted: Vec<ShardId>,
    pub bytes_freed: u64,
}

/// Disk use of the store, for ads, metrics and the soak.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Complete shards' bytes plus partial uploads' announced sizes.
    pub used: u64,
    pub shards: usize,
    pub partial: usize,
    pub limit: u64,
}

#[derive(Debug, Clone)]
pub struct ShardStore {
    shards: PathBuf,
    partial: PathBuf,
    limits: DiskLimits,
}

fn io(e: std::io::Error) -> StoreError {
    StoreError::Io(e.to_string())
}

fn shard_id(name: &str, suffix: &str) -> Option<ShardId> {
    let hex = name.strip_suffix(suffix)?;
    hex::decode(hex).ok()?.try_into().ok()
}

fn age(path: &Path, now: SystemTime) -> Option<Duration> {
    let modified = std::fs::metadata(path).ok()?.modified().ok()?;
    Some(now.duration_since(modified).unwrap_or(Duration::ZERO))
}

/// Bytes the file system holding `dir` has free for unprivileged writers.
pub fn disk_free(dir: &Path) -> std::io::Result<u64> {
    let s = nix::sys::statvfs::statvfs(dir).map_err(std::io::Error::from)?;
    #[allow(clippy::unnecessary_cast)] // the field types differ across platforms
    Ok(s.blocks_available() as u64 * s.fragment_size() as u64)
}

impl ShardStore {
    pub fn open(data_dir: &Path, limits: DiskLimits) -> Result<Self, StoreError> {
        let s = ShardStore {
            shards: data_dir.join("shards"),
            partial: data_dir.join("partial"),
            limits,
        };
        std::fs::create_dir_all(&s.shards).map_err(io)?;
        std::fs::create_dir_all(&s.partial).map_err(io)?;
        Ok(s)
    }

    pub fn path(&self, id: &ShardId) -> PathBuf {
        self.shards.join(format!("{}.veil", hex::encode(id)))
    }

    fn owner_path(&self, id: &ShardId) -> PathBuf {
        self.shards.join(format!("{}.owner", hex::encode(id)))
    }

    fn partial_path(&self, id: &ShardId) -> PathBuf {
        self.partial.join(format!("{}.part", hex::encode(id)))
    }

    fn partial_owner_path(&self, id: &ShardId) -> PathBuf {
        self.partial.join(format!("{}.owner", hex::encode(id)))
    }

    pub fn has(&self, id: &ShardId) -> bool {
        self.path(id).exists()
    }

    fn ids(dir: &Path, suffix: &str) -> Vec<ShardId> {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        let mut out: Vec<ShardId> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| shard_id(&e.file_name().to_string_lossy(), suffix))
            .collect();
        out.sort();
        out
    }

    /// Every complete shard held, by content hash.
    pub fn list(&self) -> Vec<ShardId> {
        Self::ids(&self.shards, ".veil")
    }

    fn read_owner(path: &Path) -> Option<Owner> {
        serde_json::from_slice(&std::fs::read(path).ok()?).ok()
    }

    /// Every shard and partial upload with its bytes (partial ones at their announced size)
    /// and uploader.
    fn holdings(&self) -> Vec<(u64, Option<String>)> {
        let mut out: Vec<(u64, Option<String>)> = self
            .list()
            .iter()
            .map(|id| {
                (
                    self.size(id),
                    Self::read_owner(&self.owner_path(id)).map(|o| o.peer),
                )
            })
            .collect();
        for id in Self::ids(&self.partial, ".part") {
            let have = std::fs::metadata(self.partial_path(&id)).map_or(0, |m| m.len());
            match Self::read_owner(&self.partial_owner_path(&id)) {
                Some(o) => out.push((o.total.max(have), Some(o.peer))),
                None => out.push((have, None)),
            }
        }
        out
    }

    pub fn usage(&self) -> Usage {
        let h = self.holdings();
        Usage {
            used: h.iter().map(|(b, _)| b).sum(),
            shards: self.list().len(),
            partial: Self::ids(&self.partial, ".part").len(),
            limit: self.limits.max_bytes,
        }
    }

    /// How much more the quota admits (ignoring the per-peer share and the disk).
    pub fn free(&self) -> u64 {
        self.limits.max_bytes.saturating_sub(self.usage().used)
    }

    /// How much of a shard is here.
    pub fn progress(&self, id: &ShardId) -> Progress {
        if self.has(id) {
            return Progress {
                received: self.size(id),
                complete: true,
            };
        }
        let received = std::fs::metadata(self.partial_path(id)).map_or(0, |m| m.len());
        Progress {
            received,
            complete: false,
        }
    }

    /// Admit an upload of `total` bytes from `peer` before any byte arrives: a held shard
    /// is complete, a partial one resumes, a new one must fit every limit (shards unused for
    /// too long are evicted first) and is then reserved at its full size.
    pub fn admit(
        &self,
        id: &ShardId,
        total: u64,
        peer: &PeerId,
        in_use: &HashSet<ShardId>,
    ) -> Result<Progress, StoreError> {
        if self.has(id) {
            return Ok(self.progress(id));
        }
        if let Some(o) = Self::read_owner(&self.partial_owner_path(id)) {
            if o.total != total {
                return Err(StoreError::SizeChanged {
                    announced: o.total,
                    total,
                });
            }
            return Ok(self.progress(id));
        }
        if total > self.limits.max_shard_bytes {
            return Err(StoreError::TooLarge {
                size: total,
                limit: self.limits.max_shard_bytes,
            });
        }
        let me = peer.to_string();
        let fits = |store: &Self| -> Result<(), StoreError> {
            let h = store.holdings();
            let used: u64 = h.iter().map(|(b, _)| b).sum();
            if used.saturating_add(total) > store.limits.max_bytes {
                return Err(StoreError::QuotaFull {
                    need: total,
                    used,
                    limit: store.limits.max_bytes,
                });
            }
            let mine: u64 = h
                .iter()
                .filter(|(_, p)| p.as_deref() == Some(me.as_str()))
                .map(|(b, _)| b)
                .sum();
            if mine.saturating_add(total) > store.limits.max_peer_bytes {
                return Err(StoreError::PeerQuotaFull {
                    need: total,
                    used: mine,
                    limit: store.limits.max_peer_bytes,
                });
            }
            // partial uploads still to come take room on the disk too
            let pending: u64 = Self::ids(&store.partial, ".part")
                .iter()
                .filter_map(|p| {
                    let have = std::fs::metadata(store.partial_path(p)).ok()?.len();
                    Some(
                        Self::read_owner(&store.partial_owner_path(p))?
                            .total
                            .saturating_sub(have),
                    )
                })
                .sum();
            let free = disk_free(&store.partial).map_err(io)?;
            if free < total.saturating_add(pending).saturating_add(DISK_MARGIN) {
                return Err(StoreError::DiskFull {
                    need: total,
                    free: free.saturating_sub(pending),
                });
            }
            Ok(())
        };
        if let Err(e) = fits(self) {
            // shards nobody used for long enough make room first
            if self.sweep(in_use, SystemTime::now()).bytes_freed == 0 {
                return Err(e);
            }
            fits(self)?;
        }
        let owner = serde_json::to_vec(&Owner { peer: me, total })
            .map_err(|e| StoreError::Io(e.to_string()))?;
        std::fs::write(self.partial_owner_path(id), owner).map_err(io)?;
        std::fs::File::create(self.partial_path(id)).map_err(io)?;
        Ok(Progress {
            received: 0,
            complete: false,
        })
    }

    /// Append a chunk. A chunk that does not start where the partial file ends is ignored
    /// (the answer tells the uploader where to resume). An upload that was not admitted yet
    /// is admitted first. The last chunk triggers verification.
    pub fn write_chunk(
        &self,
        id: &ShardId,
        total: u64,
        offset: u64,
        data: &[u8],
        peer: &PeerId,
        in_use: &HashSet<ShardId>,
    ) -> Result<Progress, StoreError> {
        if self.has(id) {
            return Ok(self.progress(id));
        }
        let len = data.len() as u64;
        if offset.checked_add(len).is_none_or(|end| end > total) {
            return Err(StoreError::PastEnd { offset, len, total });
        }
        self.admit(id, total, peer, in_use)?;
        let part = self.partial_path(id);
        let have = std::fs::metadata(&part).map_or(0, |m| m.len());
        if offset != have {
            return Ok(Progress {
                received: have,
                complete: false,
            });
        }
        let written = std::fs::OpenOptions::new()
            .append(true)
            .open(&part)
            .and_then(|mut f| {
                f.write_all(data)?;
                f.sync_data()
            });
        if let Err(e) = written {
            // a short write (a full disk) leaves a torn tail: cut it so the upload resumes
            if let Ok(f) = std::fs::OpenOptions::new().write(true).open(&part) {
                let _ = f.set_len(have);
            }
            return Err(io(e));
        }
        let received = have + len;
        if received < total {
            return Ok(Progress {
                received,
                complete: false,
            });
        }
        match self.verify(id, &part) {
            Ok(()) => {
                std::fs::rename(self.partial_owner_path(id), self.owner_path(id)).map_err(io)?;
                std::fs::rename(&part, self.path(id)).map_err(io)?;
                Ok(Progress {
                    received,
                    complete: true,
                })
            }
            Err(e) => {
                self.remove_partial(id);
                Err(e)
            }
        }
    }

    fn remove_partial(&self, id: &ShardId) {
        let _ = std::fs::remove_file(self.partial_path(id));
        let _ = std::fs::remove_file(self.partial_owner_path(id));
    }

    fn verify(&self, id: &ShardId, path: &Path) -> Result<(), StoreError> {
        let bytes = std::fs::read(path).map_err(io)?;
        let c = Container::from_vec(bytes).map_err(|e| StoreError::Invalid(e.to_string()))?;
        if c.data_sha256() != hex::encode(id) {
            return Err(StoreError::Invalid(format!(
                "content hash {} is not the announced {}",
                &c.data_sha256()[..16],
                &hex::encode(id)[..16]
            )));
        }
        Shard::from_container(&c).map_err(|e| StoreError::Invalid(e.to_string()))?;
        Ok(())
    }

    /// Read a held shard (its content hash is checked again).
    pub fn load(&self, id: &ShardId) -> Result<Shard, StoreError> {
        let path = self.path(id);
        if !path.exists() {
            return Err(StoreError::Unknown(hex::encode(id)));
        }
        let c = Container::open(&path).map_err(|e| StoreError::Invalid(e.to_string()))?;
        if c.data_sha256() != hex::encode(id) {
            return Err(StoreError::Invalid(
                "stored shard no longer matches its hash".into(),
            ));
        }
        Shard::from_container(&c).map_err(|e| StoreError::Invalid(e.to_string()))
    }

    /// Record that a session used the shard now (its file's modification time).
    pub fn touch(&self, id: &ShardId) {
        let r = std::fs::File::options()
            .write(true)
            .open(self.path(id))
            .and_then(|f| f.set_modified(SystemTime::now()));
        if let Err(e) = r {
            tracing::debug!("cannot mark shard {} used: {e}", &hex::encode(id)[..12]);
        }
    }

    /// Bytes of a held shard on disk.
    pub fn size(&self, id: &ShardId) -> u64 {
        std::fs::metadata(self.path(id)).map_or(0, |m| m.len())
    }

    /// Remove partial uploads without a chunk for `partial_timeout` (and stray files of
    /// either directory), and shards unused for `evict_unused_after`, least recently used
    /// first, except those in `in_use`.
    pub fn sweep(&self, in_use: &HashSet<ShardId>, now: SystemTime) -> Sweep {
        let mut out = Sweep::default();
        for id in Self::ids(&self.partial, ".part") {
            let stale =
                age(&self.partial_path(&id), now).is_some_and(|a| a >= self.limits.partial_timeout);
            let orphan = !self.partial_owner_path(&id).exists();
            if stale || orphan {
                out.bytes_freed += std::fs::metadata(self.partial_path(&id)).map_or(0, |m| m.len());
                self.remove_partial(&id);
                out.partial_removed += 1;
            }
        }
        // an owner record whose upload is gone
        for id in Self::ids(&self.partial, ".owner") {
            if !self.partial_path(&id).exists() {
                let _ = std::fs::remove_file(self.partial_owner_path(&id));
            }
        }
        for id in Self::ids(&self.shards, ".owner") {
            if !self.has(&id) {
                let _ = std::fs::remove_file(self.owner_path(&id));
            }
        }
        let Some(limit) = self.limits.evict_unused_after else {
            return out;
        };
        let mut idle: Vec<(Duration, ShardId)> = self
            .list()
            .into_iter()
            .filter(|id| !in_use.contains(id))
            .filter_map(|id| Some((age(&self.path(&id), now)?, id)))
            .filter(|(a, _)| *a >= limit)
            .collect();
        idle.sort_by_key(|x| std::cmp::Reverse(x.0));
        for (_, id) in idle {
            let bytes = self.size(&id);
            if std::fs::remove_file(self.path(&id)).is_ok() {
                let _ = std::fs::remove_file(self.owner_path(&id));
                out.bytes_freed += bytes;
                out.shards_evicted.push(id);
            }
        }
        out
    }
}

#[cfg(test)]
#[path = "store_tests.rs"]
mod tests;
