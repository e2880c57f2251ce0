use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;

use proptest::prelude::*;
use sha2::{Digest, Sha256};

use super::writer::write_str;
use super::*;
use crate::nix::hash::Sha256Digest;
use crate::nix::narinfo::NarInfo;

const TREE_NAR: &[u8] = include_bytes!("../testdata/tree.nar");
const EXEC_FILE_NAR: &[u8] = include_bytes!("../testdata/exec-file.nar");
const SYMLINK_NAR: &[u8] = include_bytes!("../testdata/symlink.nar");

/// The tree `testdata/regen.sh` dumps with `nix-store --dump`; keep the two in sync.
fn build_sample_tree(dir: &Path) {
    fs::create_dir_all(dir.join("sub")).unwrap();
    fs::write(dir.join("hello.txt"), "hello\n").unwrap();
    fs::write(dir.join("run.sh"), "#!/bin/sh\necho hi\n").unwrap();
    fs::set_permissions(dir.join("run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(dir.join("hello.txt"), fs::Permissions::from_mode(0o644)).unwrap();
    symlink("hello.txt", dir.join("link")).unwrap();
    fs::write(dir.join("sub/empty"), "").unwrap();
    fs::set_permissions(dir.join("sub/empty"), fs::Permissions::from_mode(0o644)).unwrap();
    symlink("../hello.txt", dir.join("sub/up")).unwrap();
}

fn dump(path: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    dump_path(path, &mut out).unwrap();
    out
}

fn summary_of(nar: &[u8]) -> NarSummary {
    NarSummary {
        nar_hash: Sha256Digest::from_bytes(Sha256::digest(nar).into()),
        nar_size: nar.len() as u64,
    }
}

fn check_null(nar: &[u8]) -> Result<NarSummary, NarError> {
    unpack(nar, &mut NullSink, &NarLimits::default())
}

#[test]
fn dump_matches_nix_store_dump() {
    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("tree");
    build_sample_tree(&tree);
    assert_eq!(dump(&tree), TREE_NAR);
    assert_eq!(dump(&tree.join("run.sh")), EXEC_FILE_NAR);
    assert_eq!(dump(&tree.join("link")), SYMLINK_NAR);

    // The hash Nix put in the narinfo and printed with nix-hash.
    let info = NarInfo::parse(include_str!("../testdata/tree.narinfo")).unwrap();
    let summary = nar_hash_path(&tree).unwrap();
    summary.check(info.nar_hash(), info.nar_size()).unwrap();
    assert_eq!(summary, summary_of(TREE_NAR));
    let nix_hash = include_str!("../testdata/hashes.txt")
        .lines()
        .find_map(|l| l.strip_suffix(" tree-nar-hash"))
        .unwrap();
    assert_eq!(
        summary.nar_hash.to_nix32_string(),
        format!("sha256:{nix_hash}")
    );
}

#[test]
fn dump_rejects_special_files() {
    let tmp = tempfile::tempdir().unwrap();
    let sock = tmp.path().join("sock");
    let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let err = dump_path(&sock, &mut Vec::new()).unwrap_err();
    assert!(err.to_string().contains("sock"), "{err}");
    let err = dump_path(&tmp.path().join("missing"), &mut Vec::new()).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::NotFound);
    assert!(err.to_string().contains("missing"), "{err}");
}

#[test]
fn unpack_real_nars_round_trips() {
    let tmp = tempfile::tempdir().unwrap();
    for (i, nar) in [TREE_NAR, EXEC_FILE_NAR, SYMLINK_NAR]
        .into_iter()
        .enumerate()
    {
        let out = tmp.path().join(format!("out{i}"));
        let limits = NarLimits::with_max_size(nar.len() as u64);
        let summary = unpack(nar, &mut DirSink::new(&out), &limits).unwrap();
        assert_eq!(summary, summary_of(nar));
        assert_eq!(check_null(nar).unwrap(), summary);
        assert_eq!(dump(&out), nar);
    }
    let tree = tmp.path().join("out0");
    let mode = |p: &str| fs::metadata(tree.join(p)).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode("run.sh") & 0o100, 0o100);
    assert_eq!(mode("hello.txt") & 0o111, 0);
    assert_eq!(
        fs::read_link(tree.join("sub/up")).unwrap(),
        Path::new("../hello.txt")
    );
    assert_eq!(fs::read(tree.join("hello.txt")).unwrap(), b"hello\n");
    assert!(
        fs::symlink_metadata(tmp.path().join("out2"))
            .unwrap()
            .is_symlink()
    );
}

