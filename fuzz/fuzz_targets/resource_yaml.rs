//! Resource YAML as users (or anyone who can write to the API) send it: parsing never
//! panics, and every object that parses survives the JSON round trip the store makes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use waystone_model::{Resource, TranslateOptions, parse_manifests, translate};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(mut objects) = parse_manifests(text, "fuzz") else {
        return;
    };
    for r in &mut objects {
        r.set_default_namespace("default");
        let _ = r.validate();
        // The store writes `to_json` and reads `from_json`: a object that cannot come back
        // would be a corrupt store after restart.
        let json = r.to_json();
        let back = Resource::from_json(json.clone())
            .unwrap_or_else(|e| panic!("{json} does not read back: {e}"));
        assert_eq!(back.to_json(), json, "the JSON round trip changed the object");
    }
    let _ = translate(&objects, &TranslateOptions::default());
});
