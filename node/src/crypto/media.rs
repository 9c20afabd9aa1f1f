//! Media (attachment) encryption: the STREAM construction over ChaCha20-Poly1305.
//!
//! Every file gets a fresh random [`MediaKey`]: a 32-byte key and a 7-byte
//! nonce prefix. The plaintext is cut into [`CHUNK_SIZE`] chunks (the last one
//! may be shorter, possibly empty) and chunk `i` is sealed with
//!
//! ```text
//! nonce = prefix (7) || i (u32 BE) || last (0x01 for the final chunk, else 0x00)
//! ```
//!
//! and empty associated data. Each sealed chunk is `chunk || tag (16)`, so the
//! ciphertext is the concatenation of `CHUNK_SIZE + 16`-byte blocks and a
//! final shorter-or-equal block. Because position and finality are in the
//! nonce, truncation, reordering, swapping chunks between positions or files
//! and appending data are all detected.
//!
//! Invariants: memory use is bounded by two chunks whatever the file size;
//! the decryptor releases plaintext chunk by chunk, but a stream is only
//! authentic once [`MediaDecryptor::finalize`] (or EOF on [`MediaReader`])
//! succeeded; after any error a cipher refuses further use. The media key
//! itself travels inside a pairwise or group message.

use std::fmt;
use std::io::{self, Read, Write};

use chacha20poly1305::aead::AeadInPlace;
use chacha20poly1305::{ChaCha20Poly1305, KeyInit, Nonce, Tag};
use rand::{CryptoRng, RngCore};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use super::codec::Reader;
use super::error::CryptoError;
use super::ratchet::TAG_LEN;

/// Plaintext bytes per chunk (64 KiB).
pub const CHUNK_SIZE: usize = 64 * 1024;
/// Ciphertext bytes per full chunk.
pub const ENCRYPTED_CHUNK_SIZE: usize = CHUNK_SIZE + TAG_LEN;
/// Wire tag (format version) of an encoded [`MediaKey`].
pub const MEDIA_KEY_VERSION: u8 = 0x30;
/// Length of the nonce prefix.
pub const NONCE_PREFIX_LEN: usize = 7;

/// The per-file secret: key and nonce prefix.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct MediaKey {
    key: [u8; 32],
    nonce_prefix: [u8; NONCE_PREFIX_LEN],
}

impl MediaKey {
    /// Encoded length: `0x30 || key (32) || nonce prefix (7)`.
    pub const LEN: usize = 1 + 32 + NONCE_PREFIX_LEN;

    /// A fresh random key and prefix. Never reuse a key for two files.
    pub fn generate<R: CryptoRng + RngCore>(rng: &mut R) -> Self {
        let mut k = Self {
            key: [0u8; 32],
            nonce_prefix: [0u8; NONCE_PREFIX_LEN],
        };
        rng.fill_bytes(&mut k.key);
        rng.fill_bytes(&mut k.nonce_prefix);
        k
    }

    /// The encoding, to be sent inside an encrypted message; wiped on drop.
    pub fn to_bytes(&self) -> Zeroizing<Vec<u8>> {
        let mut out = Zeroizing::new(Vec::with_capacity(Self::LEN));
        out.push(MEDIA_KEY_VERSION);
        out.extend_from_slice(&self.key);
        out.extend_from_slice(&self.nonce_prefix);
        out
    }

    /// Decodes [`Self::to_bytes`] output.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CryptoError> {
        if bytes.len() != Self::LEN {
            return Err(CryptoError::InvalidLength {
                what: "media key",
                expected: Self::LEN,
                got: bytes.len(),
            });
        }
        let mut r = Reader::new(bytes, "media key");
        r.tag(MEDIA_KEY_VERSION)?;
        let k = Self {
            key: r.array()?,
            nonce_prefix: r.array()?,
        };
        r.finish()?;
        Ok(k)
    }
}

#[cfg(test)]
impl MediaKey {
    pub(crate) fn test_secrets(&self) -> Vec<Vec<u8>> {
        vec![self.key.to_vec()]
    }
}

impl fmt::Debug for MediaKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MediaKey(<redacted>)")
    }
}

/// Ciphertext length for a plaintext of `plaintext_len` bytes.
pub fn ciphertext_len(plaintext_len: u64) -> u64 {
    let chunk = CHUNK_SIZE as u64;
    // A full final chunk stays the final chunk; an empty file is one empty chunk.
    let chunks = plaintext_len.div_ceil(chunk).max(1);
    plaintext_len + chunks * TAG_LEN as u64
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Active,
    Finished,
    Failed,
}

