//! The blob store: a directory of whole and partial blobs, by hash.
//!
//! ```text
//! <dir>/<hash>        a whole blob, verified, read-only (0444): what apps read
//! <dir>/<hash>.part   a partial blob, its full size (sparse), groups written in place
//! <dir>/<hash>.cvs    its group hashes (32 bytes per 16 KiB group), verified
//! ```
//!
//! A group is written only after it verified ([`Partial::write_group`]), so
//! a partial file never holds a byte that did not. Which groups a partial
//! blob holds is not written down: reopening it ([`BlobStore::resume`])
//! hashes each group of the file against its list, so after a kill -9 every
//! group that reached the file counts and at most the group being written
//! is fetched again; after a power loss, the groups the disk lost are
//! fetched again, never taken as good. Reopening costs one read and hash of
//! the partial file (about 1 GB/s here).
//!
//! A quota bounds the bytes the store holds; a blob that does not fit is
//! refused before anything is written, with what it needs.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::tree::{Cvs, GROUP, Mismatch, group_cv, group_range, groups};
use crate::wire::{Answer, Request};

/// A blob's name: the BLAKE3 hash of its bytes.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Hash(pub [u8; 32]);

impl Hash {
    /// The hash of some bytes.
    pub fn of(data: &[u8]) -> Hash {
        Hash(*blake3::hash(data).as_bytes())
    }

    /// Parses 64 hex digits.
    pub fn parse(text: &str) -> Result<Hash, Error> {
        let bad = || Error::BadHash(text.chars().take(80).collect());
        if text.len() != 64 {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (i, pair) in text.as_bytes().chunks(2).enumerate() {
            let s = std::str::from_utf8(pair).map_err(|_| bad())?;
            out[i] = u8::from_str_radix(s, 16).map_err(|_| bad())?;
        }
        Ok(Hash(out))
    }

    /// The first 12 hex digits, for people.
    pub fn short(&self) -> String {
        self.to_string()[..12].to_string()
    }
}

impl std::fmt::Display for Hash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for Hash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Hash({})", self.short())
    }
}

