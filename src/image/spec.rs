//! What a store path means as an image.
//!
//! A store path is an **image spec** when it is a regular file holding a JSON object with the
//! key `nixCriImage` (the format version, and the marker). Anything else — a directory, a
//! symlink, a file that is not JSON or has no marker — is a **plain path**.
//!
//! ```text
//! {
//!   "nixCriImage": 0,                      required; only 0 exists
//!   "config": {                            optional; OCI image-config fields, all optional
//!     "Entrypoint": ["/nix/store/…/bin/hello"],
//!     "Cmd": ["--greeting", "hi"],
//!     "Env": ["LANG=C.UTF-8"],             each NAME=VALUE
//!     "WorkingDir": "/tmp",                absolute
//!     "User": "1000:1000",                 uid, name, uid:gid, name:group
//!     "ExposedPorts": {"8080/tcp": {}},    port[/tcp|/udp|/sctp]
//!     "Labels": {"k": "v"},                not io.nix-cri.*
//!     "StopSignal": "SIGTERM"
//!   },
//!   "links": {                             optional; symlinks in the root image
//!     "/bin": "/nix/store/…-busybox/bin"
//!   }
//! }
//! ```
//! Unknown keys anywhere are refused. A link's path is absolute, has no `.`, `..` or empty
//! component, and is not `/`, `/nix`, `/nix/store`, `/proc`, `/sys`, `/dev` or under one of the
//! last four; no link lies under another. Its target is `/nix/store/<path>[/…]` with no `.`,
//! `..` or empty component, and `<path>` is in the spec's closure (so it is mounted).
//!
//! A plain path `P` gets the config `Env: ["PATH=P/bin"]` and no links.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;

use serde::Deserialize;

use super::error::{ImageError, io_err};
use crate::nix::{STORE_DIR, StorePath};
use crate::store::Store;

/// The only version of the spec format.
pub const SPEC_VERSION: u64 = 0;
/// The marker key.
pub const SPEC_MARKER: &str = "nixCriImage";
/// Specs larger than this are refused (a plain file this large is just a plain path).
pub const MAX_SPEC_SIZE: u64 = 1 << 20;
/// Label prefix reserved for nix-cri.
pub const RESERVED_LABEL_PREFIX: &str = "io.nix-cri.";

/// Paths where a link may not be, nor lie under.
const FORBIDDEN_ROOTS: [&str; 4] = [STORE_DIR, "/proc", "/sys", "/dev"];

/// The execution parameters of an image: the OCI image-config fields a spec may set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageConfig {
    pub entrypoint: Option<Vec<String>>,
    pub cmd: Option<Vec<String>>,
    pub env: Vec<String>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
    pub exposed_ports: BTreeSet<String>,
    pub labels: BTreeMap<String, String>,
    pub stop_signal: Option<String>,
}

/// Where an image's config came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpecKind {
    /// The top path is an image spec file.
    Spec,
    /// Any other store path.
    Plain,
}

/// A store path read as an image: its config and the symlinks of its root image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NixImageSpec {
    kind: SpecKind,
    config: ImageConfig,
    /// Absolute path in the container → absolute target in the store.
    links: BTreeMap<String, String>,
}

impl NixImageSpec {
    /// The image of a plain store path: `PATH=<path>/bin`, nothing else.
    pub fn plain(top: &StorePath) -> Self {
        Self {
            kind: SpecKind::Plain,
            config: ImageConfig {
                env: vec![format!("PATH={}/bin", top.to_absolute_path())],
                ..ImageConfig::default()
            },
            links: BTreeMap::new(),
        }
    }

