#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| kiln_formats::fuzz::hf_json(data));