/// What went wrong, naming the blob or file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Bytes that do not verify.
    #[error("blob {hash}: {mismatch}")]
    Mismatch {
        /// The blob.
        hash: String,
        /// What did not match.
        mismatch: Mismatch,
    },
    /// A file that is not the blob it was meant to be.
    #[error(
        "{path} is not the expected blob: expected {expected} ({expected_size} bytes), the file hashes to {got} ({got_size} bytes)"
    )]
    WrongFile {
        /// The file.
        path: PathBuf,
        /// The hash expected.
        expected: String,
        /// Its size.
        expected_size: u64,
        /// The file's hash.
        got: String,
        /// The file's size.
        got_size: u64,
    },
    /// The quota would be exceeded.
    #[error(
        "blob {hash} needs {need} bytes: the blob store's quota is {quota} bytes and {used} are in use"
    )]
    Quota {
        /// The blob.
        hash: String,
        /// Its size.
        need: u64,
        /// The quota.
        quota: u64,
        /// Bytes held now.
        used: u64,
    },
    /// Not held here.
    #[error("blob {0} is not held here")]
    NotHeld(String),
    /// Not a hash.
    #[error("not a blob hash (64 hex digits): {0:?}")]
    BadHash(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What the store holds of one blob.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Held {
    /// Size of the whole blob.
    pub size: u64,
    /// Bytes held (verified).
    pub bytes: u64,
    /// Whole and verified.
    pub complete: bool,
}

/// A directory of blobs.
#[derive(Debug)]
pub struct BlobStore {
    dir: PathBuf,
    quota: Option<u64>,
}

impl BlobStore {
    /// Opens (creating) the store in `dir`; `quota`: most bytes held.
    pub fn open(dir: &Path, quota: Option<u64>) -> Result<BlobStore, Error> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        Ok(BlobStore {
            dir: dir.to_path_buf(),
            quota,
        })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where a whole blob is (whether or not it is there).
    pub fn path(&self, hash: &Hash) -> PathBuf {
        self.dir.join(hash.to_string())
    }

    fn part(&self, hash: &Hash) -> PathBuf {
        self.dir.join(format!("{hash}.part"))
    }

    fn cvs_path(&self, hash: &Hash) -> PathBuf {
        self.dir.join(format!("{hash}.cvs"))
    }

    /// Bytes the blobs take (whole blobs, and partial ones at full size:
    /// that is what they will take).
    pub fn used(&self) -> Result<u64, Error> {
        Ok(self.list()?.values().map(|h| h.size).sum())
    }

    /// Every blob held, whole or partial (partial ones as their size; what
    /// they hold is [`BlobStore::resume`]'s to find out).
    pub fn list(&self) -> Result<BTreeMap<Hash, Held>, Error> {
        let mut out = BTreeMap::new();
        let entries = std::fs::read_dir(&self.dir).map_err(io(&self.dir))?;
        for e in entries {
            let e = e.map_err(io(&self.dir))?;
            let name = e.file_name();
            let Some(name) = name.to_str() else { continue };
            let (stem, complete) = match name.strip_suffix(".part") {
                Some(s) => (s, false),
                None => (name, true),
            };
            let Ok(hash) = Hash::parse(stem) else {
                continue;
            };
            let size = e.metadata().map_err(io(&e.path()))?.len();
            out.insert(
                hash,
                Held {
                    size,
                    bytes: if complete { size } else { 0 },
                    complete,
                },
            );
        }
        Ok(out)
    }

    /// Whether the whole blob is here.
    pub fn has(&self, hash: &Hash) -> bool {
        self.path(hash).is_file()
    }

    fn check_quota(&self, hash: &Hash, size: u64) -> Result<(), Error> {
        if let Some(quota) = self.quota {
            let used = self.used()?;
            if used.saturating_add(size) > quota {
                return Err(Error::Quota {
                    hash: hash.to_string(),
                    need: size,
                    quota,
                    used,
                });
            }
        }
        Ok(())
    }

    /// Adds a file from outside (an operator's `artifact push`, a USB
    /// stick): hashed while it is copied in, group by group; `expected`
    /// (hash and size) refuses any other file. Returns its hash and size.
    pub fn add_file(
        &self,
        path: &Path,
        expected: Option<(Hash, u64)>,
    ) -> Result<(Hash, u64), Error> {
        let mut src = File::open(path).map_err(io(path))?;
        let size = src.metadata().map_err(io(path))?.len();
        self.add_reader(&mut src, path, size, expected)
    }

    /// Adds `size` bytes read from `src` (named `path` in errors; an upload
    /// streamed from the network), hashing while it copies: as
    /// [`BlobStore::add_file`].
    pub fn add_reader(
        &self,
        src: &mut dyn Read,
        path: &Path,
        size: u64,
        expected: Option<(Hash, u64)>,
    ) -> Result<(Hash, u64), Error> {
        if let Some((h, want)) = expected
            && want != size
        {
            return Err(Error::WrongFile {
                path: path.to_path_buf(),
                expected: h.to_string(),
                expected_size: want,
                got: "(not hashed: the size differs)".into(),
                got_size: size,
            });
        }
        static ADDING: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let tmp = self.dir.join(format!(
            ".adding-{}-{}",
            std::process::id(),
            ADDING.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let mut out = File::create(&tmp).map_err(io(&tmp))?;
        let mut whole = blake3::Hasher::new();
        let mut cvs = Vec::new();
        let mut buf = vec![0u8; GROUP as usize];
        let n = groups(size);
        for i in 0..n {
            let r = group_range(size, i);
            let len = (r.end - r.start) as usize;
            src.read_exact(&mut buf[..len]).map_err(io(path))?;
            whole.update(&buf[..len]);
            if n > 1 {
                cvs.push(group_cv(i, &buf[..len]));
            }
            out.write_all(&buf[..len]).map_err(io(&tmp))?;
        }
        let hash = Hash(*whole.finalize().as_bytes());
        let result = (|| {
            if let Some((h, want)) = expected
                && h != hash
            {
                return Err(Error::WrongFile {
                    path: path.to_path_buf(),
                    expected: h.to_string(),
                    expected_size: want,
                    got: hash.to_string(),
                    got_size: size,
                });
            }
            if self.has(&hash) {
                return Ok(());
            }
            self.check_quota(&hash, size)?;
            out.sync_all().map_err(io(&tmp))?;
            let list = Cvs::verify(hash.0, size, cvs).map_err(|m| Error::Mismatch {
                hash: hash.to_string(),
                mismatch: m,
            })?;
            self.write_cvs(&list)?;
            self.publish(&tmp, &hash)
        })();
        let _ = std::fs::remove_file(&tmp);
        result.map(|()| (hash, size))
    }

    /// The group hashes of a blob held here (whole or partial).
    pub fn cvs(&self, hash: &Hash, size: u64) -> Result<Option<Cvs>, Error> {
        let path = self.cvs_path(hash);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // A one-group blob has no list.
                if groups(size) == 1 && (self.has(hash) || self.part(hash).exists()) {
                    return Cvs::verify(hash.0, size, Vec::new())
                        .map(Some)
                        .map_err(|m| Error::Mismatch {
                            hash: hash.to_string(),
                            mismatch: m,
                        });
                }
                return Ok(None);
            }
            Err(e) => return Err(io(&path)(e)),
        };
        let values = bytes
            .chunks_exact(32)
            .map(|c| {
                let mut v = [0u8; 32];
                v.copy_from_slice(c);
                v
            })
            .collect();
        // Checked again: a damaged file must not vouch for bad groups.
        Cvs::verify(hash.0, size, values)
            .map(Some)
            .map_err(|m| Error::Mismatch {
                hash: hash.to_string(),
                mismatch: m,
            })
    }

    fn write_cvs(&self, cvs: &Cvs) -> Result<(), Error> {
        if cvs.values().is_empty() {
            return Ok(());
        }
        let hash = Hash(cvs.hash());
        let path = self.cvs_path(&hash);
        let tmp = path.with_extension("cvs.tmp");
        let mut f = File::create(&tmp).map_err(io(&tmp))?;
        for v in cvs.values() {
            f.write_all(v).map_err(io(&tmp))?;
        }
        f.sync_all().map_err(io(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io(&path))
    }

    /// Makes a verified file the whole blob: read-only, renamed in place.
    fn publish(&self, from: &Path, hash: &Hash) -> Result<(), Error> {
        std::fs::set_permissions(from, std::fs::Permissions::from_mode(0o444)).map_err(io(from))?;
        let to = self.path(hash);
        std::fs::rename(from, &to).map_err(io(&to))?;
        if let Ok(d) = File::open(&self.dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    /// Starts (or reopens) a partial blob whose group hashes verified.
    pub fn begin(&self, cvs: Cvs) -> Result<Partial, Error> {
        let hash = Hash(cvs.hash());
        if let Some(p) = self.resume(&hash, cvs.size())? {
            return Ok(p);
        }
        self.check_quota(&hash, cvs.size())?;
        self.write_cvs(&cvs)?;
        let path = self.part(&hash);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io(&path))?;
        file.set_len(cvs.size()).map_err(io(&path))?;
        let n = cvs.groups();
        Ok(Partial::new(
            hash,
            path,
            file,
            cvs,
            vec![false; n as usize],
            0,
        ))
    }

    /// Reopens a partial blob left by an earlier run: every group of the
    /// file is hashed against the list, and those that match are held.
    /// `None` if no partial blob of `hash` is here.
    pub fn resume(&self, hash: &Hash, size: u64) -> Result<Option<Partial>, Error> {
        let path = self.part(hash);
        if !path.exists() {
            return Ok(None);
        }
        let Some(cvs) = self.cvs(hash, size)? else {
            // A partial file without its list: start over.
            let _ = std::fs::remove_file(&path);
            return Ok(None);
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io(&path))?;
        file.set_len(size).map_err(io(&path))?;
        let n = cvs.groups();
        let mut have = vec![false; n as usize];
        let mut held = 0;
        let mut buf = vec![0u8; GROUP as usize];
        for i in 0..n {
            let r = group_range(size, i);
            let len = (r.end - r.start) as usize;
            file.read_exact_at(&mut buf[..len], r.start)
                .map_err(io(&path))?;
            if cvs.check_group(i, &buf[..len]).is_ok() {
                have[i as usize] = true;
                held += len as u64;
            }
        }
        Ok(Some(Partial::new(*hash, path, file, cvs, have, held)))
    }

    /// Group `index` of a whole blob.
    pub fn read_group(&self, hash: &Hash, size: u64, index: u64) -> Result<Vec<u8>, Error> {
        let path = self.path(hash);
        let f = File::open(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::NotHeld(hash.to_string()),
            _ => io(&path)(e),
        })?;
        let r = group_range(size, index);
        let mut buf = vec![0u8; (r.end - r.start) as usize];
        f.read_exact_at(&mut buf, r.start).map_err(io(&path))?;
        Ok(buf)
    }

    /// Answers a peer's request from what is held here: a whole blob, or
    /// the groups of `partial` (the same blob being fetched here). A blob
    /// not held, of another size, or a group not held yet is refused with
    /// why; the caller has checked that the peer is admitted.
    pub fn answer(&self, req: &Request, partial: Option<&Partial>) -> Answer {
        match self.answer_inner(req, partial) {
            Ok(a) => a,
            Err(e) => Answer::Refused(e.to_string()),
        }
    }

    fn answer_inner(&self, req: &Request, partial: Option<&Partial>) -> Result<Answer, Error> {
        let hash = req.hash();
        let partial = partial.filter(|p| p.hash == hash);
        let (size, whole) = (req.size(), self.path(&hash));
        let whole_size = std::fs::metadata(&whole).ok().map(|m| m.len());
        if let Some(s) = whole_size
            && s != size
        {
            return Err(Error::NotHeld(format!(
                "{hash} of {size} bytes (held: {s} bytes)"
            )));
        }
        if whole_size.is_none() && partial.is_none_or(|p| p.cvs.size() != size) {
            return match req {
                Request::Have { .. } => Ok(Answer::Have(Vec::new())),
                _ => Err(Error::NotHeld(hash.to_string())),
            };
        }
        let n = groups(size);
        match req {
            Request::Have { .. } => Ok(Answer::Have(match partial {
                Some(p) if whole_size.is_none() => crate::fetch::runs_of(&p.have),
                _ => vec![(0, n)],
            })),
            Request::Cvs { from, count, .. } => {
                let (a, b) = (*from as usize, (*from + u64::from(*count)) as usize);
                if let Some(p) = partial {
                    return Ok(Answer::Cvs(
                        p.cvs
                            .values()
                            .get(a..b)
                            .map(<[_]>::to_vec)
                            .unwrap_or_default(),
                    ));
                }
                let path = self.cvs_path(&hash);
                let f = File::open(&path).map_err(io(&path))?;
                let mut buf = vec![0u8; (b - a) * 32];
                f.read_exact_at(&mut buf, (a * 32) as u64)
                    .map_err(io(&path))?;
                Ok(Answer::Cvs(
                    buf.chunks_exact(32)
                        .map(|c| {
                            let mut v = [0u8; 32];
                            v.copy_from_slice(c);
                            v
                        })
                        .collect(),
                ))
            }
            Request::Groups { from, count, .. } => {
                let last = from + u64::from(*count) - 1;
                let range = group_range(size, *from).start..group_range(size, last).end;
                let mut data = vec![0u8; (range.end - range.start) as usize];
                if whole_size.is_some() {
                    let f = File::open(&whole).map_err(io(&whole))?;
                    f.read_exact_at(&mut data, range.start)
                        .map_err(io(&whole))?;
                } else if let Some(p) = partial {
                    if let Some(g) = (*from..=last).find(|g| !p.has(*g)) {
                        return Err(Error::NotHeld(format!("group {g} of {hash} (not yet)")));
                    }
                    p.file
                        .read_exact_at(&mut data, range.start)
                        .map_err(io(&p.path))?;
                }
                Ok(Answer::Groups {
                    from: *from,
                    count: *count,
                    data,
                })
            }
        }
    }

    /// When blob `hash` (whole or partial) was last written here.
    pub fn modified(&self, hash: &Hash) -> Option<std::time::SystemTime> {
        [self.path(hash), self.part(hash)]
            .iter()
            .filter_map(|p| std::fs::metadata(p).ok()?.modified().ok())
            .max()
    }

    /// Removes every blob, whole or partial, that `keep` does not name.
    /// Returns the bytes freed.
    pub fn collect(&self, keep: &dyn Fn(&Hash) -> bool) -> Result<u64, Error> {
        let mut freed = 0;
        for (hash, held) in self.list()? {
            if keep(&hash) {
                continue;
            }
            for p in [self.path(&hash), self.part(&hash), self.cvs_path(&hash)] {
                match std::fs::remove_file(&p) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io(&p)(e)),
                }
            }
            freed += held.size;
        }
        Ok(freed)
    }
}

