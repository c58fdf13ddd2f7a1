//! Layer archives as a hostile registry or web server serves them: tar bombs, gzip bombs,
//! path traversal, links, truncation. Whatever comes in, the output stays within the limits
//! and nothing but `plugin.wasm` (or the one `.wasm`) is ever returned.
//!
//! The input is used raw (as gzip and as tar) and also gzipped here, so the fuzzer reaches
//! the tar reader behind the gzip decoder without having to forge deflate streams.
#![no_main]

use std::io::Write;

use libfuzzer_sys::fuzz_target;
use waystone_fetch::manifest::{extract_plugin, extract_single_wasm, gunzip_capped};

const MODULE_LIMIT: u64 = 64 << 10;
const DECOMPRESSED_LIMIT: u64 = 256 << 10;

fuzz_target!(|data: &[u8]| {
    if let Ok(module) = extract_plugin(data, MODULE_LIMIT, DECOMPRESSED_LIMIT) {
        assert!(module.len() as u64 <= MODULE_LIMIT);
    }
    if let Ok(out) = gunzip_capped(data, DECOMPRESSED_LIMIT) {
        assert!(out.len() as u64 <= DECOMPRESSED_LIMIT);
    }
    if let Ok(module) = extract_single_wasm(data, MODULE_LIMIT) {
        assert!(module.len() as u64 <= MODULE_LIMIT);
    }
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(data).unwrap();
    let gz = gz.finish().unwrap();
    if let Ok(module) = extract_plugin(&gz, MODULE_LIMIT, DECOMPRESSED_LIMIT) {
        assert!(module.len() as u64 <= MODULE_LIMIT);
        // What was returned is the content of a `plugin.wasm` entry of the archive.
        let mut archive = tar::Archive::new(data);
        let found = archive.entries().ok().is_some_and(|entries| {
            entries.flatten().any(|e| {
                let name = String::from_utf8_lossy(&e.path_bytes()).into_owned();
                let parts: Vec<_> = std::path::Path::new(&name)
                    .components()
                    .filter(|c| !matches!(c, std::path::Component::CurDir))
                    .collect();
                parts.len() == 1 && parts[0].as_os_str() == "plugin.wasm"
            })
        });
        assert!(found, "extracted a module from an archive without plugin.wasm");
    }
});
