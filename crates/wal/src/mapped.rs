//! Writes into the active segment through a shared memory map of the file, instead of one
//! `pwrite` per flush.
//!
//! A `pwrite` of a small record pays for a system call, a page lookup and its locking, buffer
//! heads and inode timestamps; copying the same bytes into a shared map of the file pays for none
//! of these once the page is mapped. Both put the bytes in the same page cache, so a
//! record copied into the map survives a crash of the process exactly as a written one does, and
//! `fdatasync` of the file makes it durable (Linux tracks pages dirtied through shared maps).
//!
//! Only space the file already has is mapped: a segment preallocated with zeros up to its
//! capacity. Bytes past the file's length at the time it was first mapped go through `pwrite`,
//! so the file never grows through the map (which would fault with SIGBUS). Only a window of
//! [`WINDOW`] bytes is mapped at a time, so the pages held in the process's address space (and
//! counted in its resident set) stay bounded. A file that cannot be mapped (a filesystem without
//! shared maps, no address space left) is written with `pwrite`, after a warning: the map is a
//! speed-up, never a reason to refuse a write.
//!
//! Invariants:
//! - Nothing maps past the file's length: the length is read once when a `Mapped` first writes,
//!   and `unmap` must be called before the file is shortened (after which the length is read
//!   again on the next write).
//! - The file is not modified by anyone else while it is mapped: the log's directory lock keeps
//!   other processes of timber out, and a file of a locked log is never shortened elsewhere.
#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::path::Path;

use memmap2::{MmapMut, MmapOptions};

/// Bytes mapped at a time (a multiple of the page size).
pub(crate) const WINDOW: u64 = 4 << 20;

/// The shared map of one segment file's preallocated extent.
pub(crate) struct Mapped {
    enabled: bool,
    /// Length of the file when first written through this map; `None` until then.
    extent: Option<u64>,
    /// The window mapped now, and the file offset it starts at.
    window: Option<(u64, MmapMut)>,
    /// Counts `unmap`s (and giving the map up): a window mapped ahead for an earlier count may
    /// reach past the file's end and is never installed.
    generation: u64,
}

/// Where a window mapped ahead of time by another thread goes (`Mapped::plan`).
pub(crate) struct Plan {
    generation: u64,
    start: u64,
    len: usize,
}

/// A window mapped by another thread, without the log's lock, for `Mapped::install`.
pub(crate) struct Premapped {
    generation: u64,
    start: u64,
    map: MmapMut,
}

impl Mapped {
    /// A map that is used only when `enabled` (the file is preallocated).
    pub(crate) fn new(enabled: bool) -> Mapped {
        Mapped { enabled, extent: None, window: None, generation: 0 }
    }

    /// The window that a sync should map ahead for writes from `at` on: two windows' worth from
    /// the window `at` is in, so that it reaches at least a window past `at`. `None` when the map
    /// is not used or `at` is past the extent.
    pub(crate) fn plan(&self, at: u64) -> Option<Plan> {
        let extent = self.extent.filter(|_| self.enabled)?;
        if at >= extent {
            return None;
        }
        let start = at - at % WINDOW;
        let len = (extent - start).min(2 * WINDOW) as usize;
        Some(Plan { generation: self.generation, start, len })
    }

    /// Maps `plan` of `file` (a read-write handle of the segment the plan was made for).
    pub(crate) fn premap(file: &File, plan: Plan) -> io::Result<Premapped> {
        // SAFETY: the plan lies inside the file's extent as it was when the plan was made; the
        // map is only written through after `install` found no `unmap` since (the file is only
        // shortened after one), and no one else modifies the file (module invariants).
        let map = unsafe { MmapOptions::new().offset(plan.start).len(plan.len).map_mut(file) }?;
        Ok(Premapped { generation: plan.generation, start: plan.start, map })
    }

    /// Makes `p` the window if it was planned for this map since its last `unmap` and covers
    /// `at`, the offset of the next write. Returns the map to drop (the window replaced, or `p`
    /// itself), to be dropped outside the log's lock as `release`'s.
    #[must_use = "the returned map is unmapped when dropped"]
    pub(crate) fn install(&mut self, p: Premapped, at: u64) -> Option<MmapMut> {
        if !self.enabled || p.generation != self.generation || !covers(p.start, &p.map, at) {
            return Some(p.map);
        }
        self.window.replace((p.start, p.map)).map(|(_, map)| map)
    }