#[test]
fn dir_sink_never_overwrites() {
    let tmp = tempfile::tempdir().unwrap();
    for nar in [TREE_NAR, EXEC_FILE_NAR, SYMLINK_NAR] {
        let err = unpack(nar, &mut DirSink::new(tmp.path()), &NarLimits::default()).unwrap_err();
        match err {
            NarError::Io { path, source } => {
                assert_eq!(path, tmp.path());
                assert_eq!(source.kind(), io::ErrorKind::AlreadyExists);
            }
            other => panic!("{other}"),
        }
    }
    let err = unpack(
        TREE_NAR,
        &mut DirSink::new(tmp.path().join("a/b")),
        &NarLimits::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("/a/b"), "{err}");
}

#[test]
fn summary_check_reports_mismatches() {
    let s = summary_of(TREE_NAR);
    s.check(&s.nar_hash, s.nar_size).unwrap();
    let other = summary_of(b"x").nar_hash;
    assert!(matches!(
        s.check(&other, s.nar_size),
        Err(NarError::HashMismatch { .. })
    ));
    assert!(matches!(
        s.check(&s.nar_hash, 1),
        Err(NarError::SizeMismatch {
            expected: 1,
            actual: 1288
        })
    ));
}

#[test]
fn errors_can_cross_threads() {
    fn assert_send_sync<T: Send + Sync + 'static + std::error::Error>() {}
    assert_send_sync::<NarError>();
}

/// A NAR as a list of strings (contents are strings too), written without any checks.
fn nar(tokens: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for t in tokens {
        write_str(&mut out, t).unwrap();
    }
    out
}

fn file_nar(contents: &[u8]) -> Vec<u8> {
    nar(&[
        b"nix-archive-1",
        b"(",
        b"type",
        b"regular",
        b"contents",
        contents,
        b")",
    ])
}

/// A directory NAR with the given entries (each a symlink to "t"), in the given order.
fn dir_nar(names: &[&[u8]]) -> Vec<u8> {
    let mut t: Vec<&[u8]> = vec![b"nix-archive-1", b"(", b"type", b"directory"];
    for name in names {
        t.extend([&b"entry"[..], b"(", b"name", name, b"node"]);
        t.extend([&b"("[..], b"type", b"symlink", b"target", b"t", b")", b")"]);
    }
    t.push(b")");
    nar(&t)
}

fn symlink_nar(target: &[u8]) -> Vec<u8> {
    nar(&[
        b"nix-archive-1",
        b"(",
        b"type",
        b"symlink",
        b"target",
        target,
        b")",
    ])
}

#[test]
fn accepts_minimal_forms() {
    check_null(&file_nar(b"")).unwrap();
    check_null(&nar(&[
        b"nix-archive-1",
        b"(",
        b"type",
        b"regular",
        b"executable",
        b"",
        b"contents",
        b"x",
        b")",
    ]))
    .unwrap();
    check_null(&dir_nar(&[])).unwrap();
    check_null(&dir_nar(&[b"a", b"b", b"\xff"])).unwrap();
    check_null(&dir_nar(&[&[b'n'; 255]])).unwrap();
    check_null(&dir_nar(&[b"..."])).unwrap();
    check_null(&symlink_nar(&[b'x'; 4096])).unwrap();
}

