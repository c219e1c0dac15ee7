//! The bundle reader must refuse hostile archives cleanly (no panic, nothing written
//! outside its scratch directory).
#![no_main]

use libfuzzer_sys::fuzz_target;
use thymis_store::bundle;
use thymis_store::signing::SecretKey;

fuzz_target!(|data: &[u8]| {
    let key = SecretKey::generate("fuzz").expect("key").public();
    let dir = tempfile::tempdir().expect("tmp");
    let _ = bundle::read(data, std::slice::from_ref(&key), std::slice::from_ref(&key), dir.path(), |m| {
        Ok(m.paths.iter().map(|p| p.path.clone()).collect())
    });
});
