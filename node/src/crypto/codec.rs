//! Binary encoding helpers: a bounds-checked reader for the fixed-layout wire
//! formats, and the versioned postcard envelope used for persisted state.
//!
//! Invariants: readers never index out of bounds and never allocate more than
//! the input length; every decoder rejects trailing bytes; state blobs start
//! with a two-byte `[kind, version]` header that is checked before postcard
//! decoding, and the encoded output is returned in a `Zeroizing` buffer that
//! is allocated once at its final size (so no unwiped reallocation copies of
//! secrets are left behind).

use serde::Serialize;
use serde::de::DeserializeOwned;
use zeroize::Zeroizing;

use super::error::CryptoError;

/// Upper bound on any persisted state blob (sessions with 2000 skipped keys
/// are ~150 KB, a full one-time prekey pool ~400 KB).
pub(crate) const MAX_STATE_LEN: usize = 8 * 1024 * 1024;

/// Bounds-checked cursor over a wire-format byte slice.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    /// Starts reading `buf`, naming errors after `what`.
    pub(crate) fn new(buf: &'a [u8], what: &'static str) -> Self {
        Self { buf, what }
    }

    /// Takes `n` bytes.
    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], CryptoError> {
        if self.buf.len() < n {
            return Err(CryptoError::malformed(self.what, "truncated"));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    /// Takes a fixed-size array.
    pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N], CryptoError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    /// Takes one byte.
    pub(crate) fn u8(&mut self) -> Result<u8, CryptoError> {
        Ok(self.array::<1>()?[0])
    }

    /// Takes a big-endian `u32`.
    pub(crate) fn u32(&mut self) -> Result<u32, CryptoError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    /// Takes a big-endian `u64`.
    pub(crate) fn u64(&mut self) -> Result<u64, CryptoError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    /// Checks the leading type/version tag.
    pub(crate) fn tag(&mut self, expected: u8) -> Result<(), CryptoError> {
        let got = self.u8()?;
        if got == expected {
            Ok(())
        } else {
            Err(CryptoError::UnsupportedVersion {
                what: self.what,
                expected,
                got,
            })
        }
    }

    /// Reads a canonical optional `u32`: a flag byte (0 or 1) followed by four
    /// bytes that must be zero when the flag is 0.
    pub(crate) fn optional_u32(&mut self) -> Result<Option<u32>, CryptoError> {
        let flag = self.u8()?;
        let value = self.u32()?;
        match (flag, value) {
            (0, 0) => Ok(None),
            (0, _) => Err(CryptoError::malformed(self.what, "non-canonical absent id")),
            (1, v) => Ok(Some(v)),
            _ => Err(CryptoError::malformed(self.what, "invalid presence flag")),
        }
    }

    /// Everything that is left.
    pub(crate) fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }

    /// Fails if bytes are left over.
    pub(crate) fn finish(self) -> Result<(), CryptoError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(CryptoError::malformed(self.what, "trailing bytes"))
        }
    }
}

/// Writes a canonical optional `u32` (see [`Reader::optional_u32`]).
pub(crate) fn put_optional_u32(out: &mut Vec<u8>, value: Option<u32>) {
    match value {
        Some(v) => {
            out.push(1);
            out.extend_from_slice(&v.to_be_bytes());
        }
        None => out.extend_from_slice(&[0; 5]),
    }
}

/// Encodes `value` as `[kind, version] || postcard(value)` into a buffer that
/// is allocated once at its final size and wiped on drop.
pub(crate) fn encode_state<T: Serialize>(
    kind: u8,
    version: u8,
    what: &'static str,
    value: &T,
) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
    let size = postcard::experimental::serialized_size(value)
        .map_err(|e| CryptoError::malformed(what, e.to_string()))?;
    let mut out = Zeroizing::new(Vec::with_capacity(size + 2));
    out.push(kind);
    out.push(version);
    let buf = std::mem::take(&mut *out);
    *out =
        postcard::to_extend(value, buf).map_err(|e| CryptoError::malformed(what, e.to_string()))?;
    Ok(out)
}

/// Decodes a blob written by [`encode_state`], checking kind, version, the
/// size cap and that no bytes trail the postcard payload.
pub(crate) fn decode_state<T: DeserializeOwned>(
    kind: u8,
    version: u8,
    what: &'static str,
    bytes: &[u8],
) -> Result<T, CryptoError> {
    if bytes.len() > MAX_STATE_LEN {
        return Err(CryptoError::TooLarge {
            what,
            max: MAX_STATE_LEN,
            got: bytes.len(),
        });
    }
    let mut r = Reader::new(bytes, what);
    let got_kind = r.u8()?;
    if got_kind != kind {
        return Err(CryptoError::malformed(
            what,
            format!("wrong state kind {got_kind:#04x}"),
        ));
    }
    r.tag(version)?;
    let (value, rest) = postcard::take_from_bytes::<T>(r.rest())
        .map_err(|e| CryptoError::malformed(what, e.to_string()))?;
    if !rest.is_empty() {
        return Err(CryptoError::malformed(what, "trailing bytes"));
    }
    Ok(value)
}