#[test]
fn rejects_bad_magic() {
    let mut bad = file_nar(b"x");
    bad[8 + 12] = b'2';
    assert!(
        matches!(check_null(&bad), Err(NarError::BadMagic { found }) if found.contains("nix-archive-2"))
    );
    let bad = nar(&[b"nix-archive-10", b"("]);
    assert!(matches!(check_null(&bad), Err(NarError::BadMagic { .. })));
    // An xz file is not a NAR; its first 8 bytes are a huge length that must not be read.
    let xz = b"\xfd7zXZ\x00\x00\x04\xe6\xd6\xb4\x46";
    assert!(matches!(check_null(xz), Err(NarError::BadMagic { .. })));
    assert!(matches!(
        check_null(b""),
        Err(NarError::Truncated { offset: 0, .. })
    ));
}

#[test]
fn rejects_bad_padding() {
    // "hello" is 5 bytes, followed by 3 padding bytes before ")".
    let good = file_nar(b"hello");
    let at = good.len() - 16 - 1;
    assert_eq!(&good[at - 7..at + 1], b"hello\0\0\0");
    let mut bad = good.clone();
    bad[at] = 1;
    assert!(matches!(check_null(&bad), Err(NarError::BadPadding { .. })));
    // Padding of a keyword token.
    let mut bad = good;
    bad[8 + 16 + 8 + 1] = b' ';
    assert!(matches!(
        check_null(&bad),
        Err(NarError::BadPadding { offset: 33, .. })
    ));
}

#[test]
fn rejects_entries_out_of_order() {
    for names in [
        &[&b"b"[..], b"a"][..],
        &[b"a", b"a"],
        &[b"a", b"c", b"b"],
        &[b"\xff", b"a"],
    ] {
        let err = check_null(&dir_nar(names)).unwrap_err();
        assert!(
            matches!(err, NarError::NotAscending { .. }),
            "{names:?}: {err}"
        );
    }
}

#[test]
fn rejects_bad_names() {
    let long = [b'n'; 256];
    for (name, reason) in [
        (&b""[..], "empty"),
        (b".", "a relative directory"),
        (b"..", "a relative directory"),
        (b"a/b", "contains '/'"),
        (b"/", "contains '/'"),
        (b"a\0b", "contains NUL"),
        (&long, "longer than 255 bytes"),
    ] {
        match check_null(&dir_nar(&[name])) {
            Err(NarError::BadName { reason: r, .. }) => assert_eq!(r, reason, "{name:?}"),
            other => panic!("{name:?}: {other:?}"),
        }
    }
}

#[test]
fn rejects_bad_symlink_targets() {
    for (target, reason) in [
        (&b""[..], "empty"),
        (b"a\0b", "contains NUL"),
        (&[b'x'; 4097], "longer than 4096 bytes"),
    ] {
        match check_null(&symlink_nar(target)) {
            Err(NarError::BadSymlinkTarget { reason: r, .. }) => assert_eq!(r, reason),
            other => panic!("{target:?}: {other:?}"),
        }
    }
}

fn nested_nar(depth: usize) -> Vec<u8> {
    let mut t: Vec<&[u8]> = vec![b"nix-archive-1"];
    for _ in 0..depth {
        t.extend([
            &b"("[..],
            b"type",
            b"directory",
            b"entry",
            b"(",
            b"name",
            b"d",
            b"node",
        ]);
    }
    t.extend([&b"("[..], b"type", b"regular", b"contents", b"x", b")"]);
    for _ in 0..depth {
        t.extend([&b")"[..], b")"]);
    }
    nar(&t)
}

#[test]
fn enforces_max_depth() {
    let limits = |max_depth| NarLimits {
        max_depth,
        ..NarLimits::default()
    };
    unpack(&nested_nar(4)[..], &mut NullSink, &limits(4)).unwrap();
    match unpack(&nested_nar(5)[..], &mut NullSink, &limits(4)) {
        Err(NarError::TooDeep { path, max: 4 }) => assert_eq!(path, "/d/d/d/d/d"),
        other => panic!("{other:?}"),
    }
    check_null(&nested_nar(DEFAULT_MAX_DEPTH)).unwrap();
    assert!(matches!(
        check_null(&nested_nar(DEFAULT_MAX_DEPTH + 1)),
        Err(NarError::TooDeep { .. })
    ));
}

