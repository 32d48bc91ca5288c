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
    /// The epoch of these tags in this process when their versions were read (see
    /// `Store::tag_epoch`).
    pub(crate) epoch: u64,
}

impl TagSet {
    #[cfg(test)]
    pub(crate) fn with_versions(names: Vec<String>, versions: Vec<Bytes>) -> Self {
        TagSet {
            names,
            versions,
            epoch: 0,
        }
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
            epoch: 0,
        }
    }
}

/// Per-tag invalidation counters of one store, striped: bumped before and after every tag
/// invalidation through the store. A tagged load compares the sum over its tags' stripes at
/// its version read with the sum when it hands its value to the callers that joined it: if a
/// tag of its stripes was invalidated in between, they read again. Counters only grow, so an
/// unchanged sum means no change. Striped by tag, so that invalidating one tag does not
/// disturb the loads of unrelated tags (rarely, a tag that shares a stripe).
pub(crate) struct TagEpochs {
    stripes: [std::sync::atomic::AtomicU64; 64],
}

impl TagEpochs {
    pub(crate) fn new() -> Self {
        TagEpochs {
            stripes: std::array::from_fn(|_| std::sync::atomic::AtomicU64::new(0)),
        }
    }

    fn stripe(&self, tag: &str) -> &std::sync::atomic::AtomicU64 {
        use std::hash::BuildHasher;
        let h = foldhash::fast::FixedState::default().hash_one(tag);
        &self.stripes[(h % 64) as usize]
    }

    /// Marks `tags` as being (or having been) invalidated.
    pub(crate) fn bump<S: AsRef<str>>(&self, tags: &[S]) {
        for tag in tags {
            self.stripe(tag.as_ref())
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// The epoch of `tags`: changes whenever one of them is invalidated.
    pub(crate) fn of<S: AsRef<str>>(&self, tags: &[S]) -> u64 {
        tags.iter().fold(0u64, |sum, tag| {
            sum.wrapping_add(
                self.stripe(tag.as_ref())
                    .load(std::sync::atomic::Ordering::SeqCst),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_epoch_moves_with_its_tags_only() {
        let epochs = TagEpochs::new();
        let mine = ["ns:org:1", "ns:users"];
        let before = epochs.of(&mine);
        // Some other tag, in another stripe.
        let other = (0..1000)
            .map(|i| format!("ns:other:{i}"))
            .find(|t| {
                mine.iter()
                    .all(|m| !std::ptr::eq(epochs.stripe(m), epochs.stripe(t)))
            })
            .unwrap();
        epochs.bump(&[other.as_str()]);
        assert_eq!(epochs.of(&mine), before, "an unrelated tag");
        epochs.bump(&["ns:users"]);
        assert_ne!(epochs.of(&mine), before, "one of the call's tags");
    }
}