/// A blob being received: its verified group hashes, the partial file, the
/// groups it holds.
#[derive(Debug)]
pub struct Partial {
    hash: Hash,
    path: PathBuf,
    file: File,
    cvs: Cvs,
    have: Vec<bool>,
    held: u64,
    /// Bytes written since the flusher was last nudged.
    unflushed: u64,
    /// Nudges the thread that writes the file back to disk while groups
    /// keep coming ([`FLUSH_EVERY`]); started at the first nudge, `None`
    /// before that or if it could not start.
    flusher: Option<std::sync::mpsc::SyncSender<()>>,
}

/// Bytes written to a partial blob between two nudges of its flusher.
///
/// The flusher syncs the file's data on a thread of its own while the
/// transfer goes on, so the final sync of [`Partial::finish`] has at most
/// about this much left to write instead of the whole blob (for 512 MiB
/// on this machine's disk, 0.33 s of a 3 s transfer), and the dirty pages
/// of a large artifact are bounded by how fast the disk takes them rather
/// than piling up in memory.
pub const FLUSH_EVERY: u64 = 8 << 20;

/// Lets the kernel drop the pages of `f` that are on disk now (those
/// written since are dirty and stay). A large blob then streams through a
/// few flushes' worth of page cache instead of filling it, evicting what
/// the node's apps had cached, and the groups written next go into pages
/// just freed rather than fresh ones: on the benchmark machine, a VM whose
/// host takes freed memory back, writing into fresh pages cost up to nine
/// times the copy itself. The app and the neighbours served read the blob
/// from disk instead.
#[cfg(target_os = "linux")]
fn drop_cached(f: &File) {
    let _ = rustix::fs::fadvise(f, 0, None, rustix::fs::Advice::DontNeed);
}