#[test]
fn enforces_max_size() {
    let n = TREE_NAR.len() as u64;
    unpack(TREE_NAR, &mut NullSink, &NarLimits::with_max_size(n)).unwrap();
    for max in [0, 1, 100, n - 1] {
        let err = unpack(TREE_NAR, &mut NullSink, &NarLimits::with_max_size(max)).unwrap_err();
        assert!(
            matches!(err, NarError::TooLarge { max: m, .. } if m == max),
            "{max}: {err}"
        );
    }
    // A file claiming more bytes than the limit allows fails before its contents are read,
    // even though the input ends right there.
    let mut huge = nar(&[b"nix-archive-1", b"(", b"type", b"regular", b"contents"]);
    huge.extend((1u64 << 40).to_le_bytes());
    let err = unpack(&huge[..], &mut NullSink, &NarLimits::with_max_size(1 << 20)).unwrap_err();
    assert!(matches!(err, NarError::TooLarge { .. }), "{err}");
    // Same when the claimed size overflows u64 arithmetic.
    let mut huge = nar(&[b"nix-archive-1", b"(", b"type", b"regular", b"contents"]);
    huge.extend(u64::MAX.to_le_bytes());
    let err = unpack(&huge[..], &mut NullSink, &NarLimits::with_max_size(1 << 20)).unwrap_err();
    assert!(matches!(err, NarError::TooLarge { .. }), "{err}");
}

#[test]
fn rejects_every_truncation() {
    let tmp = tempfile::tempdir().unwrap();
    for len in 0..TREE_NAR.len() {
        let err = check_null(&TREE_NAR[..len]).unwrap_err();
        assert!(matches!(err, NarError::Truncated { .. }), "{len}: {err}");
        // Truncation inside file contents is reported as such by DirSink too, not as I/O.
        let out = tmp.path().join(len.to_string());
        let err = unpack(
            &TREE_NAR[..len],
            &mut DirSink::new(out),
            &NarLimits::default(),
        )
        .unwrap_err();
        assert!(matches!(err, NarError::Truncated { .. }), "{len}: {err}");
    }
}

#[test]
fn rejects_trailing_data() {
    let n = TREE_NAR.len() as u64;
    for extra in [&b"\0"[..], &[0; 8], b"nix-archive-1"] {
        let input = [TREE_NAR, extra].concat();
        for limits in [NarLimits::default(), NarLimits::with_max_size(n)] {
            let err = unpack(&input[..], &mut NullSink, &limits).unwrap_err();
            assert!(
                matches!(err, NarError::TrailingData { offset } if offset == n),
                "{err}"
            );
        }
    }
}

#[test]
fn rejects_unknown_tokens() {
    let cases: &[&[&[u8]]] = &[
        &[
            b"nix-archive-1",
            b"[",
            b"type",
            b"regular",
            b"contents",
            b"",
            b")",
        ],
        &[
            b"nix-archive-1",
            b"(",
            b"kind",
            b"regular",
            b"contents",
            b"",
            b")",
        ],
        &[b"nix-archive-1", b"(", b"type", b"fifo", b")"],
        &[
            b"nix-archive-1",
            b"(",
            b"type",
            b"regular",
            b"content",
            b"",
            b")",
        ],
        &[
            b"nix-archive-1",
            b"(",
            b"type",
            b"regular",
            b"executable",
            b"x",
            b"contents",
            b"",
            b")",
        ],
        &[
            b"nix-archive-1",
            b"(",
            b"type",
            b"regular",
            b"contents",
            b"",
            b"executable",
            b"",
            b")",
        ],
        &[
            b"nix-archive-1",
            b"(",
            b"type",
            b"regular",
            b"contents",
            b"",
            b"]",
        ],
        &[
            b"nix-archive-1",
            b"(",
            b"type",
            b"symlink",
            b"link",
            b"t",
            b")",
        ],
        &[
            b"nix-archive-1",
            b"(",
            b"type",
            b"directory",
            b"entri",
            b")",
        ],
        &[
            b"nix-archive-1",
            b"(",
            b"type",
            b"directory",
            b"entry",
            b"(",
            b"nam",
            b"a",
            b")",
            b")",
        ],
        &[
            b"nix-archive-1",
            b"(",
            b"type",
            b"a-very-long-token-indeed",
            b")",
        ],
    ];
    for tokens in cases {
        let err = check_null(&nar(tokens)).unwrap_err();
        assert!(
            matches!(err, NarError::UnexpectedToken { .. }),
            "{tokens:?}: {err}"
        );
    }
    let err = check_null(&nar(cases[2])).unwrap_err();
    assert_eq!(
        err.to_string(),
        "nar has unexpected \"fifo\" at byte 56 in entry / \
         (expected \"regular\", \"symlink\" or \"directory\")"
    );
}

