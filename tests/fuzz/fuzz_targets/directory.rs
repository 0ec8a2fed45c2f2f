//! The agency directory loader: any text is a directory or an error naming
//! the file and line, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = refbus_core::Directory::parse(text, std::path::Path::new("fuzz/directory.toml"));
    }
});
