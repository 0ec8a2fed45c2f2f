//! The policy catalogue and calendar loaders: any text is a catalogue (or
//! calendar) or an error naming the file and line, never a panic.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use refbus_core::Directory;
use refbus_core::calendar::Calendar;
use refbus_core::policy::PolicyCatalogue;

fn directory() -> &'static Directory {
    static DIRECTORY: OnceLock<Directory> = OnceLock::new();
    DIRECTORY.get_or_init(|| {
        Directory::load(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../deploy/local/directory.toml"
        ))
        .expect("the shipped directory loads")
    })
}

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let path = PathBuf::from("fuzz/policy.toml");
        let _ = PolicyCatalogue::parse(vec![(path.clone(), text.to_owned())], directory());
        let _ = Calendar::parse(text, &path, directory());
    }
});
