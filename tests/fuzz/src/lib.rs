//! What the fuzz targets share: the shipped agency directory, loaded once.

use std::sync::OnceLock;

use refbus_core::Directory;

/// `deploy/local/directory.toml`.
///
/// # Panics
/// When the shipped directory does not load (a broken checkout).
pub fn shipped_directory() -> &'static Directory {
    static DIRECTORY: OnceLock<Directory> = OnceLock::new();
    DIRECTORY.get_or_init(|| {
        Directory::load(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../deploy/local/directory.toml"
        ))
        .expect("the shipped directory loads")
    })
}
