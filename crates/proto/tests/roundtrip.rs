//! Property tests: whatever a peer encodes, the other side decodes to the same value.

use proptest::prelude::*;
use thymis_proto::message::Outcome;
use thymis_proto::{ControllerBound, DeviceResult, RollbackReason, decode_controller_bound, encode};

fn result() -> impl Strategy<Value = DeviceResult> {
    prop_oneof![
        Just(DeviceResult::Succeeded),
        Just(DeviceResult::SucceededWithFailedUnits),
        Just(DeviceResult::RolledBack),
        Just(DeviceResult::RollbackFailed),
        Just(DeviceResult::Failed),
    ]
}

fn reason() -> impl Strategy<Value = Option<RollbackReason>> {
    proptest::option::of(prop_oneof![
        Just(RollbackReason::ActivationFailed),
        Just(RollbackReason::Unconfirmed),
        Just(RollbackReason::RebootedUnconfirmed),
        Just(RollbackReason::Asked),
    ])
}

proptest! {
    #[test]
    fn outcome_roundtrips(
        id in ".{0,40}",
        result in result(),
        reason in reason(),
        error in proptest::option::of(".{0,80}"),
        units in proptest::collection::vec("[a-z@.-]{1,20}", 0..4),
        generation in proptest::option::of(any::<u64>()),
    ) {
        let msg = ControllerBound::Outcome(Outcome {
            deployment_id: id, result, reason, phase: None, error, failed_units: units,
            unit_logs: Default::default(), system: None, commit: None, generation,
            failed_checks: vec![],
        });
        prop_assert_eq!(decode_controller_bound(&encode(&msg), true).expect("decodes"), msg);
    }

    #[test]
    fn log_lines_with_any_text_roundtrip(id in ".{0,20}", line in "\\PC{0,200}") {
        let msg = ControllerBound::Log { deployment_id: id, line };
        prop_assert_eq!(decode_controller_bound(&encode(&msg), true).expect("decodes"), msg);
    }

    #[test]
    fn decoder_never_panics(text in "\\PC{0,300}") {
        let _ = decode_controller_bound(&text, false);
        let _ = thymis_proto::decode_agent_bound(&text, true);
    }
}
