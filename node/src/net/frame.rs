//! A request-response codec of length-prefixed byte frames with hard size limits.
//!
//! Each request and each response is one frame: a 4-byte big-endian length, then that many
//! bytes. The length is checked against the limit *before* anything is allocated, so a peer
//! announcing a huge frame costs nothing; such a stream fails with `InvalidData` and the
//! behaviour reports an inbound failure. Within the limit, the buffer grows with the bytes
//! that actually arrive (from 8 KiB), so announcing a large frame and sending nothing holds
//! no memory either. Decoding the bytes is the capability's business.

use std::io;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::{StreamProtocol, request_response};

/// Length-prefixed frames with per-direction size limits.
#[derive(Debug, Clone, Copy)]
pub struct FrameCodec {
    /// Largest request accepted or sent.
    pub max_request: usize,
    /// Largest response accepted or sent.
    pub max_response: usize,
}

async fn read_frame<T: AsyncRead + Unpin + Send>(io: &mut T, max: usize) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes exceeds the limit of {max}"),
        ));
    }
    // Grown as bytes arrive (doubling, exactly up to `len`), not allocated at the announced
    // size: a peer announcing a large frame on each of many streams and sending nothing more
    // holds 8 KiB per stream, and a frame that arrives holds `len` bytes, no more.
    let mut buf = Vec::new();
    while buf.len() < len {
        let start = buf.len();
        let step = (len - start).min(start.max(FIRST_CHUNK));
        buf.reserve_exact(step);
        buf.resize(start + step, 0);
        io.read_exact(&mut buf[start..]).await?;
    }
    Ok(buf)
}

/// What a frame's buffer starts with before its bytes arrive.
const FIRST_CHUNK: usize = 8 * 1024;

async fn write_frame<T: AsyncWrite + Unpin + Send>(
    io: &mut T,
    bytes: &[u8],
    max: usize,
) -> io::Result<()> {
    if bytes.len() > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("frame of {} bytes exceeds the limit of {max}", bytes.len()),
        ));
    }
    let len =
        u32::try_from(bytes.len()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    io.write_all(&len.to_be_bytes()).await?;
    io.write_all(bytes).await?;
    io.close().await
}

impl request_response::Codec for FrameCodec {
    type Protocol = StreamProtocol;
    type Request = Vec<u8>;
    type Response = Vec<u8>;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Vec<u8>>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_frame(io, self.max_request).await
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Vec<u8>>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_frame(io, self.max_response).await
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Vec<u8>,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, &req, self.max_request).await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Vec<u8>,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, &res, self.max_response).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::io::Cursor;

    #[tokio::test]
    async fn frames_round_trip_and_oversize_is_refused_before_allocation() {
        let mut buf = Vec::new();
        write_frame(&mut Cursor::new(&mut buf), b"hello", 16)
            .await
            .unwrap();
        assert_eq!(&buf[..4], &5u32.to_be_bytes());
        let got = read_frame(&mut Cursor::new(&buf), 16).await.unwrap();
        assert_eq!(got, b"hello");

        // A header announcing 4 GiB is refused without reading further.
        let huge = u32::MAX.to_be_bytes().to_vec();
        let err = read_frame(&mut Cursor::new(&huge), 1024).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);

        // Truncated frames are an error, not a short read.
        let mut short = 10u32.to_be_bytes().to_vec();
        short.extend_from_slice(b"abc");
        assert!(read_frame(&mut Cursor::new(&short), 1024).await.is_err());
        let mut short = (96u32 * 1024).to_be_bytes().to_vec();
        short.extend_from_slice(&[7; 20_000]);
        let err = read_frame(&mut Cursor::new(&short), 128 * 1024)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);

        // A frame larger than the first chunk arrives whole (the buffer grows), and the
        // bytes after it are left for the next read.
        let big: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let mut wire = Vec::new();
        write_frame(&mut Cursor::new(&mut wire), &big, 128 * 1024)
            .await
            .unwrap();
        wire.extend_from_slice(b"next");
        let mut cursor = Cursor::new(&wire);
        let got = read_frame(&mut cursor, 128 * 1024).await.unwrap();
        assert_eq!(got, big);
        // Reserved step by step with `reserve_exact`: no doubling past the frame.
        assert!(got.capacity() < 2 * big.len(), "{}", got.capacity());
        let mut rest = Vec::new();
        cursor.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"next");

        let mut out = Vec::new();
        assert!(
            write_frame(&mut Cursor::new(&mut out), &[0u8; 20], 16)
                .await
                .is_err()
        );
    }
}
