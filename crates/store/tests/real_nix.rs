//! The store layer judged by real Nix (Debian's nix-bin): our NARs, hashes, signatures,
//! imports and bundles must be what Nix itself produces and accepts.

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;

use thymis_store::bundle::{self, BundleError, Manifest, Target};
use thymis_store::closure::sort_dependencies_first;
use thymis_store::local_store::LocalStore;
use thymis_store::nar::{DecodeLimits, encode_path, hash_path, restore};
use thymis_store::signing::{PublicKey, SecretKey, verify_path};
use thymis_store::{NarHash, PathInfo, StorePath};

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf8").trim().to_owned()
}

fn nix_store(args: &[&str]) -> String {
    run(Command::new("nix-store").args(args))
}

/// A fresh salt so every run builds paths no earlier run left valid.
fn salt() -> String {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).expect("random");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Builds the three-path fixture closure and returns its top path.
fn build_closure(salt: &str) -> StorePath {
    let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/closure.nix");
    run(Command::new("nix-build").args([fixture, "--argstr", "salt", salt, "--no-out-link"]))
        .parse()
        .expect("store path")
}

/// A tree with every kind of entry and names whose order needs care.
fn make_tree(root: &Path) {
    fs::create_dir_all(root.join("deep/a/b/c/d/e/f")).expect("mkdir");
    fs::write(root.join("deep/a/b/c/d/e/f/leaf"), "leaf").expect("write");
    fs::create_dir(root.join("empty")).expect("mkdir");
    for name in ["a", "A", "a.b", "a-b", "aa", "b", "Z", "ä", "0", "~"] {
        fs::write(root.join(name), format!("file {name}\n")).expect("write");
    }
    fs::write(root.join("exe"), "#!/bin/sh\necho hi\n").expect("write");
    fs::set_permissions(root.join("exe"), fs::Permissions::from_mode(0o755)).expect("chmod");
    fs::write(root.join("zero"), "").expect("write");
    fs::write(root.join("odd"), vec![7u8; 8 * 1024 + 3]).expect("write");
    symlink("a", root.join("link")).expect("symlink");
    symlink("/nonexistent/target", root.join("dangling")).expect("symlink");
}

#[test]
fn our_nar_and_hash_match_nix_store_dump() {
    let tmp = tempfile::tempdir().expect("tmp");
    let tree = tmp.path().join(format!("tree-{}", salt()));
    make_tree(&tree);
    let added = nix_store(&["--add", tree.to_str().expect("utf8")]);

    let mut ours = Vec::new();
    encode_path(&tree, &mut ours).expect("encode");
    let theirs = Command::new("nix-store").args(["--dump", &added]).output().expect("dump").stdout;
    assert_eq!(ours.len(), theirs.len(), "NAR sizes differ");
    assert!(ours == theirs, "NAR bytes differ from nix-store --dump");

    let (hash, size) = hash_path(&tree).expect("hash");
    assert_eq!(hash.to_string(), nix_store(&["-q", "--hash", &added]));
    assert_eq!(size, ours.len() as u64);

    // Restoring our NAR gives the identical tree back (same NAR again).
    let restored = tmp.path().join("restored");
    restore(ours.as_slice(), &restored, DecodeLimits::default()).expect("restore");
    let mut again = Vec::new();
    encode_path(&restored, &mut again).expect("encode");
    assert!(again == ours, "restored tree differs");
    assert!(fs::metadata(restored.join("exe")).expect("exe").permissions().mode() & 0o100 != 0);
    assert_eq!(fs::read_link(restored.join("dangling")).expect("link"), Path::new("/nonexistent/target"));
}

fn gen_nix_key(dir: &Path, name: &str) -> (SecretKey, PublicKey, PathBuf, String) {
    let (sk, pk) = (dir.join(format!("{name}.sk")), dir.join(format!("{name}.pk")));
    run(Command::new("nix-store").args(["--generate-binary-cache-key", name]).arg(&sk).arg(&pk));
    let pk_text = fs::read_to_string(&pk).expect("pk");
    (
        fs::read_to_string(&sk).expect("sk").parse().expect("our parser reads nix's secret key"),
        pk_text.parse().expect("our parser reads nix's public key"),
        sk,
        pk_text.trim().to_owned(),
    )
}

