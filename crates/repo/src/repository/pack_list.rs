//! Lists of packs kept as bookkeeping objects: `condemned/T-R` (a collection's verdict,
//! [`super::gc`]) and `verified/T-R` (what a verify found sound, [`super::verify`]).
//! Both are `{"time_ns": T, "packs": [...]}`, written once and replaced by writing a new
//! one, and both are read the same way; the pack listing they are checked against is
//! here too.

use serde::Deserialize;
use serde::Serialize;

use super::Repository;
use super::now_ns;
use crate::error::Error;
use crate::error::Result;

/// A list of packs, as of a time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackList {
    /// When the list was made, in nanoseconds since the epoch.
    pub time_ns: u64,
    /// The packs' ids.
    pub packs: Vec<String>,
}

/// Parses a pack list; every id must be 64 hex digits.
pub fn decode_pack_list(key: &str, bytes: &[u8]) -> Result<PackList> {
    let list: PackList =
        serde_json::from_slice(bytes).map_err(|e| Error::damaged(key, e.to_string()))?;
    let hex64 = |p: &String| p.len() == 64 && p.bytes().all(|b| b.is_ascii_hexdigit());
    if !list.packs.iter().all(hex64) {
        return Err(Error::damaged(key, "a pack id that is not 64 hex digits"));
    }
    Ok(list)
}

impl Repository {
    /// The lists under `prefix` (`condemned/`, `verified/`), with their keys; one
    /// deleted since the listing is skipped.
    pub fn pack_lists(&self, prefix: &str) -> Result<Vec<(String, PackList)>> {
        let mut out = Vec::new();
        for key in self.backend.list(prefix)? {
            match self.backend.get(&key, None) {
                Ok(bytes) => out.push((key.clone(), decode_pack_list(&key, &bytes)?)),
                Err(Error::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// Writes a new list of `packs` under `prefix`, dated now.
    pub(crate) fn write_pack_list(&self, prefix: &str, packs: Vec<String>) -> Result<()> {
        let time_ns = now_ns();
        let key = format!(
            "{prefix}{time_ns}-{}",
            crate::hex::hex(&crate::crypto::random::<4>())
        );
        let list = PackList { time_ns, packs };
        self.backend
            .put_if_absent(&key, &serde_json::to_vec(&list).expect("serializes"))?;
        Ok(())
    }

    /// The ids of the packs stored now.
    pub(crate) fn pack_ids(&self) -> Result<Vec<String>> {
        Ok(self
            .backend
            .list("packs/")?
            .into_iter()
            .filter_map(|k| k.rsplit('/').next().map(str::to_string))
            .collect())
    }
}