    /// Copies a prefix of `bytes` to the file at `off` through the map and returns its length:
    /// all of `bytes`, or less where they reach past the file's preallocated extent (the caller
    /// writes the rest with `pwrite`). If the file cannot be mapped, the map is given up for this
    /// file with a warning and the caller writes everything.
    pub(crate) fn write_at(&mut self, file: &File, path: &Path, bytes: &[u8], off: u64) -> usize {
        match self.copy(file, bytes, off) {
            Ok(n) => n,
            Err((n, e)) => {
                tracing::warn!(segment = %path.display(), error = %e, "cannot map the WAL segment; writing it with pwrite");
                self.enabled = false;
                self.window = None;
                self.generation += 1;
                n
            }
        }
    }

    fn copy(&mut self, file: &File, bytes: &[u8], off: u64) -> Result<usize, (usize, io::Error)> {
        if !self.enabled {
            return Ok(0);
        }
        let extent = match self.extent {
            Some(e) => e,
            None => *self.extent.insert(file.metadata().map_err(|e| (0, e))?.len()),
        };
        let mut done = 0;
        while done < bytes.len() {
            let at = off + done as u64;
            if at >= extent {
                break;
            }
            if !self.window.as_ref().is_some_and(|(s, m)| covers(*s, m, at)) {
                let start = at - at % WINDOW;
                self.window = None;
                fail::fail_point!("wal::mapped::map", |_| Err((done, io::ErrorKind::Other.into())));
                let len = (extent - start).min(WINDOW) as usize;
                // SAFETY: `start..start + len` lies inside the file (its length was read above and
                // the file is only shortened after `unmap`), and no one else modifies the file while
                // it is mapped (module invariants). The map is only written through `&mut self`.
                let map = unsafe { MmapOptions::new().offset(start).len(len).map_mut(file) }
                    .map_err(|e| (done, e))?;
                self.window = Some((start, map));
            }
            let (start, map) = self.window.as_mut().expect("mapped above");
            let from = (at - *start) as usize;
            let n = (map.len() - from).min(bytes.len() - done);
            #[expect(
                clippy::indexing_slicing,
                reason = "from < map.len() (at < extent) and n fits both what is left of the map and of `bytes`"
            )]
            map[from..from + n].copy_from_slice(&bytes[done..done + n]);
            done += n;
        }
        Ok(done)
    }

    /// Takes the window out of the map, to be unmapped (dropped) by the caller before the file is
    /// synced. Writeback of a page that is mapped write-protects it in the map, one TLB
    /// shootdown (an interrupt to every other CPU running the process; a VM exit each under a
    /// hypervisor) per page, and a sync may clean thousands of pages written through the map.
    /// Unmapping the window costs one shootdown for the whole range, and the next write maps it
    /// again. The caller drops it outside the log's state lock: `munmap` waits for the process's
    /// address-space lock, which other threads' mappings hold for milliseconds at times, and
    /// appends would wait behind it.
    #[must_use = "the window is unmapped when the returned map is dropped"]
    pub(crate) fn release(&mut self) -> Option<MmapMut> {
        self.window.take().map(|(_, map)| map)
    }

    /// Drops the map; must be called before the file is shortened.
    pub(crate) fn unmap(&mut self) {
        self.window = None;
        self.extent = None;
        self.generation += 1;
    }
}

#[cfg(test)]
impl Mapped {
    /// Whether a window is mapped.
    pub(crate) fn is_mapped(&self) -> bool {
        self.window.is_some()
    }
}

/// Whether a map of the file from offset `start` holds offset `at`.
fn covers(start: u64, map: &MmapMut, at: u64) -> bool {
    start <= at && at < start + map.len() as u64
}