#[test]
fn nix_accepts_our_signatures_and_we_accept_nix_signatures() {
    let tmp = tempfile::tempdir().expect("tmp");
    let system = build_closure(&salt());
    let store = LocalStore::system();
    let infos = store.path_infos(std::slice::from_ref(&system), true).expect("path-info");
    let (ours_sk, ours_pk, _, ours_pk_text) = gen_nix_key(tmp.path(), "ours-1");
    let (nix_sk_ours_view, nix_pk, nix_sk_file, _) = gen_nix_key(tmp.path(), "nixkey-1");
    let _ = nix_sk_ours_view;

    // Nix signs in its store; our verifier accepts, and refuses tampering.
    run(Command::new("nix").args(["store", "sign", "-r", "-k"]).arg(&nix_sk_file).arg(system.to_absolute()));
    let signed = store.path_infos(std::slice::from_ref(&system), true).expect("path-info");
    for info in &signed {
        verify_path(info, std::slice::from_ref(&nix_pk)).expect("nix signature accepted");
        assert!(verify_path(info, std::slice::from_ref(&ours_pk)).is_err(), "wrong key accepted");
        let mut bad_hash = info.clone();
        bad_hash.nar_hash = NarHash([9; 32]);
        assert!(verify_path(&bad_hash, std::slice::from_ref(&nix_pk)).is_err(), "changed hash accepted");
        let mut bad_refs = info.clone();
        bad_refs.references.insert(infos[0].path.clone());
        bad_refs.references.insert(infos[1].path.clone());
        if bad_refs.references != info.references {
            assert!(verify_path(&bad_refs, std::slice::from_ref(&nix_pk)).is_err(), "changed refs accepted");
        }
    }

    // We sign; Nix verifies our signature from a binary cache whose narinfo carries it.
    let cache = tmp.path().join("cache");
    run(Command::new("nix")
        .args(["copy", "--to"])
        .arg(format!("file://{}", cache.display()))
        .arg(system.to_absolute()));
    let mut top = infos.iter().find(|i| i.path == system).expect("top").clone();
    top.signatures.clear();
    ours_sk.sign_path(&mut top);
    let narinfo = cache.join(format!("{}.narinfo", system.digest()));
    let text = fs::read_to_string(&narinfo).expect("narinfo");
    let text: String = text.lines().filter(|l| !l.starts_with("Sig:")).map(|l| format!("{l}\n")).collect();
    fs::write(&narinfo, format!("{text}Sig: {}\n", top.signatures[0])).expect("write narinfo");
    let verify = |key: &str| {
        Command::new("nix")
            .args(["store", "verify", "--no-contents", "--store"])
            .arg(format!("file://{}", cache.display()))
            .args(["--trusted-public-keys", key, "--sigs-needed", "1"])
            .arg(system.to_absolute())
            .status()
            .expect("nix store verify")
            .success()
    };
    assert!(verify(&ours_pk_text), "nix store verify refused our signature");
    assert!(!verify(&nix_pk.to_string()), "nix store verify accepted a signature by another key");
}

#[test]
fn closure_imported_by_us_verifies_in_a_chroot_store() {
    let tmp = tempfile::tempdir().expect("tmp");
    let system = build_closure(&salt());
    let host = LocalStore::system();
    let infos =
        sort_dependencies_first(host.path_infos(std::slice::from_ref(&system), true).expect("infos")).expect("sorted");
    assert_eq!(infos.len(), 3);
    assert_eq!(infos.last().map(|i| &i.path), Some(&system), "dependencies first");

    let dev = LocalStore::chroot(tmp.path().join("dev"));
    let all: Vec<StorePath> = infos.iter().map(|i| i.path.clone()).collect();
    assert_eq!(dev.invalid_paths(&all).expect("validity"), all, "empty store lacks everything");

    // Send only what is missing; import the first path alone, then the rest.
    let nar_of = |info: &PathInfo| -> Box<dyn std::io::Read> {
        let mut buf = Vec::new();
        host.dump(&info.path, &mut buf).expect("dump");
        Box::new(std::io::Cursor::new(buf))
    };
    dev.import([(&infos[0], nar_of(&infos[0]))]).expect("import first");
    let lacking = dev.invalid_paths(&all).expect("validity");
    assert_eq!(lacking, all[1..].to_vec());
    let rest: Vec<&PathInfo> = infos.iter().filter(|i| lacking.contains(&i.path)).collect();
    dev.import(rest.iter().map(|i| (*i, nar_of(i)))).expect("import rest");
    assert!(dev.invalid_paths(&all).expect("validity").is_empty());

    let root = tmp.path().join("dev").to_str().expect("utf8").to_owned();
    run(Command::new("nix-store").args(["--store", &root, "--verify", "--check-contents"]));
    let refs = nix_store(&["--store", &root, "-q", "--references", &system.to_absolute()]);
    assert!(refs.contains("test-app"), "references lost: {refs}");
    let imported = dev.path_infos(std::slice::from_ref(&system), true).expect("infos");
    let mut imported = sort_dependencies_first(imported).expect("sorted");
    for (a, b) in imported.iter_mut().zip(&infos) {
        assert_eq!(
            (&a.path, &a.nar_hash, a.nar_size, &a.references),
            (&b.path, &b.nar_hash, b.nar_size, &b.references)
        );
    }
}

