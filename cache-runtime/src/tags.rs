//! Tags: invalidate every entry computed under a tag in O(1), whatever their number.
//!
//! The scheme is a *version per tag*, checked on read (the one Symfony's `TagAwareAdapter`
//! uses), made safe under eviction and across processes:
//!
//! * every tag has a current version, a random token under its own key
//!   (`__cr:tag:{<namespace>:<tag>}` on Redis). Reading a tag's version creates one if it has
//!   none (`SET .. NX GET`), so a version is never "absent": an evicted or expired tag key
//!   gets a new version, which no entry recorded, so its entries read as misses, never as
//!   stale values;
//! * a tagged entry records, in its envelope, the version of each of its tags read *before*
//!   its value was computed (the read of the versions is issued with the value read, so a hit
//!   costs no extra round trip on one Redis);
//! * a hit is served only if every tag the entry records still has the recorded version;
//! * `invalidate_tag` replaces the tag's version (`SET .. XX KEEPTTL`): one command per tag,
//!   whatever the number of entries; no member list exists, so none can leak or be walked;
//! * a tag key lives as long as its longest-lived entry: a fill or a put extends its TTL to the
//!   entry's (`PEXPIRE .. GT`), and nothing else keeps it alive.
//!
//! A load that read a tag's version before an invalidation of the tag records the old version:
//! its entry may be stored, but it is never served, in any process. Its in-process followers
//! are told to retry when the version changed during the load (checked with the fill).

use bytes::Bytes;

use crate::key::KeyWriter;

/// The tags of one entry: full names (namespace included), and their versions once read.
#[derive(Debug, Default, Clone)]
pub(crate) struct TagSet {
    pub(crate) names: Vec<String>,
    /// Parallel to `names` once read; empty before.
    pub(crate) versions: Vec<Bytes>,
}

impl TagSet {
    #[cfg(test)]
    pub(crate) fn with_versions(names: Vec<String>, versions: Vec<Bytes>) -> Self {
        TagSet { names, versions }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    pub(crate) fn names(&self) -> Vec<&str> {
        self.names.iter().map(String::as_str).collect()
    }

    /// Whether the versions were read (and so may be recorded and compared).
    pub(crate) fn has_versions(&self) -> bool {
        self.versions.len() == self.names.len()
    }

    /// The version read for `name`, if `name` is one of these tags and versions were read.
    pub(crate) fn version_of(&self, name: &[u8]) -> Option<&Bytes> {
        if !self.has_versions() {
            return None;
        }
        self.names
            .iter()
            .position(|n| n.as_bytes() == name)
            .map(|i| &self.versions[i])
    }
}

/// The rendered tags of one call. Not public API: the attributes' expansions build it.
#[doc(hidden)]
#[derive(Debug, Default)]
pub struct Tags {
    pub(crate) names: Vec<String>,
    /// A tag's argument could not be rendered.
    pub(crate) failed: bool,
}

impl Tags {
    /// No tags yet.
    pub fn new() -> Self {
        Tags::default()
    }

    /// Adds a rendered tag (a key writer started with the cache's namespace).
    pub fn push(&mut self, tag: KeyWriter) {
        match tag.finish_tag() {
            Some(name) => {
                if !self.names.contains(&name) {
                    self.names.push(name);
                }
            }
            None => self.failed = true,
        }
    }

    pub(crate) fn into_set(self) -> TagSet {
        TagSet {
            names: self.names,
            versions: Vec::new(),
        }
    }
}