/// Shared chunk sealing/opening state.
struct StreamCore {
    cipher: ChaCha20Poly1305,
    prefix: [u8; NONCE_PREFIX_LEN],
    counter: u32,
    phase: Phase,
}

impl StreamCore {
    fn new(key: &MediaKey) -> Self {
        Self {
            cipher: ChaCha20Poly1305::new((&key.key).into()),
            prefix: key.nonce_prefix,
            counter: 0,
            phase: Phase::Active,
        }
    }

    fn nonce(&self, counter: u32, last: bool) -> Nonce {
        let mut n = [0u8; 12];
        n[..NONCE_PREFIX_LEN].copy_from_slice(&self.prefix);
        n[7..11].copy_from_slice(&counter.to_be_bytes());
        n[11] = u8::from(last);
        n.into()
    }

    fn usable(&self) -> Result<(), CryptoError> {
        match self.phase {
            Phase::Active => Ok(()),
            Phase::Finished => Err(CryptoError::StreamMisuse {
                reason: "already finished",
            }),
            Phase::Failed => Err(CryptoError::StreamMisuse {
                reason: "a previous error poisoned the stream",
            }),
        }
    }

    /// Advances the counter after a non-final chunk.
    fn advance(&mut self, last: bool) -> Result<(), CryptoError> {
        if last {
            self.phase = Phase::Finished;
            return Ok(());
        }
        self.counter = self
            .counter
            .checked_add(1)
            .ok_or(CryptoError::CounterExhausted {
                what: "media chunk",
            })?;
        Ok(())
    }

    /// Appends `chunk || tag` to `out`.
    fn seal(&mut self, chunk: &[u8], last: bool, out: &mut Vec<u8>) -> Result<(), CryptoError> {
        if !last && self.counter == u32::MAX {
            self.phase = Phase::Failed;
            return Err(CryptoError::CounterExhausted {
                what: "media chunk",
            });
        }
        let nonce = self.nonce(self.counter, last);
        let start = out.len();
        out.extend_from_slice(chunk);
        match self
            .cipher
            .encrypt_in_place_detached(&nonce, &[], &mut out[start..])
        {
            Ok(tag) => {
                out.extend_from_slice(&tag);
                self.advance(last)
            }
            Err(_) => {
                out.truncate(start);
                self.phase = Phase::Failed;
                Err(CryptoError::TooLarge {
                    what: "media chunk",
                    max: CHUNK_SIZE,
                    got: chunk.len(),
                })
            }
        }
    }

    /// Opens `sealed` (chunk || tag) as chunk number `counter`, appending the
    /// plaintext to `out`. Does not change the phase or counter.
    fn open_at(
        &self,
        sealed: &[u8],
        counter: u32,
        last: bool,
        out: &mut Vec<u8>,
    ) -> Result<(), CryptoError> {
        let body_len = sealed
            .len()
            .checked_sub(TAG_LEN)
            .ok_or(CryptoError::Truncated)?;
        let (body, tag) = sealed.split_at(body_len);
        let start = out.len();
        out.extend_from_slice(body);
        let tag = Tag::from_slice(tag);
        if self
            .cipher
            .decrypt_in_place_detached(&self.nonce(counter, last), &[], &mut out[start..], tag)
            .is_err()
        {
            out.truncate(start);
            return Err(CryptoError::DecryptionFailed);
        }
        Ok(())
    }

    /// Opens the next chunk; on failure diagnoses trailing data / truncation.
    fn open(&mut self, sealed: &[u8], last: bool, out: &mut Vec<u8>) -> Result<(), CryptoError> {
        if !last && self.counter == u32::MAX {
            self.phase = Phase::Failed;
            return Err(CryptoError::CounterExhausted {
                what: "media chunk",
            });
        }
        match self.open_at(sealed, self.counter, last, out) {
            Ok(()) => self.advance(last),
            Err(e) => {
                self.phase = Phase::Failed;
                // Same position, other finality: distinguishes an appended
                // tail (the real final chunk followed by more data) and a
                // truncated stream (a middle chunk presented as the last).
                let mut scratch = Vec::new();
                if self
                    .open_at(sealed, self.counter, !last, &mut scratch)
                    .is_ok()
                {
                    scratch.zeroize();
                    return Err(if last {
                        CryptoError::Truncated
                    } else {
                        CryptoError::TrailingData
                    });
                }
                Err(e)
            }
        }
    }
}

