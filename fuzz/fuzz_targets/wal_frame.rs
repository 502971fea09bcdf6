//! Fuzz target: the WAL record frame decoder (crates/wal/src/frame.rs).
#![no_main]

#[global_allocator]
static ALLOC: timber_fuzz::Limited = timber_fuzz::Limited;

libfuzzer_sys::fuzz_target!(|data: &[u8]| timber_wal::fuzz::frame(data));