    /// Reads `top`'s contents: a spec file is parsed strictly (`closure` is the set its link
    /// targets must be in), anything else is a plain path.
    pub fn from_bytes(
        top: &StorePath,
        bytes: &[u8],
        closure: &BTreeSet<StorePath>,
    ) -> Result<Self, ImageError> {
        let Ok(serde_json::Value::Object(object)) = serde_json::from_slice(bytes) else {
            return Ok(Self::plain(top));
        };
        if !object.contains_key(SPEC_MARKER) {
            return Ok(Self::plain(top));
        }
        let invalid = |why: String| ImageError::InvalidSpec {
            path: top.clone(),
            why,
        };
        let raw: RawSpec = serde_json::from_value(serde_json::Value::Object(object))
            .map_err(|e| invalid(e.to_string()))?;
        if raw.version != SPEC_VERSION {
            return Err(invalid(format!(
                "{SPEC_MARKER} is {}; this nix-cri reads version {SPEC_VERSION}",
                raw.version
            )));
        }
        let config = raw.config.unwrap_or_default().check().map_err(invalid)?;
        let links = check_links(raw.links.unwrap_or_default(), closure).map_err(invalid)?;
        Ok(Self {
            kind: SpecKind::Spec,
            config,
            links,
        })
    }

    pub fn kind(&self) -> SpecKind {
        self.kind
    }

    pub fn config(&self) -> &ImageConfig {
        &self.config
    }

    /// Symlinks of the root image: absolute path in the container → target, sorted by path.
    pub fn links(&self) -> &BTreeMap<String, String> {
        &self.links
    }

    /// The image's `User`, if it sets one.
    pub fn user(&self) -> Option<&str> {
        self.config.user.as_deref()
    }

    /// The image user as kubelet's RunAsNonRoot check wants it (see [`parse_user`]).
    pub fn user_ids(&self) -> (Option<i64>, Option<String>) {
        self.user().map(parse_user).unwrap_or((None, None))
    }
}

/// Splits an image `User` the way containerd reports it in `Image.uid`/`Image.username`: the
/// part before `:` is a uid when numeric, a user name otherwise; empty means unset (root).
pub fn parse_user(user: &str) -> (Option<i64>, Option<String>) {
    let name = user.split(':').next().unwrap_or_default();
    if name.is_empty() {
        return (None, None);
    }
    match name.parse::<i64>() {
        Ok(uid) => (Some(uid), None),
        Err(_) => (None, Some(name.to_owned())),
    }
}

/// Reads `top` (valid in `store`) as an image.
pub fn load(store: &Store, top: &StorePath) -> Result<NixImageSpec, ImageError> {
    let real = store.real_path(top);
    let meta = std::fs::symlink_metadata(&real).map_err(io_err(&real))?;
    if !meta.is_file() {
        return Ok(NixImageSpec::plain(top));
    }
    let file = std::fs::File::open(&real).map_err(io_err(&real))?;
    let mut bytes = Vec::new();
    file.take(MAX_SPEC_SIZE + 1)
        .read_to_end(&mut bytes)
        .map_err(io_err(&real))?;
    if bytes.len() as u64 > MAX_SPEC_SIZE {
        // A large file is a plain path, unless it looks like a spec: then say why it is not read.
        let head = &bytes[..bytes.len().min(4096)];
        let marker = format!("\"{SPEC_MARKER}\"");
        if head.trim_ascii_start().starts_with(b"{")
            && head.windows(marker.len()).any(|w| w == marker.as_bytes())
        {
            return Err(ImageError::SpecTooLarge {
                path: top.clone(),
                limit: MAX_SPEC_SIZE,
            });
        }
        return Ok(NixImageSpec::plain(top));
    }
    if !looks_like_spec(&bytes) {
        return Ok(NixImageSpec::plain(top));
    }
    let closure = store.closure(std::slice::from_ref(top))?;
    NixImageSpec::from_bytes(top, &bytes, &closure)
}

/// Cheap test before computing a closure: a spec is a JSON object naming the marker.
fn looks_like_spec(bytes: &[u8]) -> bool {
    let marker = format!("\"{SPEC_MARKER}\"");
    bytes.trim_ascii_start().starts_with(b"{")
        && bytes.windows(marker.len()).any(|w| w == marker.as_bytes())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpec {
    #[serde(rename = "nixCriImage")]
    version: u64,
    config: Option<RawConfig>,
    links: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "PascalCase")]
