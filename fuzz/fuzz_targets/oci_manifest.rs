//! Manifests and indexes as a hostile registry serves them, under every content type.
#![no_main]

use libfuzzer_sys::fuzz_target;
use waystone_fetch::manifest::{self, Manifest};

fuzz_target!(|data: &[u8]| {
    for content_type in [
        manifest::OCI_MANIFEST,
        manifest::OCI_INDEX,
        manifest::DOCKER_MANIFEST,
        manifest::DOCKER_LIST,
        "application/json",
        "",
    ] {
        match manifest::parse(data, content_type) {
            Ok(Manifest::Image { layers }) => {
                let _ = manifest::choose_layer(&layers);
                let _ = manifest::media_types(&layers);
            }
            Ok(Manifest::Index { manifests }) => {
                let _ = manifest::media_types(&manifests);
            }
            Err(reason) => assert!(!reason.is_empty()),
        }
    }
});