#[test]
fn error_paths_name_the_entry() {
    let t: &[&[u8]] = &[
        b"nix-archive-1",
        b"(",
        b"type",
        b"directory",
        b"entry",
        b"(",
        b"name",
        b"sub",
        b"node",
        b"(",
        b"type",
        b"directory",
        b"entry",
        b"(",
        b"name",
        b"l\xffnk",
        b"node",
        b"(",
        b"type",
        b"symlink",
        b"target",
        b"",
        b")",
        b")",
        b")",
        b")",
        b")",
    ];
    let err = check_null(&nar(t)).unwrap_err();
    assert_eq!(
        err.to_string(),
        "nar symlink /sub/l\u{fffd}nk has an invalid target: empty"
    );
}

/// Reads only part of each file.
struct LazySink;
impl NarSink for LazySink {
    fn create_directory(&mut self, _: &NarPath) -> Result<(), NarError> {
        Ok(())
    }
    fn create_file(
        &mut self,
        _: &NarPath,
        _: bool,
        _: u64,
        c: &mut dyn Read,
    ) -> Result<(), NarError> {
        c.read_exact(&mut [0u8; 2]).unwrap();
        Ok(())
    }
    fn create_symlink(&mut self, _: &NarPath, _: &[u8]) -> Result<(), NarError> {
        Ok(())
    }
}

#[test]
fn sink_must_consume_files() {
    let err = unpack(
        &file_nar(b"hello")[..],
        &mut LazySink,
        &NarLimits::default(),
    )
    .unwrap_err();
    assert!(
        matches!(err, NarError::FileNotConsumed { remaining: 3, .. }),
        "{err}"
    );
}

/// Fails with a non-EOF error after `ok` bytes.
struct FailingReader<'a> {
    data: &'a [u8],
    ok: usize,
}
impl Read for FailingReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.ok == 0 {
            return Err(io::Error::other("connection reset"));
        }
        let n = buf.len().min(self.ok).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        self.ok -= n;
        Ok(n)
    }
}

#[test]
fn source_errors_are_reported_as_such() {
    let tmp = tempfile::tempdir().unwrap();
    for ok in [0, 10, 200, 400, 1000] {
        let input = FailingReader { data: TREE_NAR, ok };
        let err = unpack(input, &mut NullSink, &NarLimits::default()).unwrap_err();
        assert!(matches!(&err, NarError::Source { .. }), "{ok}: {err}");
        let input = FailingReader { data: TREE_NAR, ok };
        let out = tmp.path().join(ok.to_string());
        let err = unpack(input, &mut DirSink::new(out), &NarLimits::default()).unwrap_err();
        assert!(err.to_string().contains("connection reset"), "{ok}: {err}");
    }
}

#[test]
fn hashing_reader_limit() {
    let mut r = HashingReader::with_limit(&b"abcdef"[..], 6);
    let mut out = Vec::new();
    r.read_to_end(&mut out).unwrap();
    assert_eq!(r.summary(), summary_of(b"abcdef"));
    assert!(!r.limit_exceeded());

    let mut r = HashingReader::with_limit(&b"abcdefg"[..], 6);
    let err = r.read_to_end(&mut Vec::new()).unwrap_err();
    assert!(err.to_string().contains("limit of 6 bytes"), "{err}");
    assert!(r.limit_exceeded());
    assert_eq!(r.bytes_read(), 6);
}

