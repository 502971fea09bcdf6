//! Fuzz target: the RESP request parser (crates/server/src/resp/request.rs).
#![no_main]

#[global_allocator]
static ALLOC: timber_fuzz::Limited = timber_fuzz::Limited;

libfuzzer_sys::fuzz_target!(|data: &[u8]| timber_server::fuzz::resp_request(data));
