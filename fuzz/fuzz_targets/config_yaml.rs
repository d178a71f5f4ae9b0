#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| kiln_models::fuzz::config_yaml(data));
