//! Parsing of the GGUF header, metadata and tensor directory.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use veil_kernels::{Bytes, QMatrix};

use super::{GgmlType, GgufError, MetaValue};

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
const MAX_DIMS: usize = 4;

/// One entry of the tensor directory.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions in GGUF order: `dims[0]` varies fastest (the row length).
    pub dims: Vec<usize>,
    pub ggml_type: GgmlType,
    /// Byte offset from the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    pub fn n_elements(&self) -> usize {
        self.dims.iter().product()
    }
}

/// A parsed GGUF file held in memory.
#[derive(Debug)]
pub struct GgufFile {
    pub version: u32,
    metadata: BTreeMap<String, MetaValue>,
    tensors: Vec<TensorInfo>,
    by_name: HashMap<String, usize>,
    /// The whole file; quantized matrices share it (see [`GgufFile::tensor_matrix`]).
    bytes: Bytes,
    data_start: usize,
    /// Per tensor: whether its rows were interleaved in memory at load
    /// ([`veil_kernels::pack`]).
    packed: Vec<bool>,
}

/// What parsing finds before the bytes are shared.
struct Parsed {
    version: u32,
    metadata: BTreeMap<String, MetaValue>,
    tensors: Vec<TensorInfo>,
    by_name: HashMap<String, usize>,
    data_start: usize,
}

impl Parsed {
    fn check_range(
        &self,
        t: &TensorInfo,
        file_len: usize,
    ) -> Result<Option<std::ops::Range<usize>>, GgufError> {
        range_of(t, self.data_start, file_len)
    }
}

struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], GgufError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&end| end <= self.bytes.len())
            .ok_or_else(|| {
                GgufError::Truncated(format!("{what} at byte {} needs {n} bytes", self.pos))
            })?;
        let out = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], GgufError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    /// A count that cannot exceed what is left in the file, at `min_size` bytes each.
    fn count(&mut self, what: &str, min_size: usize) -> Result<usize, GgufError> {
        let n = self.u64(what)?;
        let fits = usize::try_from(n)
            .ok()
            .filter(|&n| n.saturating_mul(min_size.max(1)) <= self.remaining());
        fits.ok_or_else(|| {
            GgufError::Truncated(format!(
                "{what} is {n} but only {} bytes remain",
                self.remaining()
            ))
        })
    }

    fn string(&mut self, what: &str) -> Result<String, GgufError> {
        let len = self.count(what, 1)?;
        let raw = self.take(len, what)?;
        String::from_utf8(raw.to_vec())
            .map_err(|_| GgufError::Truncated(format!("{what} is not valid UTF-8")))
    }

    fn value(&mut self, type_id: u32, key: &str, depth: usize) -> Result<MetaValue, GgufError> {
        Ok(match type_id {
            0 => MetaValue::U8(self.array::<1>(key)?[0]),
            1 => MetaValue::I8(self.array::<1>(key)?[0] as i8),
            2 => MetaValue::U16(u16::from_le_bytes(self.array(key)?)),
            3 => MetaValue::I16(i16::from_le_bytes(self.array(key)?)),
            4 => MetaValue::U32(self.u32(key)?),
            5 => MetaValue::I32(i32::from_le_bytes(self.array(key)?)),
            6 => MetaValue::F32(f32::from_le_bytes(self.array(key)?)),
            7 => MetaValue::Bool(self.array::<1>(key)?[0] != 0),
            8 => MetaValue::String(self.string(key)?),
            9 if depth == 0 => {
                let item_type = self.u32(key)?;
                let n = self.count(key, 1)?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(item_type, key, depth + 1)?);
                }
                MetaValue::Array(items)
            }
            10 => MetaValue::U64(self.u64(key)?),
            11 => MetaValue::I64(i64::from_le_bytes(self.array(key)?)),
            12 => MetaValue::F64(f64::from_le_bytes(self.array(key)?)),
            other => {
                return Err(GgufError::Truncated(format!(
                    "metadata `{key}` has unknown value type {other}"
                )))
            }
        })
    }
}

