//! BLAKE3's tree, cut at 16 KiB groups.
//!
//! A blob is named by the plain BLAKE3 hash of its bytes. BLAKE3 hashes
//! 1 KiB chunks into a binary tree whose left subtree always holds the
//! largest power of two of chunks below the whole; a group of 16 chunks
//! (16 KiB) starting at a multiple of 16 KiB is therefore always one
//! subtree of that tree, and its chaining value ([`group_cv`]) can be
//! computed from the group's bytes and its index alone. The list of every
//! group's chaining value ([`Cvs`]) merges back into the root: a receiver
//! that gets the list from anyone checks it against the hash the signed
//! document names ([`Cvs::verify`]), and from then on checks each group on
//! its own, in any order and from any peer, before it writes it
//! ([`Cvs::check_group`]). A corrupt byte is caught within its group.
//!
//! The list costs 32 bytes per 16 KiB (0.2 %: 4 MiB for a 2 GiB model);
//! merging 131,072 values to the root takes about 12 ms. A blob of one
//! group (16 KiB or less) has no list: it is checked whole against the hash.

use blake3::hazmat::{
    ChainingValue, HasherExt, Mode, merge_subtrees_non_root, merge_subtrees_root,
};

/// Bytes in a group (16 BLAKE3 chunks).
pub const GROUP: u64 = 16 * 1024;

/// How many groups a blob of `size` bytes has (an empty blob has one, empty).
pub fn groups(size: u64) -> u64 {
    size.div_ceil(GROUP).max(1)
}

/// The byte range of group `index` in a blob of `size` bytes.
pub fn group_range(size: u64, index: u64) -> std::ops::Range<u64> {
    let start = index.saturating_mul(GROUP).min(size);
    start..(start.saturating_add(GROUP)).min(size)
}

/// The chaining value of group `index` holding `data` (a blob of more
/// than one group).
pub fn group_cv(index: u64, data: &[u8]) -> ChainingValue {
    let mut h = blake3::Hasher::new();
    h.set_input_offset(index * GROUP);
    h.update(data);
    h.finalize_non_root()
}

/// Why a group or a list does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Mismatch {
    /// The list of chaining values does not merge to the blob's hash.
    #[error("the group hashes do not add up to the blob's hash")]
    List,
    /// A list of the wrong length for the blob's size.
    #[error("{got} group hashes for a blob of {want} groups")]
    Length {
        /// Received.
        got: u64,
        /// Expected.
        want: u64,
    },
    /// A group's bytes do not hash to its chaining value.
    #[error("group {0} does not match its hash")]
    Group(u64),
    /// A group of the wrong length.
    #[error("group {index} is {got} bytes, expected {want}")]
    GroupLength {
        /// Which.
        index: u64,
        /// Received.
        got: u64,
        /// Expected.
        want: u64,
    },
    /// No such group.
    #[error("group {0} is past the end of the blob")]
    OutOfRange(u64),
}

/// Every group's chaining value of one blob, verified against its hash
/// (or, for a one-group blob, just the hash).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cvs {
    hash: [u8; 32],
    size: u64,
    cvs: Vec<ChainingValue>,
}

impl Cvs {
    /// The list of a whole blob in memory.
    pub fn of(data: &[u8]) -> Cvs {
        let size = data.len() as u64;
        let cvs = if groups(size) == 1 {
            Vec::new()
        } else {
            data.chunks(GROUP as usize)
                .enumerate()
                .map(|(i, g)| group_cv(i as u64, g))
                .collect()
        };
        Cvs {
            hash: *blake3::hash(data).as_bytes(),
            size,
            cvs,
        }
    }

    /// Checks a received list (32 bytes per group; empty for a one-group
    /// blob) against the blob's `hash` and `size`.
    pub fn verify(hash: [u8; 32], size: u64, cvs: Vec<ChainingValue>) -> Result<Cvs, Mismatch> {
        let n = groups(size);
        if n == 1 {
            if !cvs.is_empty() {
                return Err(Mismatch::Length {
                    got: cvs.len() as u64,
                    want: 0,
                });
            }
            return Ok(Cvs { hash, size, cvs });
        }
        if cvs.len() as u64 != n {
            return Err(Mismatch::Length {
                got: cvs.len() as u64,
                want: n,
            });
        }
        if root(&cvs).as_bytes() != &hash {
            return Err(Mismatch::List);
        }
        Ok(Cvs { hash, size, cvs })
    }

    /// The blob's hash.
    pub fn hash(&self) -> [u8; 32] {
        self.hash
    }

    /// The blob's size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// How many groups.
    pub fn groups(&self) -> u64 {
        groups(self.size)
    }

    /// The chaining values (empty for a one-group blob).
    pub fn values(&self) -> &[ChainingValue] {
        &self.cvs
    }

