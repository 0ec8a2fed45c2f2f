//! The policy catalogue and calendar loaders: any text is a catalogue (or
//! calendar) or an error naming the file and line, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use refbus_core::calendar::Calendar;
use refbus_core::policy::PolicyCatalogue;
use std::path::PathBuf;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let path = PathBuf::from("fuzz/policy.toml");
        let _ = PolicyCatalogue::parse(
            vec![(path.clone(), text.to_owned())],
            refbus_fuzz::shipped_directory(),
        );
        let _ = Calendar::parse(text, &path, refbus_fuzz::shipped_directory());
    }
});