struct RawConfig {
    entrypoint: Option<Vec<String>>,
    cmd: Option<Vec<String>>,
    env: Option<Vec<String>>,
    working_dir: Option<String>,
    user: Option<String>,
    exposed_ports: Option<BTreeMap<String, Empty>>,
    labels: Option<BTreeMap<String, String>>,
    stop_signal: Option<String>,
}

/// The `{}` values of `ExposedPorts`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Empty {}

impl RawConfig {
    fn check(self) -> Result<ImageConfig, String> {
        let env = self.env.unwrap_or_default();
        for var in &env {
            match var.split_once('=') {
                Some((name, _)) if !name.is_empty() && !name.contains('\0') => {}
                _ => return Err(format!("config.Env entry {var:?} is not NAME=VALUE")),
            }
        }
        if let Some(dir) = &self.working_dir
            && !dir.starts_with('/')
        {
            return Err(format!("config.WorkingDir {dir:?} is not absolute"));
        }
        if let Some(user) = &self.user
            && (user.is_empty() || user.contains(char::is_whitespace))
        {
            return Err(format!("config.User {user:?} is empty or holds whitespace"));
        }
        let exposed_ports: BTreeSet<String> =
            self.exposed_ports.unwrap_or_default().into_keys().collect();
        for port in &exposed_ports {
            check_port(port).map_err(|why| format!("config.ExposedPorts key {port:?} {why}"))?;
        }
        let labels = self.labels.unwrap_or_default();
        for key in labels.keys() {
            if key.is_empty() {
                return Err("config.Labels has an empty key".to_owned());
            }
            if key.starts_with(RESERVED_LABEL_PREFIX) {
                return Err(format!(
                    "config.Labels key {key:?} is reserved ({RESERVED_LABEL_PREFIX}* is set by nix-cri)"
                ));
            }
        }
        if let Some(signal) = &self.stop_signal
            && (signal.is_empty()
                || !signal
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"+-".contains(&b)))
        {
            return Err(format!(
                "config.StopSignal {signal:?} is not a signal name or number"
            ));
        }
        Ok(ImageConfig {
            entrypoint: self.entrypoint,
            cmd: self.cmd,
            env,
            working_dir: self.working_dir,
            user: self.user,
            exposed_ports,
            labels,
            stop_signal: self.stop_signal,
        })
    }
}

fn check_port(port: &str) -> Result<(), &'static str> {
    let (number, protocol) = port.split_once('/').unwrap_or((port, "tcp"));
    if !["tcp", "udp", "sctp"].contains(&protocol) {
        return Err("has a protocol other than tcp, udp or sctp");
    }
    match number.parse::<u16>() {
        Ok(n) if n > 0 && !number.starts_with('0') => Ok(()),
        _ => Err("is not a port number from 1 to 65535"),
    }
}

/// Components of a canonical absolute path, or why it is not one.
fn components(path: &str) -> Result<Vec<&str>, &'static str> {
    let rest = path.strip_prefix('/').ok_or("is not absolute")?;
    if path.contains('\0') {
        return Err("holds a NUL byte");
    }
    if rest.is_empty() {
        return Ok(Vec::new());
    }
    let parts: Vec<&str> = rest.split('/').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err("has an empty component (// or a trailing /)");
    }
    if parts.iter().any(|p| *p == "." || *p == "..") {
        return Err("has a . or .. component");
    }
    Ok(parts)
}

fn is_at_or_under(path: &str, root: &str) -> bool {
    path == root
        || path
            .strip_prefix(root)
            .is_some_and(|rest| rest.starts_with('/'))
}