    /// Checks group `index`'s bytes before they are written.
    pub fn check_group(&self, index: u64, data: &[u8]) -> Result<(), Mismatch> {
        let n = self.groups();
        if index >= n {
            return Err(Mismatch::OutOfRange(index));
        }
        let want = group_range(self.size, index);
        let want = want.end - want.start;
        if data.len() as u64 != want {
            return Err(Mismatch::GroupLength {
                index,
                got: data.len() as u64,
                want,
            });
        }
        let ok = if n == 1 {
            blake3::hash(data).as_bytes() == &self.hash
        } else {
            self.cvs.get(index as usize) == Some(&group_cv(index, data))
        };
        if ok {
            Ok(())
        } else {
            Err(Mismatch::Group(index))
        }
    }
}

/// The root hash of two or more groups' chaining values.
fn root(cvs: &[ChainingValue]) -> blake3::Hash {
    let split = left_len(cvs.len());
    merge_subtrees_root(&subtree(&cvs[..split]), &subtree(&cvs[split..]), Mode::Hash)
}

/// The chaining value of a (non-root) subtree of groups.
fn subtree(cvs: &[ChainingValue]) -> ChainingValue {
    if cvs.len() == 1 {
        return cvs[0];
    }
    let split = left_len(cvs.len());
    merge_subtrees_non_root(&subtree(&cvs[..split]), &subtree(&cvs[split..]), Mode::Hash)
}

/// Groups in the left subtree of `n` groups: the largest power of two
/// below `n` (BLAKE3's rule, in whole groups, since a group is a power of
/// two of chunks).
fn left_len(n: usize) -> usize {
    debug_assert!(n >= 2);
    1 << (usize::BITS - 1 - (n - 1).leading_zeros())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_bytes as bytes;
    use proptest::prelude::*;

    #[test]
    fn the_groups_merge_to_blake3_of_the_whole() {
        let g = GROUP as usize;
        for len in [
            0,
            1,
            1024,
            g - 1,
            g,
            g + 1,
            2 * g,
            3 * g + 7,
            5 * g,
            8 * g,
            9 * g - 1,
            1 << 20,
            (1 << 20) + 12345,
        ] {
            let data = bytes(len, 7);
            let cvs = Cvs::of(&data);
            assert_eq!(cvs.hash(), *blake3::hash(&data).as_bytes(), "len {len}");
            let again = Cvs::verify(cvs.hash(), len as u64, cvs.values().to_vec());
            assert_eq!(again.as_ref(), Ok(&cvs), "len {len}");
            for (i, chunk) in data.chunks(g).enumerate() {
                assert_eq!(
                    cvs.check_group(i as u64, chunk),
                    Ok(()),
                    "len {len} group {i}"
                );
            }
        }
    }

    #[test]
    fn a_flipped_bit_is_caught_in_its_group() {
        let data = bytes(10 * GROUP as usize + 99, 1);
        let cvs = Cvs::of(&data);
        let mut bad = data[3 * GROUP as usize..4 * GROUP as usize].to_vec();
        bad[500] ^= 0x10;
        assert_eq!(cvs.check_group(3, &bad), Err(Mismatch::Group(3)));
        // The same bytes as another group's are not that group.
        let g2 = &data[2 * GROUP as usize..3 * GROUP as usize];
        assert_eq!(cvs.check_group(3, g2), Err(Mismatch::Group(3)));
        assert_eq!(cvs.check_group(11, g2), Err(Mismatch::OutOfRange(11)));
        assert!(matches!(
            cvs.check_group(10, g2),
            Err(Mismatch::GroupLength { index: 10, .. })
        ));
        // A small blob is checked whole against its hash.
        let small = Cvs::of(b"model");
        assert_eq!(small.check_group(0, b"model"), Ok(()));
        assert_eq!(small.check_group(0, b"modem"), Err(Mismatch::Group(0)));
    }

    #[test]
    fn a_forged_list_is_refused() {
        let data = bytes(4 * GROUP as usize, 3);
        let cvs = Cvs::of(&data);
        let mut forged = cvs.values().to_vec();
        forged[1][0] ^= 1;
        assert_eq!(
            Cvs::verify(cvs.hash(), cvs.size(), forged),
            Err(Mismatch::List)
        );
        let short = cvs.values()[..3].to_vec();
        assert_eq!(
            Cvs::verify(cvs.hash(), cvs.size(), short),
            Err(Mismatch::Length { got: 3, want: 4 })
        );
        // The right list for another size.
        assert!(Cvs::verify(cvs.hash(), cvs.size() + 1, cvs.values().to_vec()).is_err());
    }

    proptest! {
        #[test]
        fn any_length_agrees_with_blake3(len in 0usize..(300 * 1024), seed: u64) {
            let data = bytes(len, seed);
            let cvs = Cvs::of(&data);
            prop_assert_eq!(cvs.hash(), *blake3::hash(&data).as_bytes());
            prop_assert!(Cvs::verify(cvs.hash(), len as u64, cvs.values().to_vec()).is_ok());
        }
    }
}
