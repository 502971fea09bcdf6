//! `State`: the segments of an open log as it knows them in memory (the sealed ones and the
//! active one), its meta file, its next sequence number, and `truncate_back`, which changes
//! them all. It lives under the log's state lock.
//!
//! Invariants: the live records are exactly `meta.first_seq..next`; the segments are contiguous
//! (`sealed[i].end() == sealed[i + 1].start`, the last sealed one ends where the active one
//! starts) and `active.end() == next`; `sealed_bytes` is the sum of the sealed segments' sizes.

use std::collections::VecDeque;
use std::path::Path;

use crate::active::Active;
use crate::error::{Error, Result};
use crate::meta::Meta;
use crate::options::Options;
use crate::segment::{
    self, open_options_rw, read_index, remove_file, sync_dir, Sealed, TRAILER_LEN,
};

/// The log's segments and counters, kept under the state lock of the log.
pub(crate) struct State {
    /// What the meta file holds; `meta.first_seq` is the first live sequence number.
    pub(crate) meta: Meta,
    pub(crate) next: u64,
    pub(crate) sealed: VecDeque<Sealed>,
    pub(crate) sealed_bytes: u64,
    pub(crate) active: Active,
    /// Bytes appended since the last sync, and whether the sync thread was asked for one.
    pub(crate) unsynced: u64,
    pub(crate) kicked: bool,
    /// Whether the preparer was asked for the spare that will follow the active segment. It is
    /// asked when a roll used the previous one, or, for the first segment after open, once that
    /// is half full, so that a fresh log does not write a second segment of zeros while its
    /// first writes wait on the disk.
    pub(crate) spare_asked: bool,
}

impl State {
    pub(crate) fn first(&self) -> u64 {
        self.meta.first_seq
    }

    pub(crate) fn store_meta(&mut self, meta: Meta, dir: &Path, opts: &Options) -> Result<()> {
        meta.store(dir, opts.file_mode)?;
        self.meta = meta;
        Ok(())
    }

    /// `truncate_back` made crash-atomic: the intent is persisted first and redone by recovery.
    pub(crate) fn truncate_back(&mut self, seq: u64, dir: &Path, opts: &Options) -> Result<()> {
        let meta = Meta {
            cut_from: Some(seq),
            complete_below: seq,
            synced_below: self.meta.synced_below.min(seq),
            ..self.meta
        };
        self.store_meta(meta, dir, opts)?;
        self.cut_back(seq, dir, opts)?;
        self.store_meta(Meta { cut_from: None, ..meta }, dir, opts)
    }

    pub(crate) fn used(&self) -> u64 {
        self.sealed_bytes + self.active.data_len()
    }

    /// The sealed segment holding `seq`, which must be below the active segment.
    pub(crate) fn sealed_holding(&self, seq: u64) -> usize {
        self.sealed.partition_point(|s| s.end() <= seq)
    }

    /// Drops `seq` and every record after it (`first <= seq < next`), segment files included.
    fn cut_back(&mut self, seq: u64, dir: &Path, opts: &Options) -> Result<()> {
        if seq < self.active.start {
            let k = self.sealed_holding(seq);
            remove_file(&self.active.path)?;
            while self.sealed.len() > k + 1 {
                let s = self.sealed.pop_back().expect("len > k + 1");
                remove_file(&s.path)?;
            }
            sync_dir(dir)?;
            let seg = self.sealed.pop_back().expect("seq lies in a sealed segment");
            self.active = reopen_sealed(&seg, opts)?;
        }
        let i = (seq - self.active.start) as usize;
        // In range (start <= seq < next = active.end()) unless a reopened segment's index changed.
        let Some(&off) = self.active.offsets.get(i) else {
            return Err(Error::corrupt(
                &self.active.path,
                0,
                format!("record {seq} is missing from the segment's index"),
            ));
        };
        let off = u64::from(off);
        self.active.cut(i, off, opts)?;
        self.next = seq;
        self.sealed_bytes = self.sealed.iter().map(|s| s.file_len).sum();
        Ok(())
    }
}

/// Turns a sealed segment back into an appendable one (its trailer is cut by the caller's `cut`).
fn reopen_sealed(seg: &Sealed, opts: &Options) -> Result<Active> {
    let file = open_options_rw(opts.file_mode)
        .open(&seg.path)
        .map_err(|e| Error::io("open", &seg.path, e))?;
    let segment::Inspected { file_len, trailer, .. } = segment::inspect(&seg.path, seg.start)?;
    let trailer = trailer.ok_or_else(|| {
        Error::corrupt(
            &seg.path,
            file_len.saturating_sub(TRAILER_LEN as u64),
            "sealed segment lost its trailer",
        )
    })?;
    let index = read_index(&file, &seg.path, &trailer)?;
    Active::new(seg.start, seg.path.clone(), file, index, trailer.data_end, opts)
}
