use super::*;

#[test]
fn tokens_are_single_use_expiring_and_kept_as_a_key_that_cannot_prove() {
    let tmp = tempfile::tempdir().expect("tmp");
    let db = Db::open(&tmp.path().join("db.sqlite")).expect("open");
    db.add_device("d1", "kiosk").expect("add");
    assert!(db.add_device("d1", "kiosk").is_err(), "duplicate device");
    let t = db.issue_token("d1", 60).expect("token");
    assert_eq!(db.enroll(&t, "k:1").expect("enroll"), "d1");
    assert!(db.enroll(&t, "k:2").expect_err("reuse").to_string().contains("already used"));
    assert!(db.enroll("nope", "k:2").is_err());
    let expired = db.issue_token("d1", -1).expect("token");
    assert!(db.enroll(&expired, "k:3").expect_err("expired").to_string().contains("expired"));
    // Kept: the token's id and its key's public half, neither of which can make a
    // proof; the older agents' HMAC path does not reach tokens kept so.
    let row = db.c().query_one("SELECT token_id, verify_key FROM enrollment_keys", &[]).expect("row");
    let (id, verify_key): (String, String) = (row.get(0).expect("id"), row.get(1).expect("key"));
    assert!(!id.contains(&expired) && !verify_key.contains(&expired), "token stored in the clear");
    assert_eq!(id, thymis_proto::handshake::token_id(&expired));
    let fresh = db.issue_token("d1", 60).expect("token");
    let anything = |_: &[u8; 32]| true;
    let err = db.enroll_with(Presented::Hash(&anything), "k:5").expect_err("the HMAC path");
    assert!(err.to_string().contains("unknown enrollment token"), "{err}");
    let wrong = |_: &thymis_store::signing::PublicKey| false;
    let id = thymis_proto::handshake::token_id(&fresh);
    assert!(db.enroll_with(Presented::Key { id: &id, proves: &wrong }, "k:5").is_err(), "a wrong proof");
    // A token issued before token keys (kept by its hash) still enrolls an older agent.
    let old = "an older controller's token";
    let hash = thymis_proto::handshake::token_hash(old).to_vec();
    db.c()
        .execute("INSERT INTO enrollment_tokens (hash, device, expires) VALUES (?1, 'd1', ?2)", vals![hash, now() + 60])
        .expect("insert");
    let matches = |h: &[u8; 32]| *h == thymis_proto::handshake::token_hash(old);
    assert_eq!(db.enroll_with(Presented::Hash(&matches), "k:6").expect("older agent"), "d1");
    db.revoke("d1").expect("revoke");
    let again = db.reenroll("d1", 60).expect("reenroll");
    db.revoke("d1").expect("revoke");
    assert!(db.enroll(&again, "k:4").is_err(), "revoked device enrolled");
}

#[test]
fn a_revoked_key_never_comes_back() {
    let tmp = tempfile::tempdir().expect("tmp");
    let db = Db::open(&tmp.path().join("db.sqlite")).expect("open");
    db.add_device("d1", "kiosk").expect("add");
    db.enroll(&db.issue_token("d1", 60).expect("token"), "k:old").expect("enroll");
    db.revoke("d1").expect("revoke");
    assert!(db.key_revoked("k:old").expect("query"));
    // Re-enrolled: the old key is not the device's any more, and cannot enroll again.
    let token = db.reenroll("d1", 60).expect("reenroll");
    assert_eq!(db.device_by_key("k:old").expect("query"), None, "the revoked key still logs in");
    let err = db.enroll(&token, "k:old").expect_err("the revoked key enrolled again");
    assert!(err.to_string().contains("revoked"), "{err}");
    assert_eq!(db.enroll(&token, "k:new").expect("a new key enrolls"), "d1");
    // Re-enrolling an enrolled device (never revoked) revokes its key too.
    let token = db.reenroll("d1", 60).expect("reenroll");
    assert!(db.key_revoked("k:new").expect("query"));
    assert_eq!(db.device_by_key("k:new").expect("query"), None);
    assert!(db.enroll(&token, "k:new").is_err());
}

#[test]
fn sequence_only_grows_across_reopen() {
    let tmp = tempfile::tempdir().expect("tmp");
    let path = tmp.path().join("db.sqlite");
    let a = Db::open(&path).expect("open").next_sequence().expect("seq");
    let b = Db::open(&path).expect("reopen").next_sequence().expect("seq");
    assert!(b > a);
}

/// A database of the controller before the stage column: each child's state,
/// activation and phase become the one stage, cancelled tasks say so.
#[test]
fn the_stage_migration_keeps_every_device_deployment_where_it_was() {
    let tmp = tempfile::tempdir().expect("tmp");
    let path = tmp.path().join("db.sqlite");
    {
        let c = rusqlite::Connection::open(&path).expect("open");
        for m in &MIGRATIONS[..5] {
            c.execute_batch(m).expect("old migration");
        }
        c.pragma_update(None, "user_version", 5).expect("version");
        c.execute_batch(
            "INSERT INTO tasks (kind, state, created, updated) VALUES ('deployment', 'cancelled', 0, 0);
                 INSERT INTO children (task, device, config, deployment_id, state, phase, result, activated, updated)
                 VALUES (1, 'b', 'c', 'i1', 'running', 'build', NULL, 0, 0),
                        (1, 'q', 'c', 'i2', 'queued', 'copy', NULL, 0, 0),
                        (1, 'c', 'c', 'i3', 'running', 'copy', NULL, 0, 0),
                        (1, 'a', 'c', 'i4', 'running', 'activate', NULL, 1, 0),
                        (1, 'f', 'c', 'i5', 'running', 'confirm', NULL, 1, 0),
                        (1, 'r', 'c', 'i6', 'finished', 'activate', 'rolled-back', 1, 0);",
        )
        .expect("old rows");
    }
    let db = Db::open(&path).expect("migrate");
    let stages: Vec<Stage> = db.children(1).expect("children").iter().map(|c| c.stage).collect();
    use thymis_proto::DeviceResult as R;
    assert_eq!(
        stages,
        [
            Stage::Building,
            Stage::Queued,
            Stage::Copying,
            Stage::Activated,
            Stage::Confirming,
            Stage::Finished(R::RolledBack)
        ]
    );
    assert_eq!(db.task_stopped(1).expect("stopped"), Some(Stopped::Cancelled));
    let t = db.task(1).expect("read").expect("task");
    assert_eq!(t.children[5].phase, Some(thymis_proto::Phase::Activate), "where the finished one ended");
    assert_eq!(t.children[3].state, ChildState::Running);
}