impl std::fmt::Debug for Mapped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mapped")
            .field("enabled", &self.enabled)
            .field("extent", &self.extent)
            .field("window", &self.window.as_ref().map(|(s, m)| (*s, m.len())))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    /// A new file in `dir`, open for reading and writing (what a shared writable map needs).
    fn read_write(dir: &tempfile::TempDir) -> File {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("f"))
            .unwrap()
    }

    #[test]
    fn writes_inside_the_extent_and_stops_at_its_end() {
        let dir = tempfile::tempdir().unwrap();
        let file = read_write(&dir);
        let extent = WINDOW + 8000;
        file.set_len(extent).unwrap();
        let mut m = Mapped::new(true);
        // Across the window boundary.
        let bytes: Vec<u8> = (0..9000u32).map(|i| (i % 251) as u8).collect();
        let off = WINDOW - 3000;
        assert_eq!(m.write_at(&file, dir.path(), &bytes, off), bytes.len());
        // Past the extent: only the part inside is written.
        assert_eq!(m.write_at(&file, dir.path(), &bytes, extent - 100), 100);
        assert_eq!(m.write_at(&file, dir.path(), &bytes, extent), 0);
        let mut back = vec![0u8; bytes.len()];
        file.read_exact_at(&mut back, off).unwrap();
        assert_eq!(back, bytes);
        let mut tail = vec![0u8; 100];
        file.read_exact_at(&mut tail, extent - 100).unwrap();
        assert_eq!(tail, bytes[..100]);
        assert_eq!(file.metadata().unwrap().len(), extent, "the map never grows the file");
        // A disabled map writes nothing.
        assert_eq!(Mapped::new(false).write_at(&file, dir.path(), &bytes, 0), 0);
    }

    /// A window mapped ahead is installed only for the map it was planned for, since its last
    /// `unmap`, and only if it covers the next write; writes then go through it.
    #[test]
    fn a_window_mapped_ahead_is_installed_only_where_it_is_valid() {
        let dir = tempfile::tempdir().unwrap();
        let file = read_write(&dir);
        let extent = 3 * WINDOW;
        file.set_len(extent).unwrap();
        let mut m = Mapped::new(true);
        assert!(m.plan(0).is_none(), "no plan before the extent is known");
        assert_eq!(m.write_at(&file, dir.path(), b"first", 0), 5);
        assert!(m.plan(extent).is_none(), "nothing past the extent");

        // Planned and mapped, then the file is cut (`unmap`): not installed.
        let stale = Mapped::premap(&file, m.plan(5).unwrap()).unwrap();
        m.unmap();
        assert!(m.install(stale, 5).is_some(), "a window planned before an unmap is refused");
        assert_eq!(m.write_at(&file, dir.path(), b"again", 5), 5);

        // A window that does not cover the next write is refused.
        let p = Mapped::premap(&file, m.plan(10).unwrap()).unwrap();
        assert!(m.install(p, 2 * WINDOW + 1).is_some());

        // A valid one replaces the window, which is handed back to be unmapped.
        let p = Mapped::premap(&file, m.plan(WINDOW + 10).unwrap()).unwrap();
        assert_eq!(p.map.len() as u64, 2 * WINDOW, "two windows from the one the write is in");
        let replaced = m.install(p, WINDOW + 10).expect("the old window is handed back");
        drop(replaced);
        let bytes = b"through the window mapped ahead";
        assert_eq!(m.write_at(&file, dir.path(), bytes, 2 * WINDOW + 100), bytes.len());
        assert_eq!(m.window.as_ref().unwrap().0, WINDOW, "written through the installed window");
        let mut back = vec![0u8; bytes.len()];
        file.read_exact_at(&mut back, 2 * WINDOW + 100).unwrap();
        assert_eq!(&back, bytes);
        let mut first = [0u8; 10];
        file.read_exact_at(&mut first, 0).unwrap();
        assert_eq!(&first, b"firstagain");
    }

    #[test]
    fn a_file_that_cannot_be_mapped_is_left_to_pwrite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![0u8; 8192]).unwrap();
        // Write-only: a shared writable map needs read access, so mapping fails (EACCES).
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        let mut m = Mapped::new(true);
        assert_eq!(m.write_at(&file, &path, b"record", 0), 0);
        assert!(!m.enabled, "the map is given up after a failure");
        assert_eq!(m.write_at(&file, &path, b"record", 100), 0);
    }
}
