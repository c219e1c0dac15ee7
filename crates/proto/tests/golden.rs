//! Golden fixtures: every message of the protocol (v1, and the streams v2 adds) as JSON, checked in both directions,
//! so that a change to the types that would break an older peer fails here.
//! Regenerate after an intended change with `THYMIS_BLESS=1 cargo test -p thymis-proto`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use thymis_proto::compact::CompactPath;
use thymis_proto::handshake::Nonce;
use thymis_proto::message::{DeviceReport, Outcome, PendingReport};
use thymis_proto::signed::Signed;
use thymis_proto::stream::{JournalEntry, JournalQuery};
use thymis_proto::{
    AgentBound, AgentState, ControllerBound, CopyWindow, DeviceResult, IndexedBase, Phase, RollbackReason,
};
use thymis_store::{NarHash, PathInfo, StorePath};

fn sp(name: &str) -> StorePath {
    format!("/nix/store/0c9n7lz8mfsd6j3bk3r7ssp6a0h2sfaa-{name}").parse().expect("path")
}

fn signed() -> Signed {
    Signed { payload: r#"{"device":"kiosk-1"}"#.into(), signature: "thymis-controller-1:c2ln".into() }
}

fn agent_bound() -> Vec<(&'static str, AgentBound)> {
    let id = || "dep-17-kiosk-1".to_string();
    vec![
        (
            "challenge",
            AgentBound::Challenge {
                protocol: 1,
                controller_key: "thymis-controller-1:a2V5".into(),
                server_nonce: Nonce([2; 32]),
                session: "s-5f3a".into(),
                signature: "thymis-controller-1:c2ln".into(),
            },
        ),
        (
            "welcome",
            AgentBound::Welcome {
                device: "kiosk-1".into(),
                config: "kiosk".into(),
                heartbeat_secs: 15,
                dead_after_secs: 45,
                time: 1_796_220_000,
                signature: Some("thymis-controller-1:c2ln".into()),
            },
        ),
        ("refused", AgentBound::Refused { reason: "enrollment token already used".into() }),
        ("offer", AgentBound::Offer { offer: signed() }),
        ("query_paths", AgentBound::QueryPaths { deployment_id: id(), paths: vec![sp("lib"), sp("system")] }),
        (
            "path_start",
            AgentBound::PathStart {
                deployment_id: id(),
                info: PathInfo {
                    path: sp("system"),
                    nar_hash: NarHash([7; 32]),
                    nar_size: 1024,
                    references: [sp("lib"), sp("system")].into(),
                    deriver: None,
                    signatures: vec!["thymis-1:c2ln".into()],
                },
                delta_base: None,
            },
        ),
        (
            "path_start_delta",
            AgentBound::PathStart {
                deployment_id: id(),
                info: PathInfo {
                    path: sp("lib"),
                    nar_hash: NarHash([8; 32]),
                    nar_size: 2048,
                    references: [sp("lib")].into(),
                    deriver: None,
                    signatures: vec!["thymis-1:c2ln".into()],
                },
                delta_base: Some(sp("lib-old")),
            },
        ),
        ("path_end", AgentBound::PathEnd { deployment_id: id(), path: sp("system") }),
        (
            "path_at",
            AgentBound::PathAt(CompactPath {
                index: 1,
                nar_hash: NarHash([7; 32]),
                nar_size: 1024,
                references: vec![0, 1],
                deriver: None,
                signatures: vec!["thymis-1:c2ln".into()],
                delta: false,
            }),
        ),
        (
            "path_at_delta",
            AgentBound::PathAt(CompactPath {
                index: 0,
                nar_hash: NarHash([8; 32]),
                nar_size: 2048,
                references: vec![0],
                deriver: None,
                signatures: vec!["thymis-1:c2ln".into()],
                delta: true,
            }),
        ),
        ("path_done", AgentBound::PathDone),
        ("activate", AgentBound::Activate { deployment_id: id() }),
        ("stage", AgentBound::Stage { deployment_id: id() }),
        ("cache_query", AgentBound::CacheQuery { query: "q-3".into(), paths: vec![sp("lib"), sp("system")] }),
        ("confirm", AgentBound::Confirm { confirmation: signed() }),
        ("cancel", AgentBound::Cancel { deployment_id: id() }),
        ("outcome_recorded", AgentBound::OutcomeRecorded { deployment_id: id() }),
        ("heartbeat", AgentBound::Heartbeat { seq: 9 }),
        ("error", AgentBound::Error { message: "unknown deployment".into() }),
        (
            "journal_open",
            AgentBound::JournalOpen {
                stream: 3,
                query: JournalQuery {
                    units: vec!["web.service".into()],
                    since: Some("-1h".into()),
                    lines: Some(50),
                    follow: true,
                },
            },
        ),
        (
            "terminal_open",
            AgentBound::TerminalOpen {
                stream: 4,
                command: vec!["systemctl".into(), "status".into()],
                cols: 100,
                rows: 30,
            },
        ),
        ("terminal_input", AgentBound::TerminalInput { stream: 4, data: "bHMK".into() }),
        ("terminal_resize", AgentBound::TerminalResize { stream: 4, cols: 120, rows: 40 }),
        ("stream_close", AgentBound::StreamClose { stream: 3 }),
    ]
}

fn controller_bound() -> Vec<(&'static str, ControllerBound)> {
    let id = || "dep-17-kiosk-1".to_string();
    vec![
        (
            "hello",
            ControllerBound::Hello {
                protocol_min: 1,
                protocol_max: 1,
                agent_version: "0.1.0".into(),
                device_key: "thymis-device:a2V5".into(),
                client_nonce: Nonce([1; 32]),
            },
        ),
        (
            "auth",
            ControllerBound::Auth {
                signature: "thymis-device:c2ln".into(),
                enrollment_token: None,
                enrollment_proof: Some("9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08".into()),
            },
        ),
        (
            "report",
            ControllerBound::Report(DeviceReport {
                agent_version: "0.1.0".into(),
                system: Some(sp("system")),
                commit: Some("4b825dc642cb6eb9a060e54bf8d69288fbee4904".into()),
                generation: Some(3),
                state: AgentState::AwaitingConfirmation,
                last_sequence: 41,
                pending: Some(PendingReport {
                    deployment_id: id(),
                    system: sp("system"),
                    sequence: 42,
                    seconds_left: 97,
                }),
                profile_system: None,
                ..Default::default()
            }),
        ),
        (
            "report_held",
            ControllerBound::Report(DeviceReport {
                agent_version: "0.1.0".into(),
                system: Some(sp("system")),
                commit: None,
                generation: Some(3),
                state: AgentState::Idle,
                last_sequence: 41,
                pending: None,
                profile_system: None,
                hold: Some(thymis_proto::HoldReport {
                    reason: "printing a label".into(),
                    since: 1_796_000_000,
                    overdue: false,
                }),
                time_zone: Some("Europe/Berlin".into()),
                no_journal: Some("this device has no journal (journald does not run)".into()),
                no_terminal: None,
            }),
        ),
        ("staged", ControllerBound::Staged { deployment_id: id(), reboot_needed: None }),
        (
            "staged_reboot",
            ControllerBound::Staged { deployment_id: id(), reboot_needed: Some("kernel changed".into()) },
        ),
        ("held", ControllerBound::Held { deployment_id: id(), reason: "printing a label".into() }),
        ("cache_answer", ControllerBound::CacheAnswer { query: "q-3".into(), served: vec![sp("lib")], bytes: 5120 }),
        ("offer_accepted", ControllerBound::OfferAccepted { deployment_id: id() }),
        (
            "offer_refused",
            ControllerBound::OfferRefused { deployment_id: id(), reason: "sequence 3 is not above 41".into() },
        ),
        (
            "paths_missing",
            ControllerBound::PathsMissing {
                deployment_id: id(),
                missing: vec![sp("system")],
                bases: vec![],
                window: None,
                substituted_paths: 0,
                substituted_bytes: 0,
            },
        ),
        (
            "paths_missing_bases",
            ControllerBound::PathsMissing {
                deployment_id: id(),
                missing: vec![sp("lib"), sp("system")],
                bases: vec![thymis_proto::DeltaBase { path: sp("lib"), base: sp("lib-old") }],
                window: None,
                substituted_paths: 0,
                substituted_bytes: 0,
            },
        ),
        (
            "paths_missing_window",
            ControllerBound::PathsMissing {
                deployment_id: id(),
                missing: vec![sp("lib"), sp("system")],
                bases: vec![],
                window: Some(thymis_proto::CopyWindow { paths: 512, bytes: 16 << 20 }),
                substituted_paths: 0,
                substituted_bytes: 0,
            },
        ),
        (
            "paths_missing_substituted",
            ControllerBound::PathsMissing {
                deployment_id: id(),
                missing: vec![sp("system")],
                bases: vec![],
                window: Some(thymis_proto::CopyWindow { paths: 512, bytes: 64 << 20 }),
                substituted_paths: 1204,
                substituted_bytes: 187_000_000,
            },
        ),
        ("substituting", ControllerBound::Substituting { deployment_id: id(), paths: 310, bytes: 41_000_000 }),
        ("path_imported", ControllerBound::PathImported { deployment_id: id(), path: sp("system") }),
        (
            "paths_lacking",
            ControllerBound::PathsLacking {
                deployment_id: id(),
                missing: vec![0, 1],
                bases: vec![IndexedBase(0, sp("lib-old"))],
                window: CopyWindow { paths: 512, bytes: 64 << 20 },
                substituted_paths: 3,
                substituted_bytes: 40_960,
            },
        ),
        ("paths_imported", ControllerBound::PathsImported { deployment_id: id(), paths: vec![0, 1] }),
        (
            "path_refused",
            ControllerBound::PathRefused { deployment_id: id(), path: sp("system"), error: "NAR hash mismatch".into() },
        ),
        (
            "log",
            ControllerBound::Log { deployment_id: id(), line: "starting the following units: demo.service".into() },
        ),
        (
            "outcome",
            ControllerBound::Outcome(Outcome {
                deployment_id: id(),
                result: DeviceResult::RolledBack,
                reason: Some(RollbackReason::Unconfirmed),
                phase: Some(Phase::Confirm),
                error: None,
                failed_units: vec!["demo.service".into()],
                unit_logs: BTreeMap::from([("demo.service".into(), vec!["exit 1".into()])]),
                failed_checks: vec![],
                system: Some(sp("system")),
                commit: None,
                generation: Some(2),
            }),
        ),
        ("heartbeat", ControllerBound::Heartbeat { seq: 9 }),
        ("error", ControllerBound::Error { message: "no such deployment".into() }),
        (
            "journal_entries",
            ControllerBound::JournalEntries {
                stream: 3,
                entries: vec![JournalEntry {
                    time_us: 1_796_245_261_000_000,
                    unit: Some("web.service".into()),
                    priority: Some(6),
                    identifier: Some("web".into()),
                    message: "listening on :80".into(),
                }],
                dropped: 12,
            },
        ),
        ("terminal_output", ControllerBound::TerminalOutput { stream: 4, data: "cm9vdEBraW9zayM=".into() }),
        ("stream_end", ControllerBound::StreamEnd { stream: 4, exit_status: Some(0), error: None }),
        (
            "stream_end_error",
            ControllerBound::StreamEnd {
                stream: 5,
                exit_status: None,
                error: Some("the terminal is disabled on this device".into()),
            },
        ),
    ]
}

fn dir(direction: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v1").join(direction)
}

fn check<T>(direction: &str, samples: Vec<(&'static str, T)>)
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let bless = std::env::var_os("THYMIS_BLESS").is_some();
    let dir = dir(direction);
    std::fs::create_dir_all(&dir).expect("mkdir");
    let mut names: Vec<String> = Vec::new();
    for (name, msg) in samples {
        let file = dir.join(format!("{name}.json"));
        let ours = serde_json::to_value(&msg).expect("serialise");
        if bless {
            std::fs::write(&file, serde_json::to_string_pretty(&ours).expect("json") + "\n").expect("write");
        }
        let text = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e} (bless?)", file.display()));
        let golden: serde_json::Value = serde_json::from_str(&text).expect("fixture is JSON");
        assert_eq!(ours, golden, "{direction}/{name}: serialisation changed");
        let parsed: T = serde_json::from_str(&text).expect("fixture parses");
        assert_eq!(parsed, msg, "{direction}/{name}: parsing changed");
        names.push(format!("{name}.json"));
    }
    // Every fixture belongs to a sample: a removed message type is a breaking change.
    for entry in std::fs::read_dir(&dir).expect("ls") {
        let n = entry.expect("entry").file_name().to_string_lossy().into_owned();
        assert!(names.contains(&n), "{direction}/{n} has no sample: a message was removed or renamed");
    }
}

#[test]
fn agent_bound_messages_match_their_fixtures() {
    check("agent_bound", agent_bound());
}

#[test]
fn controller_bound_messages_match_their_fixtures() {
    check("controller_bound", controller_bound());
}

#[test]
fn unknown_fields_are_ignored_and_unknown_types_refused() {
    let text = r#"{"type":"heartbeat","seq":3,"added_in_a_later_release":true}"#;
    assert_eq!(thymis_proto::decode_agent_bound(text, true).expect("parses"), AgentBound::Heartbeat { seq: 3 });
    assert!(thymis_proto::decode_agent_bound(r#"{"type":"format_disk"}"#, true).is_err());
    // Streams are the controller's to open: no message of an agent opens one (a device
    // can never reach another device's journal or terminal).
    for open in [
        r#"{"type":"terminal_open","stream":1,"cols":80,"rows":24}"#,
        r#"{"type":"journal_open","stream":1,"query":{}}"#,
    ] {
        assert!(thymis_proto::decode_controller_bound(open, true).is_err(), "{open}");
    }
}

#[test]
fn oversized_messages_are_refused_before_parsing() {
    let big = format!(r#"{{"type":"error","message":"{}"}}"#, "x".repeat(thymis_proto::MAX_HANDSHAKE_MESSAGE));
    assert!(matches!(
        thymis_proto::decode_controller_bound(&big, false),
        Err(thymis_proto::ProtoError::TooLarge { .. })
    ));
    assert!(thymis_proto::decode_controller_bound(&big, true).is_ok());
}
