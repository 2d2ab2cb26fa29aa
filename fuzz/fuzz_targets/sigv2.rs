#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| deis_backup_fuzz::sigv2(data));