/// Incremental encryptor: push plaintext with [`Self::update`], end with
/// [`Self::finalize`]. Holds at most one chunk of plaintext.
pub struct MediaEncryptor {
    core: StreamCore,
    buffer: Zeroizing<Vec<u8>>,
}

impl MediaEncryptor {
    /// Starts a stream under `key`.
    pub fn new(key: &MediaKey) -> Self {
        Self {
            core: StreamCore::new(key),
            buffer: Zeroizing::new(Vec::with_capacity(CHUNK_SIZE)),
        }
    }

    /// Encrypts as many complete chunks as possible, appending them to `out`.
    /// A full chunk is held back until more data (or `finalize`) shows
    /// whether it is the last one.
    pub fn update(&mut self, mut data: &[u8], out: &mut Vec<u8>) -> Result<(), CryptoError> {
        self.core.usable()?;
        while !data.is_empty() {
            if self.buffer.len() == CHUNK_SIZE {
                let buffer = std::mem::take(&mut *self.buffer);
                let result = self.core.seal(&buffer, false, out);
                *self.buffer = buffer;
                self.buffer.zeroize();
                result?;
            }
            if self.buffer.is_empty() && data.len() > CHUNK_SIZE {
                // Fast path: seal straight from the input.
                let (chunk, rest) = data.split_at(CHUNK_SIZE);
                self.core.seal(chunk, false, out)?;
                data = rest;
                continue;
            }
            let take = (CHUNK_SIZE - self.buffer.len()).min(data.len());
            let (head, rest) = data.split_at(take);
            self.buffer.extend_from_slice(head);
            data = rest;
        }
        Ok(())
    }

    /// Seals the final chunk (possibly empty) and appends it to `out`.
    pub fn finalize(mut self, out: &mut Vec<u8>) -> Result<(), CryptoError> {
        self.core.usable()?;
        let buffer = std::mem::take(&mut *self.buffer);
        let result = self.core.seal(&buffer, true, out);
        *self.buffer = buffer;
        result
    }
}

impl fmt::Debug for MediaEncryptor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MediaEncryptor")
            .field("chunk", &self.core.counter)
            .field("buffered", &self.buffer.len())
            .finish_non_exhaustive()
    }
}

/// Incremental decryptor: feed ciphertext with [`Self::update`] (any split),
/// end with [`Self::finalize`]. Holds at most one encrypted chunk.
pub struct MediaDecryptor {
    core: StreamCore,
    buffer: Vec<u8>,
}

impl MediaDecryptor {
    /// Starts decrypting a stream under `key`.
    pub fn new(key: &MediaKey) -> Self {
        Self {
            core: StreamCore::new(key),
            buffer: Vec::with_capacity(ENCRYPTED_CHUNK_SIZE),
        }
    }

    /// Decrypts every complete non-final chunk, appending plaintext to `out`.
    /// The output is authentic chunk by chunk, but the stream as a whole is
    /// only complete once [`Self::finalize`] succeeded.
    pub fn update(&mut self, mut data: &[u8], out: &mut Vec<u8>) -> Result<(), CryptoError> {
        self.core.usable()?;
        while !data.is_empty() {
            if self.buffer.len() == ENCRYPTED_CHUNK_SIZE {
                let result = self.core.open(&self.buffer, false, out);
                self.buffer.clear();
                result?;
            }
            if self.buffer.is_empty() && data.len() > ENCRYPTED_CHUNK_SIZE {
                let (chunk, rest) = data.split_at(ENCRYPTED_CHUNK_SIZE);
                self.core.open(chunk, false, out)?;
                data = rest;
                continue;
            }
            let take = (ENCRYPTED_CHUNK_SIZE - self.buffer.len()).min(data.len());
            let (head, rest) = data.split_at(take);
            self.buffer.extend_from_slice(head);
            data = rest;
        }
        Ok(())
    }

    /// Opens the final chunk. Fails with [`CryptoError::Truncated`] if the
    /// stream ended early and [`CryptoError::DecryptionFailed`] if it was
    /// tampered with.
    pub fn finalize(mut self, out: &mut Vec<u8>) -> Result<(), CryptoError> {
        self.core.usable()?;
        if self.buffer.len() < TAG_LEN {
            return Err(CryptoError::Truncated);
        }
        let buffer = std::mem::take(&mut self.buffer);
        self.core.open(&buffer, true, out)
    }
}

impl fmt::Debug for MediaDecryptor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MediaDecryptor")
            .field("chunk", &self.core.counter)
            .field("buffered", &self.buffer.len())
            .finish_non_exhaustive()
    }
}

