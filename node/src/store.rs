//! Shards on disk: `<data>/shards/<hash>.veil`, uploads in progress in
//! `<data>/partial/<hash>.part`. An upload is accepted only when the bytes form a valid
//! shard whose content hash is the one announced.

use std::io::Write;
use std::path::{Path, PathBuf};

use veil_model::container::Container;
use veil_model::crypto::Shard;
use veil_protocol::wire::ShardId;

/// Why an upload or load failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("shard of {size} bytes exceeds this node's limit of {limit}")]
    TooLarge { size: u64, limit: u64 },
    #[error("chunk at {offset}+{len} runs past the announced {total} bytes")]
    PastEnd { offset: u64, len: u64, total: u64 },
    #[error("the uploaded bytes are not a valid shard: {0}")]
    Invalid(String),
    #[error("no shard {0}")]
    Unknown(String),
    #[error("disk: {0}")]
    Io(String),
}

/// What the node has of a shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    pub received: u64,
    pub complete: bool,
}

#[derive(Debug, Clone)]
pub struct ShardStore {
    shards: PathBuf,
    partial: PathBuf,
    max_bytes: u64,
}

fn io(e: std::io::Error) -> StoreError {
    StoreError::Io(e.to_string())
}

impl ShardStore {
    pub fn open(data_dir: &Path, max_bytes: u64) -> Result<Self, StoreError> {
        let s = ShardStore {
            shards: data_dir.join("shards"),
            partial: data_dir.join("partial"),
            max_bytes,
        };
        std::fs::create_dir_all(&s.shards).map_err(io)?;
        std::fs::create_dir_all(&s.partial).map_err(io)?;
        Ok(s)
    }

    pub fn path(&self, id: &ShardId) -> PathBuf {
        self.shards.join(format!("{}.veil", hex::encode(id)))
    }

    fn partial_path(&self, id: &ShardId) -> PathBuf {
        self.partial.join(format!("{}.part", hex::encode(id)))
    }

    pub fn has(&self, id: &ShardId) -> bool {
        self.path(id).exists()
    }

    /// Every complete shard held, by content hash.
    pub fn list(&self) -> Vec<ShardId> {
        let Ok(dir) = std::fs::read_dir(&self.shards) else {
            return Vec::new();
        };
        let mut out: Vec<ShardId> = dir
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let hex = name.strip_suffix(".veil")?;
                hex::decode(hex).ok()?.try_into().ok()
            })
            .collect();
        out.sort();
        out
    }

    /// How much of a shard is here.
    pub fn progress(&self, id: &ShardId) -> Progress {
        if self.has(id) {
            let received = std::fs::metadata(self.path(id)).map_or(0, |m| m.len());
            return Progress {
                received,
                complete: true,
            };
        }
        let received = std::fs::metadata(self.partial_path(id)).map_or(0, |m| m.len());
        Progress {
            received,
            complete: false,
        }
    }

    /// Append a chunk. A chunk that does not start where the partial file ends is ignored
    /// (the answer tells the uploader where to resume). The last chunk triggers verification.
    pub fn write_chunk(
        &self,
        id: &ShardId,
        total: u64,
        offset: u64,
        data: &[u8],
    ) -> Result<Progress, StoreError> {
        if self.has(id) {
            return Ok(self.progress(id));
        }
        if total > self.max_bytes {
            return Err(StoreError::TooLarge {
                size: total,
                limit: self.max_bytes,
            });
        }
        let len = data.len() as u64;
        if offset.checked_add(len).is_none_or(|end| end > total) {
            return Err(StoreError::PastEnd { offset, len, total });
        }
        let part = self.partial_path(id);
        let have = std::fs::metadata(&part).map_or(0, |m| m.len());
        if offset != have {
            return Ok(Progress {
                received: have,
                complete: false,
            });
        }
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&part)
            .map_err(io)?;
        f.write_all(data).map_err(io)?;
        f.sync_data().map_err(io)?;
        let received = have + len;
        if received < total {
            return Ok(Progress {
                received,
                complete: false,
            });
        }
        match self.verify(id, &part) {
            Ok(()) => {
                std::fs::rename(&part, self.path(id)).map_err(io)?;
                Ok(Progress {
                    received,
                    complete: true,
                })
            }
            Err(e) => {
                let _ = std::fs::remove_file(&part);
                Err(e)
            }
        }
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

    /// Bytes of a held shard on disk.
    pub fn size(&self, id: &ShardId) -> u64 {
        std::fs::metadata(self.path(id)).map_or(0, |m| m.len())
    }
}