#[cfg(not(target_os = "linux"))]
fn drop_cached(_f: &File) {}

impl Partial {
    fn new(hash: Hash, path: PathBuf, file: File, cvs: Cvs, have: Vec<bool>, held: u64) -> Self {
        Partial {
            hash,
            path,
            file,
            cvs,
            have,
            held,
            unflushed: 0,
            flusher: None,
        }
    }

    /// Asks the flusher to sync what was written, starting it the first
    /// time (a blob under [`FLUSH_EVERY`] never needs one).
    fn nudge_flusher(&mut self) {
        if self.flusher.is_none() {
            self.flusher = self.file.try_clone().ok().and_then(|f| {
                // One nudge waits at most: a flush in progress covers what
                // was written before it started, the waiting nudge what
                // came after.
                let (tx, rx) = std::sync::mpsc::sync_channel::<()>(1);
                std::thread::Builder::new()
                    .name("blob-flush".into())
                    .spawn(move || {
                        while rx.recv().is_ok() {
                            // An error here is found again, and reported,
                            // by the sync of `finish`.
                            if f.sync_data().is_ok() {
                                drop_cached(&f);
                            }
                        }
                    })
                    .ok()
                    .map(|_| tx)
            });
        }
        if let Some(f) = &self.flusher {
            // Full: a flush is running and another is queued; these bytes
            // go with the queued one.
            let _ = f.try_send(());
        }
    }

