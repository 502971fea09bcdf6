//! Fuzz target: the stream fragment decoder (crates/stream/src/fragment.rs).
#![no_main]

#[global_allocator]
static ALLOC: timber_fuzz::Limited = timber_fuzz::Limited;

libfuzzer_sys::fuzz_target!(|data: &[u8]| timber_stream::fuzz::fragment(data));
