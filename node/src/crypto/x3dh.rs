//! X3DH-style key agreement (Signal "The X3DH Key Agreement Protocol", rev. 1).
//!
//! Initiator A, responder B; `IK` are X25519 identity keys, `SPK_B` the signed
//! prekey, `OPK_B` the optional one-time prekey, `EK_A` A's ephemeral key:
//!
//! ```text
//! DH1 = DH(IK_A, SPK_B)   DH2 = DH(EK_A, IK_B)   DH3 = DH(EK_A, SPK_B)
//! DH4 = DH(EK_A, OPK_B)   (only with a one-time prekey)
//! SK  = HKDF-SHA256(salt = 0x00*32, ikm = 0xFF*32 || DH1 || DH2 || DH3 [|| DH4],
//!                   info = "Tern v1 X3DH")
//! AD  = ed25519_A || x25519_A || ed25519_B || x25519_B        (128 bytes)
//! ```
//!
//! Invariants: the bundle (both signatures) and the initiator's identity
//! binding are verified before any DH; every DH output must be contributory
//! (low-order peer keys are rejected); intermediate DH outputs live in
//! zeroizing buffers. These functions are pure: the only side effect is
//! drawing the ephemeral key from the caller's RNG.

use rand::{CryptoRng, RngCore};
use zeroize::Zeroizing;

use super::error::CryptoError;
use super::kdf;
use super::keys::{IdentityKeys, IdentityPublic, PrekeyBundle};
use super::secret::{Secret32, x25519};

/// Length of the associated data binding both identities.
pub(crate) const AD_LEN: usize = 2 * 64;

/// Result of the key agreement on either side.
pub(crate) struct X3dhOutput {
    /// The shared secret `SK` (initial root key of the Double Ratchet).
    pub(crate) shared_secret: Secret32,
    /// `AD`: both identities, initiator first.
    pub(crate) associated_data: Vec<u8>,
}

/// Builds `AD = ed25519_A || x25519_A || ed25519_B || x25519_B`.
pub(crate) fn associated_data(initiator: &IdentityPublic, responder: &IdentityPublic) -> Vec<u8> {
    let mut ad = Vec::with_capacity(AD_LEN);
    ad.extend_from_slice(initiator.ed25519());
    ad.extend_from_slice(initiator.x25519());
    ad.extend_from_slice(responder.ed25519());
    ad.extend_from_slice(responder.x25519());
    ad
}

/// Initiator side. Verifies `bundle`, draws the ephemeral key and returns the
/// agreement output plus the ephemeral public key to send.
pub(crate) fn initiate<R: CryptoRng + RngCore>(
    rng: &mut R,
    ours: &IdentityKeys,
    bundle: &PrekeyBundle,
) -> Result<(X3dhOutput, [u8; 32]), CryptoError> {
    bundle.verify()?;
    let ephemeral = Secret32::random(rng);
    let their_identity = bundle.identity().x25519();
    let spk = bundle.signed_prekey();
    let mut dh = Zeroizing::new(Vec::with_capacity(4 * 32));
    dh.extend_from_slice(&*x25519(ours.x25519_secret(), spk, "signed prekey")?);
    dh.extend_from_slice(&*x25519(&ephemeral, their_identity, "identity X25519 key")?);
    dh.extend_from_slice(&*x25519(&ephemeral, spk, "signed prekey")?);
    if let Some((_, opk)) = bundle.one_time_prekey() {
        dh.extend_from_slice(&*x25519(&ephemeral, opk, "one-time prekey")?);
    }
    let sk = kdf::x3dh(&dh)?;
    Ok((
        X3dhOutput {
            shared_secret: Secret32::copy_from(&sk),
            associated_data: associated_data(ours.public(), bundle.identity()),
        },
        ephemeral.x25519_public(),
    ))
}

/// Responder side, given the looked-up prekey secrets. Verifies the
/// initiator's identity binding first.
pub(crate) fn respond(
    ours: &IdentityKeys,
    signed_prekey: &Secret32,
    one_time_prekey: Option<&Secret32>,
    their_identity: &IdentityPublic,
    their_ephemeral: &[u8; 32],
) -> Result<X3dhOutput, CryptoError> {
    their_identity.verify()?;
    let mut dh = Zeroizing::new(Vec::with_capacity(4 * 32));
    dh.extend_from_slice(&*x25519(
        signed_prekey,
        their_identity.x25519(),
        "identity X25519 key",
    )?);
    dh.extend_from_slice(&*x25519(
        ours.x25519_secret(),
        their_ephemeral,
        "ephemeral key",
    )?);
    dh.extend_from_slice(&*x25519(signed_prekey, their_ephemeral, "ephemeral key")?);
    if let Some(opk) = one_time_prekey {
        dh.extend_from_slice(&*x25519(opk, their_ephemeral, "ephemeral key")?);
    }
    let sk = kdf::x3dh(&dh)?;
    Ok(X3dhOutput {
        shared_secret: Secret32::copy_from(&sk),
        associated_data: associated_data(their_identity, ours.public()),
    })
}
