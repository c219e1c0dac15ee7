//! Protocol decoding of arbitrary text, in both directions and both handshake states.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        for authenticated in [false, true] {
            let _ = thymis_proto::decode_agent_bound(text, authenticated);
            let _ = thymis_proto::decode_controller_bound(text, authenticated);
        }
    }
});
