//! Framing on every Shoal stream: a 4-byte big-endian length, then that
//! many bytes. A length above the stream's limit is refused before a byte
//! of the body is read, so a peer cannot make us allocate more than the
//! limit.

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// What went wrong reading a frame.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The peer announced a frame larger than the limit.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Announced length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The stream ended inside a frame.
    #[error("stream ended inside a frame ({got} of {want} bytes)")]
    Truncated {
        /// Bytes received.
        got: usize,
        /// Bytes announced (including the header).
        want: usize,
    },
    /// The stream failed.
    #[error("stream failed: {0}")]
    Io(#[from] std::io::Error),
}

/// Bytes of the length prefix.
pub const HEADER: usize = 4;

/// Encodes one frame.
pub fn encode(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// Decodes as many whole frames as `buf` holds. Returns the frames and the
/// number of bytes consumed; a partial frame at the end is left for later.
/// A frame above `max` is an error whatever follows it.
pub fn decode(buf: &[u8], max: usize) -> Result<(Vec<&[u8]>, usize), FrameError> {
    let mut frames = Vec::new();
    let mut at = 0;
    while buf.len() - at >= HEADER {
        let mut len_bytes = [0u8; HEADER];
        len_bytes.copy_from_slice(&buf[at..at + HEADER]);
        let len = u32::from_be_bytes(len_bytes) as usize;
        if len > max {
            return Err(FrameError::TooLarge { len, max });
        }
        if buf.len() - at - HEADER < len {
            break;
        }
        frames.push(&buf[at + HEADER..at + HEADER + len]);
        at += HEADER + len;
    }
    Ok((frames, at))
}

/// Writes one frame and flushes.
pub async fn write<S: AsyncWrite + Unpin>(stream: &mut S, body: &[u8]) -> std::io::Result<()> {
    stream.write_all(&encode(body)).await?;
    stream.flush().await
}

/// Reads one frame of at most `max` bytes; `None` at a clean end of stream.
pub async fn read<S: AsyncRead + Unpin>(
    stream: &mut S,
    max: usize,
) -> Result<Option<Vec<u8>>, FrameError> {
    let mut header = [0u8; HEADER];
    let mut got = 0;
    while got < HEADER {
        let n = stream.read(&mut header[got..]).await?;
        if n == 0 {
            if got == 0 {
                return Ok(None);
            }
            return Err(FrameError::Truncated { got, want: HEADER });
        }
        got += n;
    }
    let len = u32::from_be_bytes(header) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    let mut body = vec![0u8; len];
    let mut got = 0;
    while got < len {
        let n = stream.read(&mut body[got..]).await?;
        if n == 0 {
            return Err(FrameError::Truncated {
                got: HEADER + got,
                want: HEADER + len,
            });
        }
        got += n;
    }
    Ok(Some(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_splits_and_keeps_partial_tail() {
        let mut buf = encode(b"one");
        buf.extend(encode(b""));
        buf.extend(encode(b"three"));
        let cut = buf.len() - 2;
        let (frames, used) = decode(&buf[..cut], 16).unwrap();
        assert_eq!(frames, vec![&b"one"[..], &b""[..]]);
        assert_eq!(used, 7 + 4);
        let (frames, used) = decode(&buf, 16).unwrap();
        assert_eq!(frames.len(), 3);
        assert_eq!(used, buf.len());
    }

    #[test]
    fn oversized_length_is_refused_before_the_body() {
        let buf = [0xff, 0xff, 0xff, 0xff];
        assert!(matches!(
            decode(&buf, 1 << 20),
            Err(FrameError::TooLarge {
                len: 0xffff_ffff,
                ..
            })
        ));
    }

    #[test]
    fn async_read_reports_truncation_and_limits() {
        futures::executor::block_on(async {
            let mut ok = futures::io::Cursor::new(encode(b"hello"));
            assert_eq!(read(&mut ok, 5).await.unwrap(), Some(b"hello".to_vec()));
            assert_eq!(read(&mut ok, 5).await.unwrap(), None);
            let mut big = futures::io::Cursor::new(encode(b"hello"));
            assert!(matches!(
                read(&mut big, 4).await,
                Err(FrameError::TooLarge { len: 5, max: 4 })
            ));
            let bytes = encode(b"hello");
            let mut cut = futures::io::Cursor::new(bytes[..6].to_vec());
            assert!(matches!(
                read(&mut cut, 16).await,
                Err(FrameError::Truncated { got: 6, want: 9 })
            ));
        });
    }
}