impl GgufFile {
    /// Read and parse a GGUF file.
    pub fn open(path: &Path) -> Result<Self, GgufError> {
        let bytes = std::fs::read(path).map_err(|source| GgufError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_bytes(bytes)
    }

    /// Parse a GGUF file already in memory. Its quantized matrices whose format has an
    /// interleaved layout are interleaved in place (the kernels read them faster so; the
    /// accessors hide it), so the bytes are not the file's any more.
    pub fn from_bytes(mut bytes: Vec<u8>) -> Result<Self, GgufError> {
        let parsed = Self::from_slice(&bytes)?;
        let mut packed = vec![false; parsed.tensors.len()];
        for (t, p) in parsed.tensors.iter().zip(&mut packed) {
            let Some(range) = parsed.check_range(t, bytes.len())? else {
                continue;
            };
            if let [_, rows] = t.dims[..] {
                if veil_kernels::pack::packable(t.ggml_type, rows) {
                    veil_kernels::pack::pack_in_place(t.ggml_type, rows, &mut bytes[range]);
                    *p = true;
                }
            }
        }
        Ok(GgufFile {
            version: parsed.version,
            metadata: parsed.metadata,
            tensors: parsed.tensors,
            by_name: parsed.by_name,
            bytes: Bytes::from_vec(bytes),
            data_start: parsed.data_start,
            packed,
        })
    }

    /// Parse a GGUF file held in shared bytes (owned or memory-mapped), as they are.
    pub fn from_shared(bytes: Bytes) -> Result<Self, GgufError> {
        let parsed = Self::from_slice(bytes.as_slice())?;
        Ok(GgufFile {
            version: parsed.version,
            packed: vec![false; parsed.tensors.len()],
            metadata: parsed.metadata,
            tensors: parsed.tensors,
            by_name: parsed.by_name,
            bytes,
            data_start: parsed.data_start,
        })
    }

    /// The header, metadata and tensor directory of `bytes`, every tensor's range checked.
    fn from_slice(bytes: &[u8]) -> Result<Parsed, GgufError> {
        let mut c = Cursor { bytes, pos: 0 };
        let magic: [u8; 4] = c.array("magic")?;
        if &magic != MAGIC {
            return Err(GgufError::BadMagic { found: magic });
        }
        let version = c.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::UnsupportedVersion(version));
        }
        // Each tensor entry is at least 24 bytes; each metadata entry at least 13.
        let n_tensors = c.count("tensor count", 24)?;
        let n_kv = c.count("metadata count", 13)?;

        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = c.string("metadata key")?;
            let type_id = c.u32(&key)?;
            let value = c.value(type_id, &key, 0)?;
            metadata.insert(key, value);
        }

        let mut tensors = Vec::with_capacity(n_tensors);
        let mut by_name = HashMap::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let name = c.string("tensor name")?;
            let n_dims = c.u32(&name)? as usize;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(GgufError::Truncated(format!(
                    "tensor `{name}` has {n_dims} dimensions"
                )));
            }
            let mut dims = Vec::with_capacity(n_dims);
            for _ in 0..n_dims {
                let d = c.u64(&name)?;
                dims.push(usize::try_from(d).map_err(|_| {
                    GgufError::Truncated(format!("tensor `{name}` has dimension {d}"))
                })?);
            }
            let ggml_type = GgmlType::from_id(c.u32(&name)?);
            let offset = c.u64(&name)?;
            if by_name.insert(name.clone(), tensors.len()).is_some() {
                return Err(GgufError::Truncated(format!(
                    "tensor `{name}` appears twice"
                )));
            }
            tensors.push(TensorInfo {
                name,
                dims,
                ggml_type,
                offset,
            });
        }

        let alignment = match metadata.get("general.alignment") {
            Some(v) => v.as_u64().filter(|a| a.is_power_of_two()).ok_or_else(|| {
                GgufError::Truncated("general.alignment is not a power of two".into())
            })?,
            None => DEFAULT_ALIGNMENT,
        };
        let data_start = (c.pos as u64).div_ceil(alignment) * alignment;
        let data_start = usize::try_from(data_start)
            .ok()
            .filter(|&s| s <= bytes.len())
            .ok_or_else(|| GgufError::Truncated("file ends before its data section".into()))?;

        let parsed = Parsed {
            version,
            metadata,
            tensors,
            by_name,
            data_start,
        };
        for t in &parsed.tensors {
            parsed.check_range(t, bytes.len())?;
        }
        Ok(parsed)
    }

    fn check_range(&self, t: &TensorInfo) -> Result<Option<std::ops::Range<usize>>, GgufError> {
        range_of(t, self.data_start, self.bytes.len())
    }

    /// All metadata, sorted by key.
    pub fn metadata(&self) -> &BTreeMap<String, MetaValue> {
        &self.metadata
    }

    /// The tensor directory, in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }

    /// A metadata value, or an error naming the missing key.
    pub fn get(&self, key: &str) -> Result<&MetaValue, GgufError> {
        self.metadata
            .get(key)
            .ok_or_else(|| GgufError::MissingKey(key.to_string()))
    }

    fn wrong(key: &str, expected: &'static str, found: &MetaValue) -> GgufError {
        GgufError::WrongType {
            key: key.to_string(),
            expected,
            found: found.type_name(),
        }
    }

    pub fn get_usize(&self, key: &str) -> Result<usize, GgufError> {
        let v = self.get(key)?;
        v.as_u64()
            .and_then(|x| usize::try_from(x).ok())
            .ok_or_else(|| Self::wrong(key, "unsigned integer", v))
    }

    pub fn get_f32(&self, key: &str) -> Result<f32, GgufError> {
        let v = self.get(key)?;
        v.as_f64()
            .map(|x| x as f32)
            .ok_or_else(|| Self::wrong(key, "float", v))
    }

    pub fn get_bool(&self, key: &str) -> Result<bool, GgufError> {
        match self.get(key)? {
            MetaValue::Bool(b) => Ok(*b),
            v => Err(Self::wrong(key, "bool", v)),
        }
    }

    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        match self.get(key)? {
            MetaValue::String(s) => Ok(s),
            v => Err(Self::wrong(key, "string", v)),
        }
    }

    fn get_array(&self, key: &str) -> Result<&[MetaValue], GgufError> {
        match self.get(key)? {
            MetaValue::Array(items) => Ok(items),
            v => Err(Self::wrong(key, "array", v)),
        }
    }

    pub fn get_str_array(&self, key: &str) -> Result<Vec<&str>, GgufError> {
        self.get_array(key)?
            .iter()
            .map(|v| match v {
                MetaValue::String(s) => Ok(s.as_str()),
                v => Err(Self::wrong(key, "array of strings", v)),
            })
            .collect()
    }

    pub fn get_f32_array(&self, key: &str) -> Result<Vec<f32>, GgufError> {
        self.get_array(key)?
            .iter()
            .map(|v| match v {
                MetaValue::F32(x) => Ok(*x),
                v => Err(Self::wrong(key, "array of float32", v)),
            })
            .collect()
    }

    pub fn get_i64_array(&self, key: &str) -> Result<Vec<i64>, GgufError> {
        self.get_array(key)?
            .iter()
            .map(|v| {
                v.as_i64()
                    .ok_or_else(|| Self::wrong(key, "array of integers", v))
            })
            .collect()
    }

    /// Whether a key is present (for optional keys that have a documented default).
    pub fn has_key(&self, key: &str) -> bool {
        self.metadata.contains_key(key)
    }

    pub fn tensor_info(&self, name: &str) -> Result<&TensorInfo, GgufError> {
        self.by_name
            .get(name)
            .map(|&i| &self.tensors[i])
            .ok_or_else(|| GgufError::MissingTensor(name.to_string()))
    }

    /// A tensor dequantised to f32, with its GGUF dimensions.
    pub fn tensor_f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>), GgufError> {
        let info = self.tensor_info(name)?;
        let range = self
            .check_range(info)?
            .ok_or_else(|| GgufError::UnsupportedTensorType {
                tensor: name.to_string(),
                type_name: info.ggml_type.name(),
            })?;
        if self.packed[self.by_name[name]] {
            let m = self.tensor_matrix(name, info.dims[0], info.dims[1])?;
            return Ok((info.dims.clone(), m.dequantize()));
        }
        let mut out = vec![0.0f32; info.n_elements()];
        info.ggml_type
            .dequantize(&self.bytes.as_slice()[range], &mut out);
        Ok((info.dims.clone(), out))
    }

    /// A linear weight with GGUF dimensions `[d_in, d_out]` (stored `d_out` rows of `d_in`
    /// values) as a quantized matrix that shares this file's bytes: nothing is copied or
    /// dequantized.
    pub fn tensor_matrix(
        &self,
        name: &str,
        d_in: usize,
        d_out: usize,
    ) -> Result<QMatrix, GgufError> {
        let info = self.tensor_info(name)?;
        if info.dims != [d_in, d_out] {
            return Err(GgufError::ShapeMismatch {
                tensor: name.to_string(),
                expected: vec![d_in, d_out],
                found: info.dims.clone(),
            });
        }
        let unsupported = || GgufError::UnsupportedTensorType {
            tensor: name.to_string(),
            type_name: info.ggml_type.name(),
        };
        let range = self.check_range(info)?.ok_or_else(unsupported)?;
        let bytes = self.bytes.slice(range.start, range.len());
        if self.packed[self.by_name[name]] {
            QMatrix::new_packed(info.ggml_type, d_out, d_in, bytes)
        } else {
            QMatrix::new(info.ggml_type, d_out, d_in, bytes)
        }
        .map_err(|_| unsupported())
    }

    /// A tensor that must have exactly the GGUF dimensions `dims`.
    pub fn tensor_f32_shaped(&self, name: &str, dims: &[usize]) -> Result<Vec<f32>, GgufError> {
        let (found, data) = self.tensor_f32(name)?;
        if found != dims {
            return Err(GgufError::ShapeMismatch {
                tensor: name.to_string(),
                expected: dims.to_vec(),
                found,
            });
        }
        Ok(data)
    }
}

/// The byte range of a tensor's data, checked against the file's length. Tensors of a
/// type Veil cannot read are only checked when loaded.
fn range_of(
    t: &TensorInfo,
    data_start: usize,
    file_len: usize,
) -> Result<Option<std::ops::Range<usize>>, GgufError> {
    let n = t
        .dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| GgufError::Truncated(format!("tensor `{}` is too large", t.name)))?;
    let Some(size) = t.ggml_type.byte_size(n) else {
        return match t.ggml_type.block_layout() {
            Some((block, _)) => Err(GgufError::PartialBlock {
                tensor: t.name.clone(),
                type_name: t.ggml_type.name(),
                elements: n,
                block,
            }),
            None => Ok(None),
        };
    };
    let start = usize::try_from(t.offset)
        .ok()
        .and_then(|o| o.checked_add(data_start));
    let range = start.and_then(|s| s.checked_add(size).map(|e| s..e));
    match range {
        Some(r) if r.end <= file_len => Ok(Some(r)),
        _ => Err(GgufError::Truncated(format!(
            "tensor `{}` ({} bytes at offset {}) lies beyond the end of the file ({} bytes)",
            t.name, size, t.offset, file_len
        ))),
    }
}