    /// The blob.
    pub fn hash(&self) -> Hash {
        self.hash
    }

    /// Its group hashes.
    pub fn cvs(&self) -> &Cvs {
        &self.cvs
    }

    /// Whether group `index` is held.
    pub fn has(&self, index: u64) -> bool {
        self.have.get(index as usize).copied().unwrap_or(false)
    }

    /// The groups not held yet, in order.
    pub fn missing(&self) -> impl Iterator<Item = u64> + '_ {
        self.have
            .iter()
            .enumerate()
            .filter(|(_, h)| !**h)
            .map(|(i, _)| i as u64)
    }

    /// Verified bytes held.
    pub fn held(&self) -> u64 {
        self.held
    }

    /// Every group held.
    pub fn is_complete(&self) -> bool {
        self.have.iter().all(|h| *h)
    }

    /// Checks group `index` and writes it; bytes that do not verify are
    /// refused and nothing is written.
    pub fn write_group(&mut self, index: u64, data: &[u8]) -> Result<(), Error> {
        self.cvs
            .check_group(index, data)
            .map_err(|m| Error::Mismatch {
                hash: self.hash.to_string(),
                mismatch: m,
            })?;
        if self.has(index) {
            return Ok(());
        }
        let at = index * GROUP;
        self.file.write_all_at(data, at).map_err(io(&self.path))?;
        self.have[index as usize] = true;
        self.held += data.len() as u64;
        self.unflushed += data.len() as u64;
        if self.unflushed >= FLUSH_EVERY {
            self.nudge_flusher();
            self.unflushed = 0;
        }
        Ok(())
    }

    /// Group `index`, if held (a partial blob serves what it holds).
    pub fn read_group(&self, index: u64) -> Result<Option<Vec<u8>>, Error> {
        if !self.has(index) {
            return Ok(None);
        }
        let r = group_range(self.cvs.size(), index);
        let mut buf = vec![0u8; (r.end - r.start) as usize];
        self.file
            .read_exact_at(&mut buf, r.start)
            .map_err(io(&self.path))?;
        Ok(Some(buf))
    }

    /// Makes the whole blob available once every group is held: synced,
    /// read-only, in place. Returns its path.
    pub fn finish(self, store: &BlobStore) -> Result<PathBuf, Error> {
        if !self.is_complete() {
            let missing = self.missing().count();
            return Err(Error::NotHeld(format!(
                "{} ({missing} groups still missing)",
                self.hash
            )));
        }
        self.file.sync_all().map_err(io(&self.path))?;
        store.publish(&self.path, &self.hash)?;
        Ok(store.path(&self.hash))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_bytes as bytes;

    fn groups_of(data: &[u8]) -> Vec<&[u8]> {
        data.chunks(GROUP as usize).collect()
    }

    /// Bytes of `path` in the page cache, as util-linux's `fincore` sees
    /// them.
    fn resident(path: &Path) -> u64 {
        let out = std::process::Command::new("fincore")
            .args(["-b", "-n", "-o", "RES"])
            .arg(path)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        out.parse().unwrap_or(u64::MAX)
    }

    /// A large blob streams through the page cache: what the flusher
    /// synced is dropped from it, so a partial file written to 40 MiB
    /// keeps about the last flush's worth resident, not all of it.
    #[cfg(target_os = "linux")]
    #[test]
    fn synced_groups_leave_the_page_cache() -> Result<(), Error> {
        let dir = tempfile::tempdir().map_err(io(Path::new("tmp")))?;
        let store = BlobStore::open(dir.path(), None)?;
        let data = bytes(40 << 20, 3);
        let cvs = Cvs::of(&data);
        let mut p = store.begin(cvs)?;
        for (i, g) in groups_of(&data).into_iter().enumerate() {
            p.write_group(i as u64, g)?;
        }
        // The flusher runs on a thread of its own: wait for its last
        // flush (nudged at 40 MiB) to have dropped what it synced.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let mut res = resident(&p.path);
        while res > 2 * FLUSH_EVERY && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(50));
            res = resident(&p.path);
        }
        assert!(
            res <= 2 * FLUSH_EVERY,
            "{res} bytes of a 40 MiB partial blob still in the page cache"
        );
        Ok(())
    }

    #[test]
    fn a_blob_arrives_group_by_group_in_any_order_and_is_published_whole() -> Result<(), Error> {
        let dir = tempfile::tempdir().map_err(io(Path::new("tmp")))?;
        let store = BlobStore::open(dir.path(), None)?;
        let data = bytes(7 * GROUP as usize + 1000, 1);
        let cvs = Cvs::of(&data);
        let hash = Hash(cvs.hash());
        let mut p = store.begin(cvs)?;
        let gs = groups_of(&data);
        for i in [5usize, 0, 7, 3, 1, 6, 2, 4] {
            p.write_group(i as u64, gs[i])?;
        }
        assert!(p.is_complete());
        let path = p.finish(&store)?;
        assert_eq!(std::fs::read(&path).map_err(io(&path))?, data);
        let mode = std::fs::metadata(&path)
            .map_err(io(&path))?
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o444);
        assert!(store.has(&hash));
        assert_eq!(store.read_group(&hash, data.len() as u64, 7)?, gs[7]);
        // Its list is kept, to serve it to others.
        assert!(store.cvs(&hash, data.len() as u64)?.is_some());
        Ok(())
    }

    #[test]
    fn a_bad_group_is_never_written() -> Result<(), Error> {
        let dir = tempfile::tempdir().map_err(io(Path::new("tmp")))?;
        let store = BlobStore::open(dir.path(), None)?;
        let data = bytes(3 * GROUP as usize, 2);
        let mut p = store.begin(Cvs::of(&data))?;
        let mut bad = groups_of(&data)[1].to_vec();
        bad[9] ^= 1;
        let e = p.write_group(1, &bad).unwrap_err();
        assert!(e.to_string().contains("group 1 does not match"), "{e}");
        assert!(!p.has(1));
        assert_eq!(p.read_group(1)?, None);
        assert!(p.finish(&store).is_err(), "published with a group missing");
        Ok(())
    }

    #[test]
    fn a_restart_keeps_every_group_that_reached_the_file() -> Result<(), Error> {
        let dir = tempfile::tempdir().map_err(io(Path::new("tmp")))?;
        let data = bytes(9 * GROUP as usize + 5, 3);
        let cvs = Cvs::of(&data);
        let hash = Hash(cvs.hash());
        let gs = groups_of(&data);
        {
            let store = BlobStore::open(dir.path(), None)?;
            let mut p = store.begin(cvs.clone())?;
            for i in [0usize, 2, 3, 8] {
                p.write_group(i as u64, gs[i])?;
            }
            // Killed here: nothing else was written down.
        }
        // A torn group (half written when the process died) is not held.
        let part = dir.path().join(format!("{hash}.part"));
        let f = OpenOptions::new()
            .write(true)
            .open(&part)
            .map_err(io(&part))?;
        f.write_all_at(&gs[5][..1000], 5 * GROUP)
            .map_err(io(&part))?;
        let store = BlobStore::open(dir.path(), None)?;
        let p = store
            .resume(&hash, data.len() as u64)?
            .expect("the partial blob");
        assert_eq!(p.missing().collect::<Vec<_>>(), [1, 4, 5, 6, 7, 9]);
        assert_eq!(p.held(), 4 * GROUP);
        // begin() on the same blob resumes too.
        let p = store.begin(cvs)?;
        assert_eq!(p.missing().count(), 6);
        Ok(())
    }

    #[test]
    fn a_file_added_from_outside_is_hashed_and_a_wrong_one_refused() -> Result<(), Error> {
        let dir = tempfile::tempdir().map_err(io(Path::new("tmp")))?;
        let store = BlobStore::open(&dir.path().join("blobs"), None)?;
        let data = bytes(3 * GROUP as usize + 17, 4);
        let src = dir.path().join("model.bin");
        std::fs::write(&src, &data).map_err(io(&src))?;
        let (hash, size) = store.add_file(&src, None)?;
        assert_eq!(hash, Hash::of(&data));
        assert_eq!(size, data.len() as u64);
        assert_eq!(store.cvs(&hash, size)?, Some(Cvs::of(&data)));
        // The USB stick case: a file that is not the artifact named.
        let other = dir.path().join("other.bin");
        let mut wrong = data.clone();
        wrong[100] ^= 1;
        std::fs::write(&other, &wrong).map_err(io(&other))?;
        let e = store.add_file(&other, Some((hash, size))).unwrap_err();
        let text = e.to_string();
        assert!(text.contains(&format!("expected {hash}")), "{text}");
        assert!(text.contains(&Hash::of(&wrong).to_string()), "{text}");
        assert_eq!(store.list()?.len(), 1, "nothing of the wrong file kept");
        Ok(())
    }

    #[test]
    fn the_quota_refuses_a_blob_that_does_not_fit_and_collection_frees_space() -> Result<(), Error>
    {
        let dir = tempfile::tempdir().map_err(io(Path::new("tmp")))?;
        let store = BlobStore::open(dir.path(), Some(5 * GROUP))?;
        let a = bytes(3 * GROUP as usize, 5);
        let b = bytes(3 * GROUP as usize, 6);
        let pa = store.begin(Cvs::of(&a))?;
        drop(pa);
        let e = store.begin(Cvs::of(&b)).unwrap_err();
        assert!(
            matches!(e, Error::Quota { need, used, .. } if need == 3 * GROUP && used == 3 * GROUP),
            "{e}"
        );
        let keep = Hash::of(&b);
        let freed = store.collect(&|h| *h == keep)?;
        assert_eq!(freed, 3 * GROUP);
        assert!(store.begin(Cvs::of(&b)).is_ok());
        Ok(())
    }

    #[test]
    fn peers_are_answered_from_whole_and_partial_blobs() -> Result<(), Error> {
        let dir = tempfile::tempdir().map_err(io(Path::new("tmp")))?;
        let store = BlobStore::open(dir.path(), None)?;
        let data = bytes(5 * GROUP as usize + 9, 8);
        let src = dir.path().join("m");
        std::fs::write(&src, &data).map_err(io(&src))?;
        let (hash, size) = store.add_file(&src, None)?;
        let cvs = Cvs::of(&data);
        let have = Request::Have { hash, size };
        assert_eq!(store.answer(&have, None), Answer::Have(vec![(0, 6)]));
        let req = Request::Cvs {
            hash,
            size,
            from: 2,
            count: 3,
        };
        assert_eq!(
            store.answer(&req, None),
            Answer::Cvs(cvs.values()[2..5].to_vec())
        );
        let req = Request::Groups {
            hash,
            size,
            from: 4,
            count: 2,
        };
        assert_eq!(
            store.answer(&req, None),
            Answer::Groups {
                from: 4,
                count: 2,
                data: data[4 * GROUP as usize..].to_vec()
            }
        );
        // Another size of the same hash: refused, not served.
        let wrong = Request::Groups {
            hash,
            size: size - 1,
            from: 0,
            count: 1,
        };
        assert!(matches!(store.answer(&wrong, None), Answer::Refused(_)));
        // A blob being fetched here serves what it holds, and only that.
        let other = bytes(4 * GROUP as usize, 9);
        let oc = Cvs::of(&other);
        let oh = Hash(oc.hash());
        let osize = other.len() as u64;
        let mut p = store.begin(oc.clone())?;
        p.write_group(1, &other[GROUP as usize..2 * GROUP as usize])?;
        p.write_group(2, &other[2 * GROUP as usize..3 * GROUP as usize])?;
        assert_eq!(
            store.answer(
                &Request::Have {
                    hash: oh,
                    size: osize
                },
                Some(&p)
            ),
            Answer::Have(vec![(1, 2)])
        );
        let g = Request::Groups {
            hash: oh,
            size: osize,
            from: 1,
            count: 2,
        };
        assert!(matches!(store.answer(&g, Some(&p)), Answer::Groups { .. }));
        let g = Request::Groups {
            hash: oh,
            size: osize,
            from: 2,
            count: 2,
        };
        let Answer::Refused(why) = store.answer(&g, Some(&p)) else {
            panic!("served a group it does not hold")
        };
        assert!(why.contains("group 3"), "{why}");
        // Nothing held: an empty have, a refusal for the rest.
        let none = Hash::of(b"nothing");
        assert_eq!(
            store.answer(
                &Request::Have {
                    hash: none,
                    size: 9
                },
                None
            ),
            Answer::Have(vec![])
        );
        assert!(matches!(
            store.answer(
                &Request::Cvs {
                    hash: none,
                    size: 2 * GROUP,
                    from: 0,
                    count: 1
                },
                None
            ),
            Answer::Refused(_)
        ));
        Ok(())
    }

    #[test]
    fn hashes_parse_and_print() {
        let h = Hash::of(b"x");
        assert_eq!(Hash::parse(&h.to_string()).ok(), Some(h));
        assert!(Hash::parse("zz").is_err());
        assert!(Hash::parse(&"g".repeat(64)).is_err());
        assert_eq!(h.short().len(), 12);
    }
}
