//! The strict NAR decoder must refuse or accept any bytes without panicking, and what
//! it accepts must restore to a tree that encodes back to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use thymis_store::nar::{DecodeLimits, TreeBuilder, decode, restore};

fuzz_target!(|data: &[u8]| {
    let mut tree = TreeBuilder::default();
    if decode(data, &mut tree).is_ok() {
        let root = tree.root.expect("accepted NAR has a root");
        assert_eq!(root.to_nar(), data, "accepted NAR does not re-encode identically");
        let dir = tempfile::tempdir().expect("tmp");
        restore(data, &dir.path().join("t"), DecodeLimits::default()).expect("accepted NAR restores");
    }
});
