//! Encryption of a repository (chosen at init): every stored chunk, index and manifest
//! is sealed with XChaCha20-Poly1305 (a random 24-byte nonce per object, so nonces
//! never repeat in practice; the tag authenticates it, and the associated data binds a
//! chunk to its id and an object to its kind), and chunk ids are keyed BLAKE3, so
//! neither ids nor contents reveal anything to whoever holds the files.
//!
//! The two keys (64 random bytes) are the master key. It is stored in `config`
//! wrapped: sealed with a key derived from the passphrase by Argon2id (64 MiB, 3
//! passes, a random salt). A wrong passphrase fails to open the wrapping: one clear
//! error.

use argon2::Argon2;
use chacha20poly1305::KeyInit;
use chacha20poly1305::XChaCha20Poly1305;
use chacha20poly1305::XNonce;
use chacha20poly1305::aead::Aead;
use chacha20poly1305::aead::Payload;
use serde::Deserialize;
use serde::Serialize;

use crate::error::Error;
use crate::error::Result;
use crate::hex::hex;
use crate::hex::unhex;

const NONCE: usize = 24;
/// Bytes of the Poly1305 tag after the ciphertext.
const TAG: usize = 16;
/// Argon2id cost: memory in KiB, passes, lanes.
const KDF_MEMORY_KIB: u32 = 64 << 10;
const KDF_PASSES: u32 = 3;
const KDF_LANES: u32 = 1;

/// Random bytes from the kernel.
pub fn random<const N: usize>() -> [u8; N] {
    use std::io::Read;
    let mut out = [0u8; N];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut out))
        .expect("the kernel's random source is readable");
    out
}

/// A repository's master key: one key for sealing, one for chunk ids.
#[derive(Clone)]
pub struct Keys {
    seal: [u8; 32],
    ids: [u8; 32],
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keys(..)")
    }
}

impl Keys {
    /// A new random master key.
    pub fn generate() -> Self {
        Self {
            seal: random(),
            ids: random(),
        }
    }

    /// The keyed id of a chunk's bytes.
    pub fn chunk_id(&self, data: &[u8]) -> [u8; 32] {
        *blake3::keyed_hash(&self.ids, data).as_bytes()
    }

    /// `plain` sealed: nonce, then ciphertext and tag. `aad` is authenticated, not stored.
    pub fn seal(&self, aad: &[u8], plain: &[u8]) -> Vec<u8> {
        seal_with(&self.seal, aad, plain)
    }

    /// The plaintext of `sealed`, if it is authentic for `aad`.
    pub fn open(&self, key: &str, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>> {
        open_with(&self.seal, aad, sealed).ok_or_else(|| {
            Error::damaged(
                key,
                "authentication failed (damaged, or not this repository's)",
            )
        })
    }

    /// [`Keys::open`] without copying: decrypts `sealed` where it lies and returns the
    /// plaintext, a slice of it (the nonce and tag cut off).
    pub fn open_in_place<'a>(
        &self,
        key: &str,
        aad: &[u8],
        sealed: &'a mut [u8],
    ) -> Result<&'a mut [u8]> {
        use chacha20poly1305::aead::AeadInPlace;
        let damaged = || {
            Error::damaged(
                key,
                "authentication failed (damaged, or not this repository's)",
            )
        };
        if sealed.len() < NONCE + TAG {
            return Err(damaged());
        }
        let (nonce, rest) = sealed.split_at_mut(NONCE);
        let (body, tag) = rest.split_at_mut(rest.len() - TAG);
        XChaCha20Poly1305::new((&self.seal).into())
            .decrypt_in_place_detached(
                XNonce::from_slice(nonce),
                aad,
                body,
                chacha20poly1305::Tag::from_slice(tag),
            )
            .map_err(|_| damaged())?;
        Ok(body)
    }

    /// The master key wrapped with `passphrase`, for `config`.
    pub fn wrap(&self, passphrase: &[u8]) -> KeyFile {
        let salt: [u8; 16] = random();
        let kek = derive(passphrase, &salt, KDF_MEMORY_KIB, KDF_PASSES, KDF_LANES);
        let mut both = Vec::with_capacity(64);
        both.extend_from_slice(&self.seal);
        both.extend_from_slice(&self.ids);
        KeyFile {
            kdf: "argon2id".into(),
            memory_kib: KDF_MEMORY_KIB,
            passes: KDF_PASSES,
            lanes: KDF_LANES,
            salt: hex(&salt),
            wrapped: hex(&seal_with(&kek, b"stillpoint master key", &both)),
        }
    }
}

