#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| kiln_formats::fuzz::tokenizer_json(data));