/// Encrypts a whole file in memory.
pub fn encrypt(key: &MediaKey, plaintext: &[u8]) -> Result<Vec<u8>, CryptoError> {
    let capacity = usize::try_from(ciphertext_len(plaintext.len() as u64)).unwrap_or(usize::MAX);
    let mut out = Vec::with_capacity(capacity);
    let mut enc = MediaEncryptor::new(key);
    enc.update(plaintext, &mut out)?;
    enc.finalize(&mut out)?;
    Ok(out)
}

/// Decrypts a whole file in memory.
pub fn decrypt(key: &MediaKey, ciphertext: &[u8]) -> Result<Vec<u8>, CryptoError> {
    let mut out = Vec::with_capacity(ciphertext.len());
    let mut dec = MediaDecryptor::new(key);
    dec.update(ciphertext, &mut out)?;
    dec.finalize(&mut out)?;
    Ok(out)
}

fn io_error(e: CryptoError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// An encrypting [`Write`] adapter. Call [`Self::finish`] at the end: a
/// writer dropped without it leaves a truncated (and rejected) stream.
pub struct MediaWriter<W: Write> {
    inner: W,
    encryptor: MediaEncryptor,
    out: Vec<u8>,
}

impl<W: Write> MediaWriter<W> {
    /// Wraps `inner`.
    pub fn new(key: &MediaKey, inner: W) -> Self {
        Self {
            inner,
            encryptor: MediaEncryptor::new(key),
            out: Vec::with_capacity(2 * ENCRYPTED_CHUNK_SIZE),
        }
    }

    /// Writes the final chunk, flushes and returns the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        let mut out = std::mem::take(&mut self.out);
        out.clear();
        self.encryptor.finalize(&mut out).map_err(io_error)?;
        self.inner.write_all(&out)?;
        self.inner.flush()?;
        Ok(self.inner)
    }
}

impl<W: Write> Write for MediaWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // At most one chunk per call keeps memory bounded.
        let n = buf.len().min(CHUNK_SIZE);
        self.out.clear();
        self.encryptor
            .update(&buf[..n], &mut self.out)
            .map_err(io_error)?;
        self.inner.write_all(&self.out)?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl<W: Write> fmt::Debug for MediaWriter<W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MediaWriter")
            .field("encryptor", &self.encryptor)
            .finish_non_exhaustive()
    }
}

/// A decrypting [`Read`] adapter. Returns `InvalidData` errors on tampering;
/// end of file is reported only after the final chunk authenticated, so a
/// truncated stream yields an error, never a silent short read.
pub struct MediaReader<R: Read> {
    inner: R,
    decryptor: Option<MediaDecryptor>,
    input: Vec<u8>,
    plain: Zeroizing<Vec<u8>>,
    pos: usize,
    failed: bool,
}

impl<R: Read> MediaReader<R> {
    /// Wraps `inner`.
    pub fn new(key: &MediaKey, inner: R) -> Self {
        Self {
            inner,
            decryptor: Some(MediaDecryptor::new(key)),
            input: vec![0u8; ENCRYPTED_CHUNK_SIZE],
            plain: Zeroizing::new(Vec::with_capacity(CHUNK_SIZE)),
            pos: 0,
            failed: false,
        }
    }

    /// Returns the inner reader.
    pub fn into_inner(self) -> R {
        self.inner
    }
}

impl<R: Read> Read for MediaReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.failed {
            return Err(io_error(CryptoError::StreamMisuse {
                reason: "a previous error poisoned the stream",
            }));
        }
        loop {
            if self.pos < self.plain.len() {
                let available = &self.plain[self.pos..];
                let n = available.len().min(buf.len());
                buf[..n].copy_from_slice(&available[..n]);
                self.pos += n;
                return Ok(n);
            }
            self.plain.zeroize();
            self.plain.clear();
            self.pos = 0;
            let Some(decryptor) = self.decryptor.as_mut() else {
                return Ok(0);
            };
            let n = match self.inner.read(&mut self.input) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            let result = if n == 0 {
                match self.decryptor.take() {
                    Some(decryptor) => decryptor.finalize(&mut self.plain),
                    None => Ok(()),
                }
            } else {
                decryptor.update(&self.input[..n], &mut self.plain)
            };
            if let Err(e) = result {
                self.failed = true;
                self.plain.zeroize();
                return Err(io_error(e));
            }
        }
    }
}

impl<R: Read> fmt::Debug for MediaReader<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MediaReader")
            .field("decryptor", &self.decryptor)
            .finish_non_exhaustive()
    }
}
