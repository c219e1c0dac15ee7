//! Decoder strictness against hand-made hostile archives, and round trips.

use std::collections::BTreeMap;
use std::path::Path;

use proptest::prelude::*;

use super::*;

/// Builds NAR bytes from tokens; `Len(n)` writes a raw length without data.
enum T<'a> {
    S(&'a [u8]),
    Len(u64),
}

fn nar(tokens: &[T]) -> Vec<u8> {
    let mut out = Vec::new();
    for t in tokens {
        match t {
            T::S(s) => encode_str(&mut out, s).expect("vec"),
            T::Len(n) => out.extend_from_slice(&n.to_le_bytes()),
        }
    }
    out
}

fn s(x: &str) -> T<'_> {
    T::S(x.as_bytes())
}

/// A directory NAR with the given entry names, each an empty file.
fn dir_with(names: &[&[u8]]) -> Vec<u8> {
    let mut toks = vec![s("nix-archive-1"), s("("), s("type"), s("directory")];
    for n in names {
        toks.extend([s("entry"), s("("), s("name"), T::S(n), s("node")]);
        toks.extend([s("("), s("type"), s("regular"), s("contents"), s(""), s(")"), s(")")]);
    }
    toks.push(s(")"));
    nar(&toks)
}

fn sample() -> Node {
    let mut d = BTreeMap::new();
    d.insert(b"bin".to_vec(), Node::File { executable: true, contents: b"#!/bin/sh\n".to_vec() });
    d.insert(b"link".to_vec(), Node::Symlink { target: b"bin".to_vec() });
    d.insert(b"sub".to_vec(), Node::Directory(BTreeMap::new()));
    Node::Directory(d)
}

#[test]
fn hostile_entry_names_are_refused() {
    for name in [&b"a/b"[..], b".", b"..", b"a\0b", b""] {
        let err = decode(dir_with(&[name]).as_slice(), &mut ()).expect_err("hostile name accepted");
        assert!(matches!(err, NarError::BadEntryName { .. }), "{name:?}: {err}");
    }
}

#[test]
fn unsorted_and_duplicate_entries_are_refused() {
    for names in [&[&b"b"[..], b"a"][..], &[b"a", b"a"]] {
        let err = decode(dir_with(names).as_slice(), &mut ()).expect_err("accepted");
        assert!(matches!(err, NarError::Unsorted { .. }), "{err}");
    }
    decode(dir_with(&[b"A", b"B", b"a"]).as_slice(), &mut ()).expect("byte order is the order");
}

#[test]
fn every_truncation_is_refused() {
    let full = sample().to_nar();
    for cut in 0..full.len() {
        let err = decode(&full[..cut], &mut ()).expect_err("truncated accepted");
        assert!(matches!(err, NarError::Truncated { .. } | NarError::BadMagic), "cut {cut}: {err}");
    }
}

#[test]
fn trailing_bytes_bad_padding_and_bad_magic_are_refused() {
    let mut trailing = sample().to_nar();
    trailing.push(0);
    assert!(matches!(decode(trailing.as_slice(), &mut ()), Err(NarError::TrailingBytes { .. })));

    let mut padded = nar(&[s("nix-archive-1"), s("("), s("type"), s("regular"), s("contents"), s("x"), s(")")]);
    let contents_pad = padded.windows(8).position(|w| w == b"x\0\0\0\0\0\0\0").expect("x") + 1;
    padded[contents_pad] = 7;
    assert!(matches!(decode(padded.as_slice(), &mut ()), Err(NarError::BadPadding { .. })));

    let bad = nar(&[s("nix-archive-2")]);
    assert!(matches!(decode(bad.as_slice(), &mut ()), Err(NarError::BadMagic)));
}

#[test]
fn absurd_lengths_are_refused_before_allocating() {
    let huge_name =
        nar(&[s("nix-archive-1"), s("("), s("type"), s("directory"), s("entry"), s("("), s("name"), T::Len(1 << 40)]);
    assert!(matches!(decode(huge_name.as_slice(), &mut ()), Err(NarError::TooLong { what: "entry name", .. })));

    let huge_file = nar(&[s("nix-archive-1"), s("("), s("type"), s("regular"), s("contents"), T::Len(1 << 62)]);
    let limits = DecodeLimits { max_nar_size: 1 << 20 };
    assert!(matches!(
        decode_with_limits(huge_file.as_slice(), &mut (), limits),
        Err(NarError::TooLong { what: "file contents", .. })
    ));
}

