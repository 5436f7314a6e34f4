//! A request-response codec for bincode messages: each message is a u32 little-endian
//! length and that many bytes, refused beyond the protocol's limit before anything is read
//! into memory, and decoded with the same limit on allocations.

use std::io;
use std::marker::PhantomData;

use bincode::{Decode, Encode};
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::request_response::Codec;
use libp2p::StreamProtocol;

/// Largest frame any Veil protocol accepts (a prefill of 8192 positions of width 1024).
pub const MAX_FRAME: usize = 40 << 20;

/// Encode with the protocol's bincode configuration.
pub fn encode<T: Encode>(value: &T) -> Result<Vec<u8>, crate::ProtocolError> {
    bincode::encode_to_vec(value, bincode::config::standard().with_limit::<MAX_FRAME>())
        .map_err(|e| crate::ProtocolError::Malformed(e.to_string()))
}

/// Decode bytes that must hold exactly one message of type `T`, within `limit` bytes.
pub fn decode<T: Decode<()>>(bytes: &[u8], limit: usize) -> Result<T, crate::ProtocolError> {
    if bytes.len() > limit {
        return Err(crate::ProtocolError::TooLarge {
            size: bytes.len(),
            limit,
        });
    }
    let (value, used) =
        bincode::decode_from_slice(bytes, bincode::config::standard().with_limit::<MAX_FRAME>())
            .map_err(|e| crate::ProtocolError::Malformed(e.to_string()))?;
    if used != bytes.len() {
        return Err(crate::ProtocolError::Malformed(format!(
            "{} trailing bytes",
            bytes.len() - used
        )));
    }
    Ok(value)
}

/// Codec for `Req`/`Resp` with per-direction size limits.
#[derive(Debug)]
pub struct BincodeCodec<Req, Resp> {
    pub max_request: usize,
    pub max_response: usize,
    _types: PhantomData<fn() -> (Req, Resp)>,
}

impl<Req, Resp> Clone for BincodeCodec<Req, Resp> {
    fn clone(&self) -> Self {
        Self::new(self.max_request, self.max_response)
    }
}

impl<Req, Resp> BincodeCodec<Req, Resp> {
    pub fn new(max_request: usize, max_response: usize) -> Self {
        BincodeCodec {
            max_request: max_request.min(MAX_FRAME),
            max_response: max_response.min(MAX_FRAME),
            _types: PhantomData,
        }
    }
}

fn invalid(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

async fn read_frame<T: AsyncRead + Unpin + Send>(io: &mut T, limit: usize) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    let len = u32::from_le_bytes(len) as usize;
    if len > limit {
        return Err(invalid(format!(
            "message of {len} bytes exceeds the limit of {limit}"
        )));
    }
    let mut buf = vec![0u8; len];
    io.read_exact(&mut buf).await?;
    Ok(buf)
}

async fn write_frame<T: AsyncWrite + Unpin + Send>(
    io: &mut T,
    bytes: &[u8],
    limit: usize,
) -> io::Result<()> {
    if bytes.len() > limit {
        return Err(invalid(format!(
            "message of {} bytes exceeds the limit of {limit}",
            bytes.len()
        )));
    }
    io.write_all(&(bytes.len() as u32).to_le_bytes()).await?;
    io.write_all(bytes).await?;
    io.close().await
}

impl<Req, Resp> Codec for BincodeCodec<Req, Resp>
where
    Req: Encode + Decode<()> + Send + 'static,
    Resp: Encode + Decode<()> + Send + 'static,
{
    type Protocol = StreamProtocol;
    type Request = Req;
    type Response = Resp;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Req>
    where
        T: AsyncRead + Unpin + Send,
    {
        let buf = read_frame(io, self.max_request).await?;
        decode(&buf, self.max_request).map_err(invalid)
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Resp>
    where
        T: AsyncRead + Unpin + Send,
    {
        let buf = read_frame(io, self.max_response).await?;
        decode(&buf, self.max_response).map_err(invalid)
    }

    async fn write_request<T>(&mut self, _: &StreamProtocol, io: &mut T, req: Req) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        let bytes = encode(&req).map_err(invalid)?;
        write_frame(io, &bytes, self.max_request).await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Resp,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        let bytes = encode(&res).map_err(invalid)?;
        write_frame(io, &bytes, self.max_response).await
    }
}