fn check_links(
    links: BTreeMap<String, String>,
    closure: &BTreeSet<StorePath>,
) -> Result<BTreeMap<String, String>, String> {
    for (path, target) in &links {
        components(path).map_err(|why| format!("link {path:?} {why}"))?;
        if path == "/" {
            return Err("link \"/\" would replace the root directory".to_owned());
        }
        if let Some(root) = FORBIDDEN_ROOTS.iter().find(|r| is_at_or_under(path, r)) {
            return Err(format!(
                "link {path:?} is at or under {root}, which nix-cri or the runtime owns"
            ));
        }
        if is_at_or_under(STORE_DIR, path) {
            return Err(format!("link {path:?} would hide {STORE_DIR}"));
        }
        let parts =
            components(target).map_err(|why| format!("link {path:?}: target {target:?} {why}"))?;
        let in_store = target
            .strip_prefix(STORE_DIR)
            .is_some_and(|rest| rest.starts_with('/'));
        let base = parts.get(2).filter(|_| in_store).ok_or_else(|| {
            format!("link {path:?}: target {target:?} is not inside a store path")
        })?;
        let store_path = StorePath::from_base_name(base)
            .map_err(|e| format!("link {path:?}: target {target:?}: {e}"))?;
        if !closure.contains(&store_path) {
            return Err(format!(
                "link {path:?}: target {target:?} is in {store_path}, which is not in the spec's closure \
                 (refer to it with string context, e.g. \"${{drv}}/bin\", not a plain string)"
            ));
        }
    }
    // BTreeMap order puts a path right before the paths under it (or before siblings that
    // sort between, like "/a-b" between "/a" and "/a/b"), so compare each with all later ones
    // sharing its prefix.
    let keys: Vec<&String> = links.keys().collect();
    for (i, outer) in keys.iter().enumerate() {
        for inner in &keys[i + 1..] {
            if !inner.starts_with(outer.as_str()) {
                break;
            }
            if is_at_or_under(inner, outer) {
                return Err(format!("link {inner:?} lies under link {outer:?}"));
            }
        }
    }
    Ok(links)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOP: &str = "/nix/store/00bgd045z0d4icpbc2yyz4gx48ak44la-image.json";
    const BUSYBOX: &str = "/nix/store/jsm9cyjvamk013ndqlj8ckgaqp3yrw28-busybox-static";
    const OTHER: &str = "/nix/store/qrcr68bhasrqzvgj3s7hbhnlyd31dw2r-fx-disjoint-top";

    fn top() -> StorePath {
        StorePath::from_absolute_path(TOP).unwrap()
    }

    fn closure() -> BTreeSet<StorePath> {
        [TOP, BUSYBOX]
            .iter()
            .map(|p| StorePath::from_absolute_path(p).unwrap())
            .collect()
    }

    fn parse(json: &str) -> Result<NixImageSpec, String> {
        NixImageSpec::from_bytes(&top(), json.as_bytes(), &closure()).map_err(|e| e.to_string())
    }

    #[test]
    fn a_full_spec() {
        let spec = parse(&format!(
            r#"{{"nixCriImage": 0,
                "config": {{"Entrypoint": ["{BUSYBOX}/bin/sh"], "Cmd": ["-c", "true"],
                           "Env": ["A=1", "B="], "WorkingDir": "/tmp", "User": "1000:100",
                           "ExposedPorts": {{"80/tcp": {{}}, "53/udp": {{}}, "8080": {{}}}},
                           "Labels": {{"a": "b"}}, "StopSignal": "SIGINT"}},
                "links": {{"/bin": "{BUSYBOX}/bin", "/usr/bin/env": "{BUSYBOX}/bin/env",
                          "/etc/sh": "{BUSYBOX}"}}}}"#
        ))
        .unwrap();
        assert_eq!(spec.kind(), SpecKind::Spec);
        let c = spec.config();
        assert_eq!(
            c.entrypoint.as_deref(),
            Some(&[format!("{BUSYBOX}/bin/sh")][..])
        );
        assert_eq!(
            c.cmd.as_deref(),
            Some(&["-c".to_owned(), "true".to_owned()][..])
        );
        assert_eq!(c.env, ["A=1", "B="]);
        assert_eq!(c.working_dir.as_deref(), Some("/tmp"));
        assert_eq!(
            c.exposed_ports.iter().collect::<Vec<_>>(),
            ["53/udp", "80/tcp", "8080"]
        );
        assert_eq!(c.labels["a"], "b");
        assert_eq!(c.stop_signal.as_deref(), Some("SIGINT"));
        assert_eq!(spec.user(), Some("1000:100"));
        assert_eq!(spec.user_ids(), (Some(1000), None));
        assert_eq!(
            spec.links().keys().collect::<Vec<_>>(),
            ["/bin", "/etc/sh", "/usr/bin/env"]
        );
    }

    #[test]
    fn a_minimal_spec_and_plain_paths() {
        let spec = parse(r#"{"nixCriImage":0}"#).unwrap();
        assert_eq!(spec.kind(), SpecKind::Spec);
        assert_eq!(spec.config(), &ImageConfig::default());
        assert!(spec.links().is_empty());
        for not_a_spec in [
            "",
            "hello",
            "{}",
            r#"{"config":{}}"#,
            "[1]",
            r#"{"nixCriImage":0"#,
        ] {
            let spec = parse(not_a_spec).unwrap();
            assert_eq!(spec.kind(), SpecKind::Plain, "{not_a_spec:?}");
            assert_eq!(spec.config().env, [format!("PATH={TOP}/bin")]);
            assert!(spec.links().is_empty());
            assert_eq!(spec.user_ids(), (None, None));
        }
    }

    #[test]
    fn bad_specs_say_what_and_where() {
        for (json, says) in [
            (r#"{"nixCriImage":1}"#.to_owned(), "nixCriImage is 1"),
            (r#"{"nixCriImage":"0"}"#.to_owned(), "invalid type"),
            (
                r#"{"nixCriImage":0,"extra":1}"#.to_owned(),
                "unknown field `extra`",
            ),
            (
                r#"{"nixCriImage":0,"config":{"Volumes":{}}}"#.to_owned(),
                "unknown field `Volumes`",
            ),
            (
                r#"{"nixCriImage":0,"config":{"entrypoint":[]}}"#.to_owned(),
                "unknown field `entrypoint`",
            ),
            (
                r#"{"nixCriImage":0,"config":{"Env":["X"]}}"#.to_owned(),
                "Env entry \"X\"",
            ),
            (
                r#"{"nixCriImage":0,"config":{"WorkingDir":"tmp"}}"#.to_owned(),
                "not absolute",
            ),
            (
                r#"{"nixCriImage":0,"config":{"User":""}}"#.to_owned(),
                "config.User",
            ),
            (
                r#"{"nixCriImage":0,"config":{"ExposedPorts":{"0/tcp":{}}}}"#.to_owned(),
                "\"0/tcp\"",
            ),
            (
                r#"{"nixCriImage":0,"config":{"ExposedPorts":{"80/icmp":{}}}}"#.to_owned(),
                "protocol",
            ),
            (
                r#"{"nixCriImage":0,"config":{"ExposedPorts":{"80":{"x":1}}}}"#.to_owned(),
                "unknown field `x`",
            ),
            (
                r#"{"nixCriImage":0,"config":{"Labels":{"io.nix-cri.x":"y"}}}"#.to_owned(),
                "reserved",
            ),
            (
                r#"{"nixCriImage":0,"config":{"StopSignal":"SIG TERM"}}"#.to_owned(),
                "StopSignal",
            ),
            (
                format!(r#"{{"nixCriImage":0,"links":{{"bin":"{BUSYBOX}"}}}}"#),
                "\"bin\" is not absolute",
            ),
            (
                format!(r#"{{"nixCriImage":0,"links":{{"/":"{BUSYBOX}"}}}}"#),
                "root directory",
            ),
            (
                format!(r#"{{"nixCriImage":0,"links":{{"/a/../b":"{BUSYBOX}"}}}}"#),
                ". or ..",
            ),
            (
                format!(r#"{{"nixCriImage":0,"links":{{"/a//b":"{BUSYBOX}"}}}}"#),
                "empty component",
            ),
            (
                format!(r#"{{"nixCriImage":0,"links":{{"/bin/":"{BUSYBOX}"}}}}"#),
                "empty component",
            ),
            (
                format!(r#"{{"nixCriImage":0,"links":{{"/nix/store/x":"{BUSYBOX}"}}}}"#),
                "under /nix/store",
            ),
            (
                format!(r#"{{"nixCriImage":0,"links":{{"/nix":"{BUSYBOX}"}}}}"#),
                "would hide /nix/store",
            ),
            (
                format!(r#"{{"nixCriImage":0,"links":{{"/proc":"{BUSYBOX}"}}}}"#),
                "under /proc",
            ),
            (
                format!(r#"{{"nixCriImage":0,"links":{{"/dev/shm":"{BUSYBOX}"}}}}"#),
                "under /dev",
            ),
            (
                format!(r#"{{"nixCriImage":0,"links":{{"/sys/x":"{BUSYBOX}"}}}}"#),
                "under /sys",
            ),
            (
                r#"{"nixCriImage":0,"links":{"/bin":"/usr/bin"}}"#.to_owned(),
                "not inside a store path",
            ),
            (
                r#"{"nixCriImage":0,"links":{"/bin":"/nix/store"}}"#.to_owned(),
                "not inside a store path",
            ),
            (
                r#"{"nixCriImage":0,"links":{"/bin":"/nix/storex/a"}}"#.to_owned(),
                "not inside a store path",
            ),
            (
                r#"{"nixCriImage":0,"links":{"/bin":"relative"}}"#.to_owned(),
                "not absolute",
            ),
            (
                format!(r#"{{"nixCriImage":0,"links":{{"/bin":"{BUSYBOX}/../x"}}}}"#),
                ". or ..",
            ),
            (
                r#"{"nixCriImage":0,"links":{"/bin":"/nix/store/short-x"}}"#.to_owned(),
                "/nix/store/short-x",
            ),
            (
                format!(r#"{{"nixCriImage":0,"links":{{"/bin":"{OTHER}/bin"}}}}"#),
                "not in the spec's closure",
            ),
            (
                format!(
                    r#"{{"nixCriImage":0,"links":{{"/usr":"{BUSYBOX}","/usr/bin":"{BUSYBOX}/bin"}}}}"#
                ),
                "link \"/usr/bin\" lies under link \"/usr\"",
            ),
            (
                format!(
                    r#"{{"nixCriImage":0,"links":{{"/a":"{BUSYBOX}","/a-b":"{BUSYBOX}","/a/c":"{BUSYBOX}"}}}}"#
                ),
                "link \"/a/c\" lies under link \"/a\"",
            ),
        ] {
            let err = parse(&json).expect_err(&json);
            assert!(err.contains(says), "{json}: {err}");
            assert!(err.contains(TOP), "{json}: {err}");
        }
    }

    #[test]
    fn siblings_sharing_a_prefix_are_not_nested() {
        let spec = parse(&format!(
            r#"{{"nixCriImage":0,"links":{{"/a":"{BUSYBOX}","/ab":"{BUSYBOX}","/a-b":"{BUSYBOX}"}}}}"#
        ))
        .unwrap();
        assert_eq!(spec.links().len(), 3);
    }

    #[test]
    fn users_as_kubelet_wants_them() {
        for (user, expected) in [
            ("", (None, None)),
            ("0", (Some(0), None)),
            ("1000", (Some(1000), None)),
            ("1000:1000", (Some(1000), None)),
            ("nobody", (None, Some("nobody".to_owned()))),
            ("www-data:www-data", (None, Some("www-data".to_owned()))),
            (":100", (None, None)),
        ] {
            assert_eq!(parse_user(user), expected, "{user:?}");
        }
    }
}