#[test]
fn nesting_is_bounded() {
    let mut node = Node::File { executable: false, contents: vec![] };
    for _ in 0..=MAX_DEPTH {
        node = Node::Directory([(b"d".to_vec(), node)].into());
    }
    assert!(matches!(decode(node.to_nar().as_slice(), &mut ()), Err(NarError::TooDeep)));
}

#[test]
fn restore_writes_only_inside_the_target() {
    let tmp = tempfile::tempdir().expect("tmp");
    let outside = tmp.path().join("outside");
    std::fs::create_dir(&outside).expect("outside");
    // A symlink pointing out, then an entry that tries to go through it: the second
    // entry repeats the name, which the decoder refuses before anything is created.
    let mut toks = vec![s("nix-archive-1"), s("("), s("type"), s("directory")];
    toks.extend([s("entry"), s("("), s("name"), s("a"), s("node"), s("("), s("type"), s("symlink")]);
    let target = outside.to_str().expect("utf8").to_owned();
    toks.extend([s("target"), T::S(target.as_bytes()), s(")"), s(")")]);
    toks.extend([s("entry"), s("("), s("name"), s("a"), s("node"), s("("), s("type"), s("directory")]);
    toks.extend([s("entry"), s("("), s("name"), s("evil"), s("node")]);
    toks.extend([s("("), s("type"), s("regular"), s("contents"), s("pwned"), s(")"), s(")"), s(")"), s(")"), s(")")]);
    let dest = tmp.path().join("dest");
    assert!(restore(nar(&toks).as_slice(), &dest, DecodeLimits::default()).is_err());
    assert_eq!(std::fs::read_dir(&outside).expect("ls").count(), 0, "wrote outside the target");

    // An existing target is never written into.
    assert!(matches!(
        restore(sample().to_nar().as_slice(), &outside, DecodeLimits::default()),
        Err(NarError::TargetExists(_))
    ));
}

#[test]
fn copy_verified_checks_hash_and_size() {
    let bytes = sample().to_nar();
    let (hash, size) = decode(bytes.as_slice(), &mut ()).expect("valid");
    let mut out = Vec::new();
    copy_verified(bytes.as_slice(), &mut out, &hash, size).expect("verified");
    assert_eq!(out, bytes);
    let wrong = crate::hash::NarHash([1; 32]);
    assert!(matches!(
        copy_verified(bytes.as_slice(), &mut Vec::new(), &wrong, size),
        Err(NarError::HashMismatch { .. })
    ));
    assert!(matches!(copy_verified(bytes.as_slice(), &mut Vec::new(), &hash, size - 8), Err(NarError::TooLong { .. })));
}

fn arb_name() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 1..6).prop_filter("valid name", |n| {
        n.as_slice() != b"." && n.as_slice() != b".." && !n.contains(&b'/') && !n.contains(&0)
    })
}

fn arb_node() -> impl Strategy<Value = Node> {
    let leaf = prop_oneof![
        (any::<bool>(), proptest::collection::vec(any::<u8>(), 0..40))
            .prop_map(|(executable, contents)| Node::File { executable, contents }),
        proptest::collection::vec(1u8..=255, 1..20).prop_map(|target| Node::Symlink { target }),
    ];
    leaf.prop_recursive(4, 32, 5, |inner| {
        proptest::collection::btree_map(arb_name(), inner, 0..5).prop_map(Node::Directory)
    })
}

proptest! {
    #[test]
    fn decode_inverts_encode(node in arb_node()) {
        let bytes = node.to_nar();
        let mut tb = TreeBuilder::default();
        let (_, size) = decode(bytes.as_slice(), &mut tb).expect("own output decodes");
        prop_assert_eq!(size, bytes.len() as u64);
        prop_assert_eq!(tb.root, Some(node));
    }

    #[test]
    fn restore_then_encode_is_identity(node in arb_node()) {
        let tmp = tempfile::tempdir().expect("tmp");
        let dest = tmp.path().join("t");
        let bytes = node.to_nar();
        restore(bytes.as_slice(), &dest, DecodeLimits::default()).expect("restore");
        let mut again = Vec::new();
        encode_path(Path::new(&dest), &mut again).expect("encode");
        prop_assert_eq!(again, bytes);
    }

    #[test]
    fn decoder_never_panics_on_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode(bytes.as_slice(), &mut ());
    }
}