#[test]
fn import_refuses_a_nar_of_the_wrong_size() {
    let tmp = tempfile::tempdir().expect("tmp");
    let system = build_closure(&salt());
    let host = LocalStore::system();
    let infos = sort_dependencies_first(host.path_infos(&[system], true).expect("infos")).expect("sorted");
    let dev = LocalStore::chroot(tmp.path().join("dev"));
    let mut lying = infos[0].clone();
    lying.nar_size += 8;
    let mut buf = Vec::new();
    host.dump(&infos[0].path, &mut buf).expect("dump");
    assert!(dev.import([(&lying, Box::new(buf.as_slice()) as Box<dyn std::io::Read>)]).is_err());
    assert_eq!(dev.invalid_paths(&[infos[0].path.clone()]).expect("validity").len(), 1, "a bad path was registered");
}

struct BundleFixture {
    _tmp: tempfile::TempDir,
    scratch: PathBuf,
    bytes: Vec<u8>,
    identity: PublicKey,
    identity_secret: SecretKey,
    nix_key: PublicKey,
    infos: Vec<PathInfo>,
}

fn bundle_fixture() -> BundleFixture {
    let tmp = tempfile::tempdir().expect("tmp");
    let system = build_closure(&salt());
    let host = LocalStore::system();
    let mut infos =
        sort_dependencies_first(host.path_infos(std::slice::from_ref(&system), true).expect("infos")).expect("sorted");
    let nix_sk = SecretKey::generate("thymis-test-1").expect("key");
    for i in &mut infos {
        nix_sk.sign_path(i);
    }
    let identity = SecretKey::generate("thymis-identity-1").expect("key");
    let manifest = Manifest {
        format: 0,
        target: Target::Device("dev1".into()),
        system,
        commit: Some("abc".into()),
        sequence: 7,
        expires: None,
        created: 1_700_000_000,
        paths: vec![],
        secrets: None,
    };
    let scratch = tmp.path().to_owned();
    let bytes = bundle::write(Vec::new(), manifest, &identity, &host, &infos, &scratch).expect("write bundle");
    BundleFixture {
        scratch,
        bytes,
        identity: identity.public(),
        identity_secret: identity,
        nix_key: nix_sk.public(),
        infos,
        _tmp: tmp,
    }
}

fn everything(m: &Manifest) -> Result<HashSet<StorePath>, BundleError> {
    Ok(m.paths.iter().map(|p| p.path.clone()).collect())
}

#[test]
fn bundle_roundtrip_imports_into_a_device_store() {
    let f = bundle_fixture();
    let (manifest, verified) = bundle::read(
        f.bytes.as_slice(),
        std::slice::from_ref(&f.identity),
        std::slice::from_ref(&f.nix_key),
        &f.scratch,
        everything,
    )
    .expect("read bundle");
    assert_eq!(manifest.sequence, 7);
    assert_eq!(manifest.target, Target::Device("dev1".into()));
    assert_eq!(verified.len(), 3);
    let dev = LocalStore::chroot(f.scratch.join("dev"));
    dev.import(verified.iter().map(|v| (&v.info, Box::new(&v.nar) as Box<dyn std::io::Read>))).expect("import");
    let all: Vec<StorePath> = f.infos.iter().map(|i| i.path.clone()).collect();
    assert!(dev.invalid_paths(&all).expect("validity").is_empty());

    // Only what the device lacks is unpacked.
    let (_, partial) = bundle::read(
        f.bytes.as_slice(),
        std::slice::from_ref(&f.identity),
        std::slice::from_ref(&f.nix_key),
        &f.scratch,
        |_| Ok([all[2].clone()].into()),
    )
    .expect("read");
    assert_eq!(partial.iter().map(|v| &v.info.path).collect::<Vec<_>>(), vec![&all[2]]);
}