// --- property tests -------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Node {
    File { executable: bool, contents: Vec<u8> },
    Symlink(Vec<u8>),
    Directory(Vec<(Vec<u8>, Node)>),
}

fn encode(node: &Node, out: &mut Vec<u8>) {
    let mut s = |t: &[u8]| write_str(out, t).unwrap();
    s(b"(");
    s(b"type");
    match node {
        Node::File {
            executable,
            contents,
        } => {
            s(b"regular");
            if *executable {
                s(b"executable");
                s(b"");
            }
            s(b"contents");
            s(contents);
        }
        Node::Symlink(target) => {
            s(b"symlink");
            s(b"target");
            s(target);
        }
        Node::Directory(entries) => {
            s(b"directory");
            for (name, child) in entries {
                for t in [&b"entry"[..], b"(", b"name", name, b"node"] {
                    write_str(out, t).unwrap();
                }
                encode(child, out);
                write_str(out, b")").unwrap();
            }
        }
    }
    write_str(out, b")").unwrap();
}

fn to_nar(node: &Node) -> Vec<u8> {
    let mut out = nar(&[b"nix-archive-1"]);
    encode(node, &mut out);
    out
}

fn arb_name() -> impl Strategy<Value = Vec<u8>> {
    let byte = any::<u8>().prop_filter("no / or NUL", |b| *b != 0 && *b != b'/');
    prop_oneof![
        4 => proptest::collection::vec(byte.clone(), 1..6),
        1 => proptest::collection::vec(byte, 250..=255),
    ]
    .prop_filter("not . or ..", |n| n != b"." && n != b"..")
}

fn arb_node() -> impl Strategy<Value = Node> {
    let target = proptest::collection::vec(1u8..=255, 1..40);
    let leaf = prop_oneof![
        (
            any::<bool>(),
            proptest::collection::vec(any::<u8>(), 0..600)
        )
            .prop_map(|(executable, contents)| Node::File {
                executable,
                contents
            }),
        target.prop_map(Node::Symlink),
    ];
    leaf.prop_recursive(4, 40, 6, |inner| {
        // A BTreeMap orders entries by name bytes and removes duplicates, as NARs require.
        proptest::collection::btree_map(arb_name(), inner, 0..6)
            .prop_map(|m| Node::Directory(m.into_iter().collect()))
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn random_trees_round_trip(node in arb_node()) {
        let nar = to_nar(&node);
        let summary = check_null(&nar).unwrap();
        prop_assert_eq!(summary, summary_of(&nar));

        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        let limits = NarLimits::with_max_size(nar.len() as u64);
        prop_assert_eq!(unpack(&nar[..], &mut DirSink::new(&out), &limits).unwrap(), summary);
        prop_assert_eq!(dump(&out), nar);
        prop_assert_eq!(nar_hash_path(&out).unwrap(), summary);
    }

    #[test]
    fn mutated_nars_never_panic(
        node in arb_node(),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut nar = to_nar(&node);
        for (at, byte) in edits {
            let i = at.index(nar.len());
            nar[i] = byte;
        }
        let _ = check_null(&nar);
        let _ = check_null(&nar[..cut.index(nar.len())]);
    }
}

#[test]
fn nar_path_display_and_fs_path() {
    let root = NarPath::root();
    assert!(root.is_root());
    assert_eq!(root.to_string(), "/");
    assert_eq!(root.to_relative_path(), Path::new(""));
    let p = root.child(b"sub").child(b"a\xffb");
    assert_eq!(p.depth(), 2);
    assert_eq!(p.to_string(), "/sub/a\u{fffd}b");
    assert_eq!(p.components(), [b"sub".to_vec(), b"a\xffb".to_vec()]);
    use std::os::unix::ffi::OsStrExt;
    assert_eq!(p.to_relative_path().as_os_str().as_bytes(), b"sub/a\xffb");
}
