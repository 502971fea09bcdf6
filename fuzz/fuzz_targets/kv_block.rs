//! Fuzz target: the SSTable block verification and decoding (crates/kv/src/table.rs `unpack`, crates/kv/src/block.rs).
#![no_main]

#[global_allocator]
static ALLOC: timber_fuzz::Limited = timber_fuzz::Limited;

libfuzzer_sys::fuzz_target!(|data: &[u8]| timber_kv::fuzz::block(data));
