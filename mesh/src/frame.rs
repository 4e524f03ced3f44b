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

/// Frames read through one buffer: each read takes as much as the stream
/// holds (up to the buffer's room), and the whole frames in it are handed
/// out as slices of it. A long run of frames then costs one read of the
/// stream per buffer-full instead of two per frame, and no allocation;
/// bytes read past a frame stay for the next. A frame larger than the
/// buffer grows it to fit (up to the limit the caller gives).
#[derive(Debug)]
pub struct Buffered {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl Buffered {
    /// A reader with a buffer of `capacity` bytes.
    pub fn new(capacity: usize) -> Self {
        Buffered {
            buf: vec![0; capacity.max(HEADER)],
            start: 0,
            end: 0,
        }
    }

    /// Bytes held that no frame has taken yet.
    pub fn held(&self) -> usize {
        self.end - self.start
    }

    /// The next whole frame held (its body), taken; `None` if the bytes
    /// held do not make one yet. A length above `max` is an error, and
    /// stays one.
    pub fn frame(&mut self, max: usize) -> Result<Option<&[u8]>, FrameError> {
        let Some(len) = self.announced(max)? else {
            return Ok(None);
        };
        if self.held() < HEADER + len {
            return Ok(None);
        }
        let body = self.start + HEADER..self.start + HEADER + len;
        self.start = body.end;
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
        }
        Ok(Some(&self.buf[body]))
    }

    /// The length of the frame the held bytes begin, once its header is in.
    fn announced(&self, max: usize) -> Result<Option<usize>, FrameError> {
        if self.held() < HEADER {
            return Ok(None);
        }
        let mut h = [0u8; HEADER];
        h.copy_from_slice(&self.buf[self.start..self.start + HEADER]);
        let len = u32::from_be_bytes(h) as usize;
        if len > max {
            return Err(FrameError::TooLarge { len, max });
        }
        Ok(Some(len))
    }

    /// Room to read the stream into, after the bytes held: those are moved
    /// to the front when the room left is less than the frame they begin
    /// needs, and the buffer grows when that frame is larger than all of
    /// it. Give what was read to [`Buffered::filled`].
    pub fn room(&mut self, max: usize) -> Result<&mut [u8], FrameError> {
        let need = HEADER + self.announced(max)?.unwrap_or(0);
        if self.buf.len() - self.start < need {
            self.buf.copy_within(self.start..self.end, 0);
            (self.start, self.end) = (0, self.end - self.start);
            if self.buf.len() < need {
                self.buf.resize(need, 0);
            }
        }
        if self.end == self.buf.len() {
            // Full of whole frames not taken yet: nothing to read into.
            self.buf.copy_within(self.start..self.end, 0);
            (self.start, self.end) = (0, self.end - self.start);
        }
        Ok(&mut self.buf[self.end..])
    }

    /// Counts `n` bytes read into [`Buffered::room`].
    pub fn filled(&mut self, n: usize) {
        self.end = (self.end + n).min(self.buf.len());
    }

    /// The error for a stream that ended now: `None` between frames, the
    /// truncation inside one.
    pub fn ended(&self, max: usize) -> Option<FrameError> {
        if self.held() == 0 {
            return None;
        }
        let want = HEADER + self.announced(max).ok().flatten().unwrap_or(0);
        Some(FrameError::Truncated {
            got: self.held(),
            want: want.max(HEADER),
        })
    }

    /// Reads the next frame from `stream` through the buffer (`None`: the
    /// stream ended between frames).
    pub async fn read<S: AsyncRead + Unpin>(
        &mut self,
        stream: &mut S,
        max: usize,
    ) -> Result<Option<&[u8]>, FrameError> {
        while !self.has_frame(max)? {
            let room = self.room(max)?;
            let n = stream.read(room).await?;
            if n == 0 {
                return match self.ended(max) {
                    None => Ok(None),
                    Some(e) => Err(e),
                };
            }
            self.filled(n);
        }
        self.frame(max)
    }

    /// Whether a whole frame is held (without taking it).
    pub fn has_frame(&self, max: usize) -> Result<bool, FrameError> {
        Ok(self
            .announced(max)?
            .is_some_and(|len| self.held() >= HEADER + len))
    }
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

    /// Frames read through the buffer, whatever the pieces the stream
    /// gives them in, are the frames written, then the end.
    #[test]
    fn buffered_frames_come_whole_across_any_reads() {
        struct Pieces(Vec<u8>, usize);
        impl AsyncRead for Pieces {
            fn poll_read(
                mut self: std::pin::Pin<&mut Self>,
                _: &mut std::task::Context<'_>,
                out: &mut [u8],
            ) -> std::task::Poll<std::io::Result<usize>> {
                let n = self.1.min(out.len()).min(self.0.len());
                out[..n].copy_from_slice(&self.0[..n]);
                self.0.drain(..n);
                std::task::Poll::Ready(Ok(n))
            }
        }
        let bodies: Vec<Vec<u8>> = (0..40u8)
            .map(|i| vec![i; (i as usize * 37) % 300])
            .collect();
        let bytes: Vec<u8> = bodies.iter().flat_map(|b| encode(b)).collect();
        for (capacity, piece) in [(1, 1), (16, 7), (64, 1000), (300, 64), (4096, 4096)] {
            futures::executor::block_on(async {
                let mut stream = Pieces(bytes.clone(), piece);
                let mut r = Buffered::new(capacity);
                for b in &bodies {
                    let got = r.read(&mut stream, 512).await.unwrap();
                    assert_eq!(got, Some(&b[..]), "capacity {capacity}, pieces of {piece}");
                }
                assert_eq!(r.read(&mut stream, 512).await.unwrap(), None);
            });
        }
        // A length over the limit, and a stream cut inside a frame.
        futures::executor::block_on(async {
            let mut big = Pieces(encode(&[1; 600]), 100);
            let mut r = Buffered::new(64);
            let got = r.read(&mut big, 512).await;
            assert!(matches!(
                got,
                Err(FrameError::TooLarge { len: 600, max: 512 })
            ));
            let mut cut = Pieces(encode(b"hello")[..6].to_vec(), 3);
            let mut r = Buffered::new(64);
            let got = r.read(&mut cut, 16).await;
            assert!(matches!(
                got,
                Err(FrameError::Truncated { got: 6, want: 9 })
            ));
        });
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
