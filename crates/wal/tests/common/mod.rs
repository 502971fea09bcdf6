//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use timber_wal::{Options, SyncMode, Wal};

/// Options for tests: small segments so that rolls happen, manual sync unless stated.
pub fn small(capacity: u64) -> Options {
    Options::default().segment_capacity(capacity).sync(SyncMode::Manual)
}

pub fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    v.sort();
    v
}

pub fn collect(wal: &Wal, range: std::ops::Range<u64>) -> Vec<(u64, Vec<u8>)> {
    wal.iter(range).map(|r| r.map(|(s, b)| (s, b.to_vec())).unwrap()).collect()
}

/// Deterministic payload of record `i`.
pub fn payload(i: u64, len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len);
    let mut x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.push(x as u8);
    }
    v
}