/// The wrapped master key, as `config` stores it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyFile {
    /// Always `argon2id`.
    pub kdf: String,
    /// Argon2id memory, KiB.
    pub memory_kib: u32,
    /// Argon2id passes.
    pub passes: u32,
    /// Argon2id lanes.
    pub lanes: u32,
    /// Hex salt.
    pub salt: String,
    /// Hex: the two keys sealed with the passphrase's key.
    pub wrapped: String,
}

impl KeyFile {
    /// The master key, if `passphrase` is the one it was wrapped with.
    pub fn unwrap(&self, passphrase: &[u8]) -> Result<Keys> {
        let bad = || Error::damaged("config", "bad encryption parameters");
        if self.kdf != "argon2id"
            || self.memory_kib > 4 << 20
            || self.passes > 64
            || self.lanes > 64
        {
            return Err(bad());
        }
        let salt = unhex(&self.salt).ok_or_else(bad)?;
        let wrapped = unhex(&self.wrapped).ok_or_else(bad)?;
        let kek = derive(passphrase, &salt, self.memory_kib, self.passes, self.lanes);
        let both = open_with(&kek, b"stillpoint master key", &wrapped)
            .ok_or_else(|| Error::Invalid("wrong passphrase".into()))?;
        if both.len() != 64 {
            return Err(bad());
        }
        Ok(Keys {
            seal: both[..32].try_into().unwrap(),
            ids: both[32..].try_into().unwrap(),
        })
    }
}

fn derive(passphrase: &[u8], salt: &[u8], memory_kib: u32, passes: u32, lanes: u32) -> [u8; 32] {
    let params =
        argon2::Params::new(memory_kib, passes, lanes, Some(32)).expect("valid Argon2 parameters");
    let mut out = [0u8; 32];
    Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
        .hash_password_into(passphrase, salt, &mut out)
        .expect("Argon2id derives a key");
    out
}

fn seal_with(key: &[u8; 32], aad: &[u8], plain: &[u8]) -> Vec<u8> {
    let nonce: [u8; NONCE] = random();
    let cipher = XChaCha20Poly1305::new(key.into());
    let sealed = cipher
        .encrypt(XNonce::from_slice(&nonce), Payload { msg: plain, aad })
        .expect("encryption cannot fail");
    let mut out = Vec::with_capacity(NONCE + sealed.len());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&sealed);
    out
}

fn open_with(key: &[u8; 32], aad: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
    if sealed.len() < NONCE + TAG {
        return None;
    }
    let (nonce, body) = sealed.split_at(NONCE);
    XChaCha20Poly1305::new(key.into())
        .decrypt(XNonce::from_slice(nonce), Payload { msg: body, aad })
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_objects_open_only_with_their_key_and_aad_and_the_passphrase_unwraps() {
        let keys = Keys::generate();
        let sealed = keys.seal(b"chunk", b"secret");
        assert_eq!(keys.open("k", b"chunk", &sealed).unwrap(), b"secret");
        assert!(keys.open("k", b"index", &sealed).is_err());
        assert!(Keys::generate().open("k", b"chunk", &sealed).is_err());
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 1;
            assert!(keys.open("k", b"chunk", &bad).is_err(), "flip at {i}");
        }
        let file = keys.wrap(b"correct horse");
        let back = file.unwrap(b"correct horse").unwrap();
        assert_eq!(back.chunk_id(b"x"), keys.chunk_id(b"x"));
        assert_ne!(keys.chunk_id(b"x"), *blake3::hash(b"x").as_bytes());
        let wrong = file.unwrap(b"battery staple").unwrap_err();
        assert_eq!(wrong.to_string(), "wrong passphrase");
    }
}
