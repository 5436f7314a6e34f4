//! Veil's file container for shards, client bundles and keys: a JSON header describing
//! named little-endian tensors, then their bytes, with a SHA-256 of the data in the header.
//!
//! Layout: `b"VEILPACK"`, format version (u32 LE), header length (u64 LE), header (JSON),
//! zero padding to a multiple of 64, data. Files are written to a temporary name and renamed,
//! so a crash never leaves a half-written file under the final name.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use veil_kernels::{Bytes, GgmlType, QMatrix};

use crate::ModelError;

const MAGIC: &[u8; 8] = b"VEILPACK";
/// Version of the container layout.
pub const CONTAINER_VERSION: u32 = 1;
const ALIGN: usize = 64;
/// Largest header accepted (the tokenizer of a large vocabulary fits easily).
const MAX_HEADER: u64 = 256 << 20;

/// Element type of a stored tensor: plain numbers, or GGML blocks (a quantized matrix of
/// shape `[rows, cols]`, each row whole blocks, in GGUF's layout).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[allow(non_camel_case_types)]
pub enum DType {
    F32,
    F64,
    U32,
    Q8_0,
    Q4_0,
    Q4_K,
}

impl DType {
    /// The GGML block format of a quantized type.
    pub fn ggml(&self) -> Option<GgmlType> {
        match self {
            DType::F32 | DType::F64 | DType::U32 => None,
            DType::Q8_0 => Some(GgmlType::Q8_0),
            DType::Q4_0 => Some(GgmlType::Q4_0),
            DType::Q4_K => Some(GgmlType::Q4_K),
        }
    }

    /// The stored type of GGML blocks of `ty`, if a container can hold them.
    pub fn from_ggml(ty: GgmlType) -> Option<Self> {
        [DType::Q8_0, DType::Q4_0, DType::Q4_K]
            .into_iter()
            .find(|d| d.ggml() == Some(ty))
    }

    /// Bytes of `n` elements, `None` if they are not whole blocks.
    pub fn bytes_for(&self, n: usize) -> Option<usize> {
        match self {
            DType::F32 | DType::U32 => n.checked_mul(4),
            DType::F64 => n.checked_mul(8),
            q => q.ggml()?.byte_size(n),
        }
    }
}

/// Directory entry of one tensor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorEntry {
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// Byte offset in the data section.
    pub offset: usize,
}

impl TensorEntry {
    /// Bytes of the tensor, `None` if its shape does not fit its type.
    pub fn n_bytes(&self) -> Option<usize> {
        let n = self
            .shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))?;
        self.dtype.bytes_for(n)
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Header {
    kind: String,
    meta: serde_json::Value,
    tensors: BTreeMap<String, TensorEntry>,
    data_bytes: usize,
    data_sha256: String,
}

/// Builds a container in memory.
#[derive(Debug)]
pub struct ContainerWriter {
    kind: String,
    meta: serde_json::Value,
    tensors: BTreeMap<String, TensorEntry>,
    data: Vec<u8>,
}

impl ContainerWriter {
    pub fn new(kind: &str, meta: &impl Serialize) -> Result<Self, ModelError> {
        Ok(ContainerWriter {
            kind: kind.to_string(),
            meta: serde_json::to_value(meta).map_err(|e| ModelError::Format(e.to_string()))?,
            tensors: BTreeMap::new(),
            data: Vec::new(),
        })
    }

    /// Replace the header's metadata.
    pub fn set_meta(&mut self, meta: &impl Serialize) -> Result<(), ModelError> {
        self.meta = serde_json::to_value(meta).map_err(|e| ModelError::Format(e.to_string()))?;
        Ok(())
    }

    fn push(&mut self, name: &str, dtype: DType, shape: &[usize], bytes: &[u8]) {
        debug_assert_eq!(
            Some(bytes.len()),
            dtype.bytes_for(shape.iter().product::<usize>())
        );
        let offset = self.data.len();
        self.data.extend_from_slice(bytes);
        self.data.resize(self.data.len().div_ceil(ALIGN) * ALIGN, 0);
        self.tensors.insert(
            name.to_string(),
            TensorEntry {
                dtype,
                shape: shape.to_vec(),
                offset,
            },
        );
    }

    pub fn add_f32(&mut self, name: &str, shape: &[usize], data: &[f32]) {
        let bytes: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.push(name, DType::F32, shape, &bytes);
    }

    pub fn add_f64(&mut self, name: &str, shape: &[usize], data: &[f64]) {
        let bytes: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.push(name, DType::F64, shape, &bytes);
    }

    pub fn add_u32(&mut self, name: &str, shape: &[usize], data: &[u32]) {
        let bytes: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.push(name, DType::U32, shape, &bytes);
    }

    /// A quantized matrix, stored as its blocks with shape `[rows, cols]`.
    pub fn add_matrix(&mut self, name: &str, m: &QMatrix) -> Result<(), ModelError> {
        let dtype = DType::from_ggml(m.ggml_type()).ok_or_else(|| {
            ModelError::Format(format!("`{name}`: {} cannot be stored", m.ggml_type()))
        })?;
        self.push(name, dtype, &[m.rows(), m.cols()], &m.bytes());
        Ok(())
    }

