//! GGUF v3 writers: [`GgufWriter`] builds a small file in memory (test fixtures, the tiny
//! model); [`GgufStream`] writes a large one tensor by tensor without holding it.

use std::io::{self, Write};

use super::MetaValue;

/// Builds a GGUF v3 file in memory. Tensors are written as F32 unless raw bytes of another
/// type are given.
#[derive(Debug, Default)]
pub struct GgufWriter {
    metadata: Vec<(String, MetaValue)>,
    tensors: Vec<(String, Vec<usize>, u32, Vec<u8>)>,
}

const ALIGNMENT: usize = 32;

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

fn type_id(v: &MetaValue) -> u32 {
    match v {
        MetaValue::U8(_) => 0,
        MetaValue::I8(_) => 1,
        MetaValue::U16(_) => 2,
        MetaValue::I16(_) => 3,
        MetaValue::U32(_) => 4,
        MetaValue::I32(_) => 5,
        MetaValue::F32(_) => 6,
        MetaValue::Bool(_) => 7,
        MetaValue::String(_) => 8,
        MetaValue::Array(_) => 9,
        MetaValue::U64(_) => 10,
        MetaValue::I64(_) => 11,
        MetaValue::F64(_) => 12,
    }
}

fn put_value(out: &mut Vec<u8>, v: &MetaValue) {
    match v {
        MetaValue::U8(x) => out.push(*x),
        MetaValue::I8(x) => out.push(*x as u8),
        MetaValue::U16(x) => out.extend(x.to_le_bytes()),
        MetaValue::I16(x) => out.extend(x.to_le_bytes()),
        MetaValue::U32(x) => out.extend(x.to_le_bytes()),
        MetaValue::I32(x) => out.extend(x.to_le_bytes()),
        MetaValue::U64(x) => out.extend(x.to_le_bytes()),
        MetaValue::I64(x) => out.extend(x.to_le_bytes()),
        MetaValue::F32(x) => out.extend(x.to_le_bytes()),
        MetaValue::F64(x) => out.extend(x.to_le_bytes()),
        MetaValue::Bool(x) => out.push(u8::from(*x)),
        MetaValue::String(s) => put_string(out, s),
        MetaValue::Array(items) => {
            let item_type = items.first().map(type_id).unwrap_or(4);
            out.extend(item_type.to_le_bytes());
            out.extend((items.len() as u64).to_le_bytes());
            for item in items {
                put_value(out, item);
            }
        }
    }
}

impl GgufWriter {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn meta(&mut self, key: &str, value: MetaValue) -> &mut Self {
        self.metadata.push((key.to_string(), value));
        self
    }

    /// An F32 tensor; `dims` in GGUF order (fastest-varying first).
    pub fn tensor_f32(&mut self, name: &str, dims: &[usize], data: &[f32]) -> &mut Self {
        let bytes = data.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.tensor_raw(name, dims, 0, bytes)
    }

    /// A tensor of any GGML type id, given its raw bytes.
    pub fn tensor_raw(
        &mut self,
        name: &str,
        dims: &[usize],
        ggml_type: u32,
        bytes: Vec<u8>,
    ) -> &mut Self {
        self.tensors
            .push((name.to_string(), dims.to_vec(), ggml_type, bytes));
        self
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let specs: Vec<TensorSpec> = self
            .tensors
            .iter()
            .map(|(name, dims, ty, bytes)| TensorSpec {
                name: name.clone(),
                dims: dims.clone(),
                ggml_type: *ty,
                n_bytes: bytes.len(),
            })
            .collect();
        let mut out = header(&self.metadata, &specs);
        // padding between tensors, none after the last (tests cut the file at its end)
        for (_, _, _, bytes) in &self.tensors {
            out.resize(out.len().div_ceil(ALIGNMENT) * ALIGNMENT, 0);
            out.extend(bytes);
        }
        out
    }
}

/// A tensor's entry in a GGUF header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    /// GGUF order (fastest-varying first).
    pub dims: Vec<usize>,
    /// GGML type id.
    pub ggml_type: u32,
    /// Length of the tensor's data.
    pub n_bytes: usize,
}

/// Magic, counts, metadata and tensor directory, padded to where the data starts. Tensors
/// follow in the order given, each padded to [`ALIGNMENT`].
fn header(metadata: &[(String, MetaValue)], tensors: &[TensorSpec]) -> Vec<u8> {
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((metadata.len() as u64).to_le_bytes());
    for (k, v) in metadata {
        put_string(&mut out, k);
        out.extend(type_id(v).to_le_bytes());
        put_value(&mut out, v);
    }
    let mut offset = 0usize;
    for t in tensors {
        put_string(&mut out, &t.name);
        out.extend((t.dims.len() as u32).to_le_bytes());
        for d in &t.dims {
            out.extend((*d as u64).to_le_bytes());
        }
        out.extend(t.ggml_type.to_le_bytes());
        out.extend((offset as u64).to_le_bytes());
        offset = (offset + t.n_bytes).div_ceil(ALIGNMENT) * ALIGNMENT;
    }
    out.resize(out.len().div_ceil(ALIGNMENT) * ALIGNMENT, 0);
    out
}

/// Writes a GGUF file whose tensor directory is known up front, the tensors' data then
/// following in pieces of any size: a file far larger than memory.
#[derive(Debug)]
pub struct GgufStream<W: Write> {
    out: W,
    tensors: Vec<TensorSpec>,
    /// The tensor being written and how many of its bytes are written.
    current: usize,
    written: usize,
    total: u64,
}

impl<W: Write> GgufStream<W> {
    /// Write the header of a file with `metadata` and `tensors`.
    pub fn start(
        mut out: W,
        metadata: &[(String, MetaValue)],
        tensors: Vec<TensorSpec>,
    ) -> io::Result<Self> {
        let head = header(metadata, &tensors);
        out.write_all(&head)?;
        Ok(GgufStream {
            out,
            tensors,
            current: 0,
            written: 0,
            total: head.len() as u64,
        })
    }

    /// The next bytes of the tensors' data, in directory order; a piece may end one tensor
    /// and not start the next.
    ///
    /// # Errors
    /// `InvalidInput` if the piece runs past the current tensor's length.
    pub fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        let Some(t) = self.tensors.get(self.current) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "every tensor is already written",
            ));
        };
        if self.written + bytes.len() > t.n_bytes {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "tensor {} holds {} bytes, not {}",
                    t.name,
                    t.n_bytes,
                    self.written + bytes.len()
                ),
            ));
        }
        self.out.write_all(bytes)?;
        self.written += bytes.len();
        self.total += bytes.len() as u64;
        if self.written == t.n_bytes {
            let pad = t.n_bytes.div_ceil(ALIGNMENT) * ALIGNMENT - t.n_bytes;
            self.out.write_all(&[0u8; ALIGNMENT][..pad])?;
            self.total += pad as u64;
            self.current += 1;
            self.written = 0;
        }
        Ok(())
    }

    /// Check that every tensor was written in full, flush, and return the writer and the
    /// file's length.
    pub fn finish(mut self) -> io::Result<(W, u64)> {
        if let Some(t) = self.tensors.get(self.current) {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "tensor {} has {} of its {} bytes",
                    t.name, self.written, t.n_bytes
                ),
            ));
        }
        self.out.flush()?;
        Ok((self.out, self.total))
    }
}