#[test]
fn tampered_bundles_are_refused() {
    let f = bundle_fixture();
    let read = |bytes: &[u8], id: &PublicKey, nix: &PublicKey| {
        bundle::read(bytes, std::slice::from_ref(id), std::slice::from_ref(nix), &f.scratch, everything).map(|_| ())
    };
    let other = SecretKey::generate("thymis-identity-1").expect("key").public();
    assert!(matches!(read(&f.bytes, &other, &f.nix_key), Err(BundleError::BadManifestSignature)));
    let other_nix = SecretKey::generate("thymis-test-1").expect("key").public();
    assert!(matches!(read(&f.bytes, &f.identity, &other_nix), Err(BundleError::Signature(_))));

    // One byte of the manifest changed: the signature no longer holds.
    let mut m = f.bytes.clone();
    let at = find(&m, b"\"sequence\": 7").expect("sequence in manifest") + 12;
    m[at] = b'9';
    assert!(matches!(read(&m, &f.identity, &f.nix_key), Err(BundleError::BadManifestSignature)));

    // A corrupted compressed NAR is caught before anything is handed out.
    let mut n = f.bytes.clone();
    let nar_at = find(&n, b"nar/").expect("nar entry");
    let data_at = (nar_at / 512 + 1) * 512 + 20;
    n[data_at] ^= 0xff;
    assert!(read(&n, &f.identity, &f.nix_key).is_err());

    // A hostile entry name where a path info belongs.
    let mut h = f.bytes.clone();
    let info_at = find(&h, b"info/").expect("info entry");
    h[info_at..info_at + 5].copy_from_slice(b"../..");
    assert!(read(&h, &f.identity, &f.nix_key).is_err());

    // Cut short.
    assert!(read(&f.bytes[..f.bytes.len() / 2], &f.identity, &f.nix_key).is_err());

    // The identity key's signature over the bare manifest (what it might sign in
    // another context) does not make a bundle.
    let (json_at, json_len) = tar_entry(&f.bytes, "manifest.json");
    let (sig_at, sig_len) = tar_entry(&f.bytes, "manifest.sig");
    let bare = f.identity_secret.sign(&f.bytes[json_at..json_at + json_len]);
    assert_eq!(bare.len(), sig_len);
    let mut b = f.bytes.clone();
    b[sig_at..sig_at + sig_len].copy_from_slice(bare.as_bytes());
    assert!(
        matches!(read(&b, &f.identity, &f.nix_key), Err(BundleError::Format(1))),
        "a context-free signature passed"
    );
}

/// Where a tar entry's data starts, and its size.
fn tar_entry(tar: &[u8], name: &str) -> (usize, usize) {
    let mut at = 0;
    while at + 512 <= tar.len() {
        let header = &tar[at..at + 512];
        let size_field = std::str::from_utf8(&header[124..136]).expect("size").trim_matches(['\0', ' ']);
        let size = usize::from_str_radix(size_field, 8).unwrap_or(0);
        if header.starts_with(name.as_bytes()) && header[name.len()] == 0 {
            return (at + 512, size);
        }
        at += 512 + size.div_ceil(512) * 512;
    }
    panic!("no {name} in the bundle");
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[test]
fn a_store_names_the_versions_it_has_of_the_paths_it_lacks() {
    let tmp = tempfile::tempdir().expect("tmp");
    let store = LocalStore::chroot(tmp.path());
    let v1 = build_closure(&salt());
    let v2 = build_closure(&salt());
    let closure = |top: &StorePath| -> Vec<StorePath> {
        nix_store(&["-qR", &top.to_absolute()]).lines().map(|l| l.parse().expect("path")).collect()
    };
    // An empty store (not even a directory yet) lacks everything and has no bases.
    let (missing, bases) = store.missing_with_bases(&closure(&v2), None).expect("query");
    assert_eq!(missing.len(), 3);
    assert!(bases.is_empty());
    // With version 1 in it, each path of version 2 has its version 1 as base.
    run(Command::new("nix").args(["copy", "--no-check-sigs", "--to"]).arg(tmp.path()).arg(v1.to_absolute()));
    let (missing, bases) = store.missing_with_bases(&closure(&v2), Some(&v1)).expect("query");
    assert_eq!(missing, closure(&v2));
    let v1_paths = closure(&v1);
    assert_eq!(bases.len(), 3, "{bases:?}");
    for (want, have) in &bases {
        assert_eq!(want.name(), have.name());
        assert!(v1_paths.contains(have), "{have} is not a path the store has");
    }
    // A directory entry that is not a valid path is no base.
    fs::create_dir_all(tmp.path().join("nix/store/00000000000000000000000000000000-test-app")).expect("mkdir");
    let (_, bases) = store.missing_with_bases(&closure(&v2), None).expect("query");
    assert!(bases.iter().all(|(_, have)| v1_paths.contains(have)), "{bases:?}");
}