    /// SHA-256 of the data section (the content hash written into the header).
    pub fn data_sha256(&self) -> String {
        hex::encode(Sha256::digest(&self.data))
    }

    /// The whole file.
    pub fn to_bytes(&self) -> Result<Vec<u8>, ModelError> {
        let header = Header {
            kind: self.kind.clone(),
            meta: self.meta.clone(),
            tensors: self.tensors.clone(),
            data_bytes: self.data.len(),
            data_sha256: self.data_sha256(),
        };
        let json = serde_json::to_vec(&header).map_err(|e| ModelError::Format(e.to_string()))?;
        let mut out = Vec::with_capacity(json.len() + self.data.len() + 2 * ALIGN);
        out.extend(MAGIC);
        out.extend(CONTAINER_VERSION.to_le_bytes());
        out.extend((json.len() as u64).to_le_bytes());
        out.extend(json);
        out.resize(out.len().div_ceil(ALIGN) * ALIGN, 0);
        out.extend(&self.data);
        Ok(out)
    }

    /// Write atomically; `secret` files get mode 0600 (owner only) on Unix.
    pub fn write(&self, path: &Path, secret: bool) -> Result<(), ModelError> {
        write_atomic(path, &self.to_bytes()?, secret)
    }
}

/// Write `bytes` to `path` through a temporary file in the same directory.
pub fn write_atomic(path: &Path, bytes: &[u8], secret: bool) -> Result<(), ModelError> {
    let io = |e: std::io::Error| ModelError::Io(format!("{}: {e}", path.display()));
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.partial-{}", std::process::id()));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = secret;
    let result = (|| {
        let mut f = opts.open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io)
}

/// A container read into memory, its content hash verified.
#[derive(Debug)]
pub struct Container {
    header: Header,
    /// The data section, shared with the quantized matrices read from it.
    data: Bytes,
    /// The matrices whose rows were interleaved in memory at load ([`veil_kernels::pack`]).
    packed: std::collections::HashSet<String>,
}

fn bad(msg: impl Into<String>) -> ModelError {
    ModelError::Format(msg.into())
}

impl Container {
    pub fn open(path: &Path) -> Result<Self, ModelError> {
        let bytes =
            std::fs::read(path).map_err(|e| ModelError::Io(format!("{}: {e}", path.display())))?;
        Self::from_vec(bytes).map_err(|e| match e {
            ModelError::Format(m) => ModelError::Format(format!("{}: {m}", path.display())),
            other => other,
        })
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, ModelError> {
        Self::from_vec(bytes.to_vec())
    }

    /// [`Container::from_bytes`] without a copy: the data section stays in `bytes`.
    ///
    /// Quantized matrices whose format has an interleaved layout are interleaved in place
    /// once the hash is checked (the kernels read them faster so; [`Container::matrix`]
    /// hides it).
    pub fn from_vec(mut bytes: Vec<u8>) -> Result<Self, ModelError> {
        if bytes.len() < 20 || &bytes[..8] != MAGIC {
            return Err(bad("not a Veil file (bad magic bytes)"));
        }
        let version = u32::from_le_bytes(bytes[8..12].try_into().map_err(|_| bad("short"))?);
        if version != CONTAINER_VERSION {
            return Err(bad(format!(
                "file format version {version} is not supported (this build reads {CONTAINER_VERSION})"
            )));
        }
        let len = u64::from_le_bytes(bytes[12..20].try_into().map_err(|_| bad("short"))?);
        if len > MAX_HEADER || 20 + len as usize > bytes.len() {
            return Err(bad("truncated header"));
        }
        let end = 20 + len as usize;
        let header: Header = serde_json::from_slice(&bytes[20..end])
            .map_err(|e| bad(format!("corrupt header: {e}")))?;
        let start = end.div_ceil(ALIGN) * ALIGN;
        let data = bytes.get(start..).ok_or_else(|| bad("truncated data"))?;
        let data_len = data.len();
        if data.len() != header.data_bytes {
            return Err(bad(format!(
                "truncated or padded: {} data bytes, header says {}",
                data.len(),
                header.data_bytes
            )));
        }
        let sha = hex::encode(Sha256::digest(data));
        if sha != header.data_sha256 {
            return Err(bad(format!(
                "corrupted: content hash {} does not match the header's {}",
                &sha[..16],
                &header.data_sha256[..header.data_sha256.len().min(16)]
            )));
        }
        for (name, t) in &header.tensors {
            let Some(n) = t.n_bytes() else {
                return Err(bad(format!(
                    "tensor `{name}` of shape {:?} is not whole {:?} blocks",
                    t.shape, t.dtype
                )));
            };
            if t.offset.checked_add(n).is_none_or(|e| e > data.len()) {
                return Err(bad(format!("tensor `{name}` lies outside the data")));
            }
        }
        let mut packed = std::collections::HashSet::new();
        for (name, t) in &header.tensors {
            if let (Some(ty), &[rows, _]) = (t.dtype.ggml(), &t.shape[..]) {
                if veil_kernels::pack::packable(ty, rows) {
                    let n = t.n_bytes().unwrap_or(0);
                    let at = start + t.offset;
                    veil_kernels::pack::pack_in_place(ty, rows, &mut bytes[at..at + n]);
                    packed.insert(name.clone());
                }
            }
        }
        Ok(Container {
            header,
            data: Bytes::from_vec(bytes).slice(start, data_len),
            packed,
        })
    }

    pub fn kind(&self) -> &str {
        &self.header.kind
    }

    /// The content hash of the data section.
    pub fn data_sha256(&self) -> &str {
        &self.header.data_sha256
    }

    pub fn meta<T: DeserializeOwned>(&self) -> Result<T, ModelError> {
        serde_json::from_value(self.header.meta.clone())
            .map_err(|e| bad(format!("unexpected {} header: {e}", self.header.kind)))
    }

    pub fn tensor_names(&self) -> impl Iterator<Item = (&String, &TensorEntry)> {
        self.header.tensors.iter()
    }

    fn raw(&self, name: &str, dtype: DType) -> Result<(&TensorEntry, &[u8]), ModelError> {
        let t = self
            .header
            .tensors
            .get(name)
            .ok_or_else(|| bad(format!("missing tensor `{name}`")))?;
        if t.dtype != dtype {
            return Err(bad(format!(
                "tensor `{name}` is {:?}, expected {dtype:?}",
                t.dtype
            )));
        }
        let n = t.n_bytes().unwrap_or(0);
        Ok((t, &self.data.as_slice()[t.offset..t.offset + n]))
    }

    /// The quantized matrix `name`, `[rows, cols]`, sharing this container's bytes.
    pub fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<QMatrix, ModelError> {
        let t = self
            .header
            .tensors
            .get(name)
            .ok_or_else(|| bad(format!("missing tensor `{name}`")))?;
        let ty = t
            .dtype
            .ggml()
            .ok_or_else(|| bad(format!("tensor `{name}` is {:?}, not blocks", t.dtype)))?;
        if t.shape != [rows, cols] {
            return Err(bad(format!(
                "tensor `{name}` has shape {:?}, expected {:?}",
                t.shape,
                [rows, cols]
            )));
        }
        let n = t.n_bytes().unwrap_or(0);
        let data = self.data.slice(t.offset, n);
        if self.packed.contains(name) {
            QMatrix::new_packed(ty, rows, cols, data)
        } else {
            QMatrix::new(ty, rows, cols, data)
        }
        .map_err(|e| bad(format!("tensor `{name}`: {e}")))
    }

    pub fn f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>), ModelError> {
        let (t, b) = self.raw(name, DType::F32)?;
        let v = b
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        Ok((t.shape.clone(), v))
    }

    pub fn f64(&self, name: &str) -> Result<(Vec<usize>, Vec<f64>), ModelError> {
        let (t, b) = self.raw(name, DType::F64)?;
        let v = b
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
            .collect();
        Ok((t.shape.clone(), v))
    }

    pub fn u32(&self, name: &str) -> Result<(Vec<usize>, Vec<u32>), ModelError> {
        let (t, b) = self.raw(name, DType::U32)?;
        let v = b
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        Ok((t.shape.clone(), v))
    }

    /// A tensor that must have exactly `shape`.
    pub fn f32_shaped(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, ModelError> {
        let (s, v) = self.f32(name)?;
        if s != shape {
            return Err(bad(format!(
                "tensor `{name}` has shape {s:?}, expected {shape:?}"
            )));
        }
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use veil_kernels::GgmlType;

    /// Matrices come back interleaved for the kernels, yet read, hash and write back as the
    /// bytes that were stored.
    #[test]
    fn a_stored_matrix_reads_and_writes_back_as_stored() {
        let (rows, cols) = (16, 64);
        let values: Vec<f32> = (0..rows * cols).map(|i| (i % 13) as f32 - 6.0).collect();
        let m = QMatrix::quantize(GgmlType::Q4_0, rows, cols, &values).expect("quantize");
        let mut w = ContainerWriter::new("test", &serde_json::json!({})).expect("writer");
        w.add_matrix("m", &m).expect("add");
        w.add_f32("v", &[3], &[1.0, 2.0, 3.0]);
        let c = Container::from_vec(w.to_bytes().expect("bytes")).expect("open");
        assert_eq!(c.data_sha256(), w.data_sha256());
        let back = c.matrix("m", rows, cols).expect("matrix");
        assert!(back.is_packed());
        assert_eq!(back.bytes(), m.bytes());
        assert_eq!(c.f32("v").expect("f32").1, [1.0, 2.0, 3.0]);
        let mut again = ContainerWriter::new("test", &serde_json::json!({})).expect("writer");
        again.add_matrix("m", &back).expect("add");
        again.add_f32("v", &[3], &[1.0, 2.0, 3.0]);
        assert_eq!(
            again.data_sha256(),
            w.data_sha256(),
            "written back unchanged"
        );
    }
}
