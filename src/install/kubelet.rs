//! Where kubelet's runtime endpoints are set, and minimal edits of those files.
//!
//! Two setups are understood:
//!
//! - **A KubeletConfiguration file** (`/var/lib/kubelet/config.yaml`): a single YAML document,
//!   a block mapping at the top level, with `kind: KubeletConfiguration` and an `apiVersion`
//!   of `kubelet.config.k8s.io/…`. The endpoints are the top-level keys
//!   `containerRuntimeEndpoint` and `imageServiceEndpoint`, each a one-line scalar (plain,
//!   `"double"` without escapes, or `'single'` without `''`), optionally followed by a
//!   `# comment`. The file is edited line-wise: the value of an existing key is replaced in
//!   place, a missing key is appended as a new last line, and every other byte stays as it is.
//! - **kubeadm's flags file** (`/var/lib/kubelet/kubeadm-flags.env`): exactly one line
//!   `KUBELET_KUBEADM_ARGS="…"` (double quotes, no `"`, `\`, `$` or backquote inside), whose
//!   whitespace-separated words hold the flags as `--container-runtime-endpoint=VALUE` and
//!   `--image-service-endpoint=VALUE`. A flag's value is replaced in place; a missing flag is
//!   added before the closing quote.
//!
//! Anything else (JSON, several documents, anchors, block scalars, tabs, a key given twice, a
//! flag given as two words) is refused, naming the file and what was expected.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::InstallError;

/// The KubeletConfiguration file kubeadm and most distributions use, under the host root.
pub const CONFIG_FILE: &str = "/var/lib/kubelet/config.yaml";
/// kubeadm's kubelet flags, under the host root.
pub const FLAGS_FILE: &str = "/var/lib/kubelet/kubeadm-flags.env";

const CONFIG_RUNTIME_KEY: &str = "containerRuntimeEndpoint";
const CONFIG_IMAGE_KEY: &str = "imageServiceEndpoint";
const FLAGS_VARIABLE: &str = "KUBELET_KUBEADM_ARGS=";
const FLAG_RUNTIME: &str = "--container-runtime-endpoint";
const FLAG_IMAGE: &str = "--image-service-endpoint";

/// kubelet's two CRI endpoints as one file sets them (`None`: not set there).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoints {
    pub runtime: Option<String>,
    pub image: Option<String>,
}

impl Endpoints {
    /// Both endpoints at `endpoint`.
    pub fn both(endpoint: &str) -> Self {
        Self {
            runtime: Some(endpoint.to_owned()),
            image: Some(endpoint.to_owned()),
        }
    }
}

/// Which file holds kubelet's endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SetupKind {
    /// `containerRuntimeEndpoint`/`imageServiceEndpoint` in a KubeletConfiguration file.
    Config,
    /// `--container-runtime-endpoint`/`--image-service-endpoint` in kubeadm's flags file.
    Flags,
}

impl SetupKind {
    pub fn file(self) -> &'static str {
        match self {
            SetupKind::Config => CONFIG_FILE,
            SetupKind::Flags => FLAGS_FILE,
        }
    }

    pub fn read(self, text: &str) -> Result<Endpoints, String> {
        match self {
            SetupKind::Config => read_config(text),
            SetupKind::Flags => read_flags(text),
        }
    }

    pub fn edit(self, text: &str, want: &Endpoints) -> Result<String, String> {
        match self {
            SetupKind::Config => edit_config(text, want),
            SetupKind::Flags => edit_flags(text, want),
        }
    }
}

/// How the installer chooses the setup.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum KubeletSetup {
    /// The one file that exists; when both do, the one that sets the runtime endpoint.
    #[default]
    Auto,
    Config,
    Flags,
}

/// The kubelet file to edit, read and understood.
#[derive(Debug, Clone)]
pub struct Detected {
    pub kind: SetupKind,
    /// Host-absolute path (`/var/lib/kubelet/…`).
    pub path: PathBuf,
    pub text: String,
    pub endpoints: Endpoints,
}

/// Reads kubelet's files under `host_root` and decides which one to edit. Nothing is written.
pub fn detect(host_root: &Path, choice: KubeletSetup) -> Result<Detected, InstallError> {
    let config = load(host_root, SetupKind::Config)?;
    let flags = load(host_root, SetupKind::Flags)?;
    let shown = |kind: SetupKind| super::on_host(host_root, Path::new(kind.file()));
    let sets_runtime = |d: &Option<Detected>| {
        d.as_ref()
            .is_some_and(|d| d.endpoints.runtime.is_some() || d.endpoints.image.is_some())
    };
    match choice {
        KubeletSetup::Config => {
            if let Some(flags) = flags.as_ref().filter(|_| sets_runtime(&flags)) {
                return Err(InstallError::KubeletFlagsOverride {
                    config: shown(SetupKind::Config),
                    flags: shown(SetupKind::Flags),
                    why: format!(
                        "it sets kubelet's endpoints as flags ({:?}), and flags win over the \
                         KubeletConfiguration; use --kubelet-setup flags",
                        flags.endpoints
                    ),
                });
            }
            config.ok_or_else(|| missing(host_root, SetupKind::Config))
        }
        KubeletSetup::Flags => flags.ok_or_else(|| missing(host_root, SetupKind::Flags)),
        KubeletSetup::Auto => match (config, flags) {
            (None, None) => Err(InstallError::NoKubeletSetup {
                config: shown(SetupKind::Config),
                flags: shown(SetupKind::Flags),
            }),
            (Some(config), None) => Ok(config),
            (None, Some(flags)) => Ok(flags),
            (Some(config), Some(flags)) => {
                let (c, f) = (
                    sets_runtime(&Some(config.clone())),
                    sets_runtime(&Some(flags.clone())),
                );
                match (c, f) {
                    (true, false) => Ok(config),
                    (false, true) => Ok(flags),
                    (true, true) => Err(InstallError::AmbiguousKubeletSetup {
                        config: shown(SetupKind::Config),
                        flags: shown(SetupKind::Flags),
                        why: "both set kubelet's runtime endpoints",
                    }),
                    (false, false) => Err(InstallError::AmbiguousKubeletSetup {
                        config: shown(SetupKind::Config),
                        flags: shown(SetupKind::Flags),
                        why: "both exist and neither sets kubelet's runtime endpoints",
                    }),
                }
            }
        },
    }
}

fn missing(host_root: &Path, kind: SetupKind) -> InstallError {
    InstallError::KubeletFile {
        path: super::on_host(host_root, Path::new(kind.file())),
        why: "does not exist (chosen with --kubelet-setup)".to_owned(),
    }
}

/// The file of `kind` under `host_root`, if it exists, parsed.
fn load(host_root: &Path, kind: SetupKind) -> Result<Option<Detected>, InstallError> {
    let path = super::on_host(host_root, Path::new(kind.file()));
    let meta = match std::fs::symlink_metadata(&path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(InstallError::io("read", &path)(e)),
    };
    if !meta.file_type().is_file() {
        return Err(InstallError::KubeletFile {
            path,
            why: "is not a regular file (a symlink or directory); expected the file itself"
                .to_owned(),
        });
    }
    let bytes = std::fs::read(&path).map_err(InstallError::io("read", &path))?;
    let text = String::from_utf8(bytes).map_err(|_| InstallError::KubeletFile {
        path: path.clone(),
        why: "is not UTF-8 text".to_owned(),
    })?;
    let endpoints = kind
        .read(&text)
        .map_err(|why| InstallError::KubeletFile { path, why })?;
    Ok(Some(Detected {
        kind,
        path: PathBuf::from(kind.file()),
        text,
        endpoints,
    }))
}

// --- KubeletConfiguration ------------------------------------------------------------------

/// A top-level key the installer cares about, found in the file.
#[derive(Debug, Clone)]
struct Entry {
    /// Byte range of the whole line, line ending included.
    line: (usize, usize),
    /// Byte range of the value as written (quotes included); empty when there is none.
    value: (usize, usize),
    /// The value, unquoted; `None` when the key has no value on its line.
    text: Option<String>,
    line_no: usize,
}

#[derive(Debug, Default)]
struct Parsed {
    kind: Option<Entry>,
    api_version: Option<Entry>,
    runtime: Option<Entry>,
    image: Option<Entry>,
    /// The line ending the file uses, for appended lines.
    newline: &'static str,
}

fn parse_config(text: &str) -> Result<Parsed, String> {
    let expected = "expected a KubeletConfiguration: one YAML document, a block mapping with \
                    `kind: KubeletConfiguration` and `apiVersion: kubelet.config.k8s.io/v1beta1`";
    let mut parsed = Parsed {
        newline: if text.contains("\r\n") { "\r\n" } else { "\n" },
        ..Parsed::default()
    };
    let mut offset = 0;
    let mut seen_key = false;
    // Whether the last top-level key was one of ours: an indented line after it would make
    // its value span several lines.
    let mut last_ours: Option<&'static str> = None;
    for (index, line) in text.split_inclusive('\n').enumerate() {
        let line_no = index + 1;
        let start = offset;
        offset += line.len();
        let content = line.trim_end_matches(['\n', '\r']);
        let trimmed = content.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        if content.starts_with('\t') {
            return Err(format!("line {line_no} starts with a tab; {expected}"));
        }
        // A block sequence may sit at the key's own indentation (`clusterDNS:` then
        // `- 10.96.0.10`, as kubeadm writes it): it continues the previous key, like an
        // indented line.
        let zero_indented_item = content == "-" || content.starts_with("- ");
        if content.starts_with(' ') || zero_indented_item {
            if let Some(key) = last_ours {
                return Err(format!(
                    "the value of {key} continues on line {line_no}; expected a one-line string"
                ));
            }
            if !seen_key {
                return Err(format!(
                    "line {line_no} is indented before any top-level key; {expected}"
                ));
            }
            continue;
        }
        last_ours = None;
        if content.trim_end() == "---" {
            if seen_key {
                return Err(format!(
                    "a second YAML document starts on line {line_no}; {expected}"
                ));
            }
            continue;
        }
        let Some((key, rest_at)) = split_key(content) else {
            return Err(format!(
                "line {line_no} is not a `key: value` line of a block mapping; {expected}"
            ));
        };
        seen_key = true;
        let slot = match key {
            "kind" => &mut parsed.kind,
            "apiVersion" => &mut parsed.api_version,
            CONFIG_RUNTIME_KEY => &mut parsed.runtime,
            CONFIG_IMAGE_KEY => &mut parsed.image,
            _ => continue,
        };
        let (value, text) = scalar(content, rest_at)
            .map_err(|why| format!("{key} on line {line_no}: {why}; {expected}"))?;
        if let Some(first) = slot {
            return Err(format!(
                "{key} is set twice (lines {} and {line_no})",
                first.line_no
            ));
        }
        *slot = Some(Entry {
            line: (start, offset),
            value: (start + value.0, start + value.1),
            text,
            line_no,
        });
        last_ours = Some(match key {
            "kind" => "kind",
            "apiVersion" => "apiVersion",
            CONFIG_RUNTIME_KEY => CONFIG_RUNTIME_KEY,
            _ => CONFIG_IMAGE_KEY,
        });
    }
    let kind = parsed.kind.as_ref().and_then(|e| e.text.as_deref());
    let api = parsed.api_version.as_ref().and_then(|e| e.text.as_deref());
    match (kind, api) {
        (Some("KubeletConfiguration"), Some(api)) if api.starts_with("kubelet.config.k8s.io/") => {
            Ok(parsed)
        }
        (kind, api) => Err(format!(
            "kind is {}, apiVersion is {}; {expected}",
            kind.map_or("missing".to_owned(), |k| format!("{k:?}")),
            api.map_or("missing".to_owned(), |a| format!("{a:?}")),
        )),
    }
}

/// A top-level `key:` at the start of `content`: the key and the offset after the colon.
fn split_key(content: &str) -> Option<(&str, usize)> {
    let first = content.chars().next()?;
    if !(first.is_ascii_alphanumeric() || first == '_') {
        return None;
    }
    let bytes = content.as_bytes();
    let colon = (0..bytes.len()).find(|&i| {
        bytes[i] == b':' && (i + 1 == bytes.len() || bytes[i + 1] == b' ' || bytes[i + 1] == b'\t')
    })?;
    let key = &content[..colon];
    key.chars()
        .all(|c| c.is_ascii_alphanumeric() || "_-./".contains(c))
        .then_some((key, colon + 1))
}

type Span = (usize, usize);

/// The one-line scalar after a key's colon: its byte range within `content` and its text.
fn scalar(content: &str, after_colon: usize) -> Result<(Span, Option<String>), String> {
    let rest = &content[after_colon..];
    let lead = rest.len() - rest.trim_start().len();
    let start = after_colon + lead;
    let value = &content[start..];
    let comment_ok = |tail: &str| {
        let tail = tail.trim_start();
        tail.is_empty() || tail.starts_with('#')
    };
    if value.is_empty() || value.starts_with('#') {
        return Ok(((after_colon, after_colon), None));
    }
    if let Some(inner) = value.strip_prefix('"') {
        let end = inner
            .find('"')
            .ok_or("a double-quoted string without its closing quote")?;
        if inner[..end].contains('\\') {
            return Err("a double-quoted string with escapes".to_owned());
        }
        if !comment_ok(&inner[end + 1..]) {
            return Err("text after the closing quote".to_owned());
        }
        return Ok(((start, start + end + 2), Some(inner[..end].to_owned())));
    }
    if let Some(inner) = value.strip_prefix('\'') {
        let end = inner
            .find('\'')
            .ok_or("a single-quoted string without its closing quote")?;
        if inner[end + 1..].starts_with('\'') {
            return Err("a single-quoted string with '' inside".to_owned());
        }
        if !comment_ok(&inner[end + 1..]) {
            return Err("text after the closing quote".to_owned());
        }
        return Ok(((start, start + end + 2), Some(inner[..end].to_owned())));
    }
    if value.starts_with(['|', '>', '&', '*', '!', '{', '[', '%', '@', '`']) {
        return Err(format!(
            "{:?} is not a plain one-line string",
            value.chars().next().unwrap_or(' ')
        ));
    }
    let end = value.find(" #").unwrap_or(value.len());
    let plain = value[..end].trim_end();
    Ok(((start, start + plain.len()), Some(plain.to_owned())))
}

/// A value as YAML: plain when that is unambiguous, else double-quoted.
fn yaml_scalar(value: &str) -> Result<String, String> {
    if value
        .chars()
        .any(|c| c.is_control() || c == '"' || c == '\\')
    {
        return Err(format!(
            "{value:?} cannot be written as a simple YAML string"
        ));
    }
    let plain = !value.is_empty()
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._:-+@%".contains(c))
        && value
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '/');
    Ok(if plain {
        value.to_owned()
    } else {
        format!("\"{value}\"")
    })
}

/// The endpoints a KubeletConfiguration sets.
pub fn read_config(text: &str) -> Result<Endpoints, String> {
    let parsed = parse_config(text)?;
    Ok(Endpoints {
        runtime: parsed.runtime.and_then(|e| e.text),
        image: parsed.image.and_then(|e| e.text),
    })
}

/// `text` with the endpoints set to `want` (`None`: the key removed), every other byte kept.
pub fn edit_config(text: &str, want: &Endpoints) -> Result<String, String> {
    let parsed = parse_config(text)?;
    let mut replacements: Vec<(Span, String)> = Vec::new();
    let mut appended = String::new();
    for (key, entry, wanted) in [
        (CONFIG_RUNTIME_KEY, &parsed.runtime, &want.runtime),
        (CONFIG_IMAGE_KEY, &parsed.image, &want.image),
    ] {
        match (entry, wanted) {
            (Some(entry), Some(value)) if entry.text.as_deref() == Some(value.as_str()) => {}
            (Some(entry), Some(value)) => {
                let scalar = yaml_scalar(value)?;
                let written = if entry.value.0 == entry.value.1 {
                    // `key:` or `key: # comment` with no value yet.
                    format!(" {scalar}")
                } else {
                    scalar
                };
                replacements.push((entry.value, written));
            }
            (Some(entry), None) => replacements.push((entry.line, String::new())),
            (None, Some(value)) => {
                appended.push_str(&format!("{key}: {}{}", yaml_scalar(value)?, parsed.newline));
            }
            (None, None) => {}
        }
    }
    let mut out = text.to_owned();
    replacements.sort_by_key(|(span, _)| std::cmp::Reverse(span.0));
    for (span, with) in replacements {
        out.replace_range(span.0..span.1, &with);
    }
    if !appended.is_empty() {
        if !out.is_empty() && !out.ends_with('\n') {
            out.push_str(parsed.newline);
        }
        out.push_str(&appended);
    }
    let check = read_config(&out)?;
    if &check != want {
        return Err(format!(
            "editing the endpoints gave {check:?}, not {want:?}"
        ));
    }
    Ok(out)
}

// --- kubeadm flags ---------------------------------------------------------------------------

struct FlagsLine {
    /// Byte range of the text between the quotes.
    inner: Span,
    runtime: Option<Flag>,
    image: Option<Flag>,
}

struct Flag {
    /// The whole word, and the value within it.
    word: Span,
    value: Span,
    text: String,
}

fn parse_flags(text: &str) -> Result<FlagsLine, String> {
    let expected = format!(
        "expected one line {FLAGS_VARIABLE}\"--flag=value …\" (double quotes, no quotes, \
         backslashes or $ inside), as kubeadm writes it"
    );
    let mut found: Option<(usize, FlagsLine)> = None;
    let mut offset = 0;
    for (index, line) in text.split_inclusive('\n').enumerate() {
        let line_no = index + 1;
        let start = offset;
        offset += line.len();
        let content = line.trim_end_matches(['\n', '\r']);
        let Some(value) = content.trim_start().strip_prefix(FLAGS_VARIABLE) else {
            if content.contains("KUBELET_KUBEADM_ARGS") && !content.trim_start().starts_with('#') {
                return Err(format!(
                    "line {line_no} mentions KUBELET_KUBEADM_ARGS in a way not understood; \
                     {expected}"
                ));
            }
            continue;
        };
        if let Some((first, _)) = &found {
            return Err(format!(
                "KUBELET_KUBEADM_ARGS is set twice (lines {first} and {line_no})"
            ));
        }
        let value_at = start + (content.len() - value.len());
        let value = value.trim_end();
        let inner = value
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .filter(|inner| !inner.contains(['"', '\\', '$', '`']))
            .ok_or_else(|| format!("line {line_no}: {expected}"))?;
        let inner_at = value_at + 1;
        let mut parsed = FlagsLine {
            inner: (inner_at, inner_at + inner.len()),
            runtime: None,
            image: None,
        };
        let mut word_start = None;
        let bytes = inner.as_bytes();
        for i in 0..=bytes.len() {
            let space = i == bytes.len() || bytes[i].is_ascii_whitespace();
            match (space, word_start) {
                (false, None) => word_start = Some(i),
                (true, Some(ws)) => {
                    word_start = None;
                    let word = &inner[ws..i];
                    for (name, slot) in [
                        (FLAG_RUNTIME, &mut parsed.runtime),
                        (FLAG_IMAGE, &mut parsed.image),
                    ] {
                        if word == name {
                            return Err(format!(
                                "line {line_no}: {name} is followed by its value as a separate \
                                 word; expected {name}=VALUE"
                            ));
                        }
                        if let Some(value) =
                            word.strip_prefix(name).and_then(|w| w.strip_prefix('='))
                        {
                            if slot.is_some() {
                                return Err(format!("line {line_no}: {name} is given twice"));
                            }
                            let value_start = inner_at + ws + name.len() + 1;
                            *slot = Some(Flag {
                                word: (inner_at + ws, inner_at + i),
                                value: (value_start, inner_at + i),
                                text: value.to_owned(),
                            });
                        }
                    }
                }
                _ => {}
            }
        }
        found = Some((line_no, parsed));
    }
    found.map(|(_, line)| line).ok_or(expected)
}

/// The endpoints kubeadm's flags file sets.
pub fn read_flags(text: &str) -> Result<Endpoints, String> {
    let line = parse_flags(text)?;
    Ok(Endpoints {
        runtime: line.runtime.map(|f| f.text),
        image: line.image.map(|f| f.text),
    })
}

/// `text` with the flags set to `want` (`None`: the flag removed), every other byte kept.
pub fn edit_flags(text: &str, want: &Endpoints) -> Result<String, String> {
    let line = parse_flags(text)?;
    let mut replacements: Vec<(Span, String)> = Vec::new();
    let mut added = String::new();
    for (name, flag, wanted) in [
        (FLAG_RUNTIME, &line.runtime, &want.runtime),
        (FLAG_IMAGE, &line.image, &want.image),
    ] {
        if let Some(value) = wanted
            && (value.is_empty()
                || value.contains(|c: char| c.is_whitespace() || "\"\\$`'".contains(c)))
        {
            return Err(format!(
                "{value:?} cannot be written as a kubelet flag value"
            ));
        }
        match (flag, wanted) {
            (Some(flag), Some(value)) if &flag.text == value => {}
            (Some(flag), Some(value)) => replacements.push((flag.value, value.clone())),
            (Some(flag), None) => {
                // The word and the whitespace before it (or after it, for the first word).
                let (mut start, mut end) = flag.word;
                let before = &text[line.inner.0..start];
                let trimmed = before.trim_end();
                if trimmed.len() < before.len() {
                    start = line.inner.0 + trimmed.len();
                } else {
                    let after = &text[end..line.inner.1];
                    end += after.len() - after.trim_start().len();
                }
                replacements.push(((start, end), String::new()));
            }
            (None, Some(value)) => added.push_str(&format!(" {name}={value}")),
            (None, None) => {}
        }
    }
    if !added.is_empty() {
        if line.inner.0 == line.inner.1 {
            added.remove(0);
        }
        replacements.push(((line.inner.1, line.inner.1), added));
    }
    let mut out = text.to_owned();
    replacements.sort_by_key(|(span, _)| std::cmp::Reverse(span.0));
    for (span, with) in replacements {
        out.replace_range(span.0..span.1, &with);
    }
    let check = read_flags(&out)?;
    if &check != want {
        return Err(format!("editing the flags gave {check:?}, not {want:?}"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KUBEADM_CONFIG: &str = "apiVersion: kubelet.config.k8s.io/v1beta1\n\
authentication:\n  anonymous:\n    enabled: false\n\
cgroupDriver: systemd\n\
# the runtime\n\
containerRuntimeEndpoint: \"unix:///var/run/containerd/containerd.sock\" # kubeadm\n\
kind: KubeletConfiguration\n\
staticPodPath: /etc/kubernetes/manifests\n";

    #[test]
    fn config_edits_only_the_values() {
        let want = Endpoints::both("unix:///run/nix-cri/nix-cri.sock");
        assert_eq!(
            read_config(KUBEADM_CONFIG).unwrap(),
            Endpoints {
                runtime: Some("unix:///var/run/containerd/containerd.sock".into()),
                image: None
            }
        );
        let edited = edit_config(KUBEADM_CONFIG, &want).unwrap();
        assert_eq!(
            edited,
            KUBEADM_CONFIG.replace(
                "\"unix:///var/run/containerd/containerd.sock\"",
                "unix:///run/nix-cri/nix-cri.sock"
            ) + "imageServiceEndpoint: unix:///run/nix-cri/nix-cri.sock\n"
        );
        assert_eq!(edit_config(&edited, &want).unwrap(), edited);
        // And back: the original bytes.
        let previous = read_config(KUBEADM_CONFIG).unwrap();
        let back = edit_config(&edited, &previous).unwrap();
        assert_eq!(
            back,
            KUBEADM_CONFIG.replace(
                "\"unix:///var/run/containerd/containerd.sock\"",
                "unix:///var/run/containerd/containerd.sock"
            )
        );
    }

    #[test]
    fn config_without_trailing_newline_and_empty_value() {
        let text = "kind: KubeletConfiguration\r\napiVersion: kubelet.config.k8s.io/v1beta1\r\ncontainerRuntimeEndpoint:";
        let edited = edit_config(text, &Endpoints::both("unix:///a.sock")).unwrap();
        assert_eq!(
            edited,
            "kind: KubeletConfiguration\r\napiVersion: kubelet.config.k8s.io/v1beta1\r\n\
             containerRuntimeEndpoint: unix:///a.sock\r\nimageServiceEndpoint: unix:///a.sock\r\n"
        );
    }

    #[test]
    fn config_shapes_refused() {
        for (text, why) in [
            (
                "{\"kind\": \"KubeletConfiguration\"}",
                "not a `key: value` line",
            ),
            ("kind: Pod\napiVersion: v1\n", "kind is \"Pod\""),
            (
                "apiVersion: kubelet.config.k8s.io/v1beta1\n",
                "kind is missing",
            ),
            (
                "kind: KubeletConfiguration\napiVersion: kubelet.config.k8s.io/v1beta1\n---\nkind: X\n",
                "second YAML document",
            ),
            (
                "kind: KubeletConfiguration\napiVersion: kubelet.config.k8s.io/v1beta1\ncontainerRuntimeEndpoint: >\n  unix:///x\n",
                "not a plain one-line string",
            ),
            (
                "kind: KubeletConfiguration\napiVersion: kubelet.config.k8s.io/v1beta1\ncontainerRuntimeEndpoint: unix:///a\ncontainerRuntimeEndpoint: unix:///b\n",
                "set twice",
            ),
            (
                "kind: KubeletConfiguration\napiVersion: kubelet.config.k8s.io/v1beta1\ncontainerRuntimeEndpoint: unix:///a\n  /b\n",
                "continues on line 4",
            ),
            ("\tkind: KubeletConfiguration\n", "tab"),
        ] {
            let err = read_config(text).unwrap_err();
            assert!(err.contains(why), "{text:?}: {err}");
        }
    }

    const KUBEADM_FLAGS: &str = "KUBELET_KUBEADM_ARGS=\"--container-runtime-endpoint=unix:///var/run/containerd/containerd.sock --pod-infra-container-image=registry.k8s.io/pause:3.9\"\n";

    #[test]
    fn flags_edit_only_the_values() {
        let want = Endpoints::both("unix:///run/nix-cri/nix-cri.sock");
        let edited = edit_flags(KUBEADM_FLAGS, &want).unwrap();
        assert_eq!(
            edited,
            "KUBELET_KUBEADM_ARGS=\"--container-runtime-endpoint=unix:///run/nix-cri/nix-cri.sock \
             --pod-infra-container-image=registry.k8s.io/pause:3.9 \
             --image-service-endpoint=unix:///run/nix-cri/nix-cri.sock\"\n"
        );
        assert_eq!(edit_flags(&edited, &want).unwrap(), edited);
        let previous = read_flags(KUBEADM_FLAGS).unwrap();
        assert_eq!(edit_flags(&edited, &previous).unwrap(), KUBEADM_FLAGS);
        // Removing the first word takes the space after it.
        let none = edit_flags(&edited, &Endpoints::default()).unwrap();
        assert_eq!(
            none,
            "KUBELET_KUBEADM_ARGS=\"--pod-infra-container-image=registry.k8s.io/pause:3.9\"\n"
        );
        assert_eq!(
            edit_flags("KUBELET_KUBEADM_ARGS=\"\"", &want).unwrap(),
            "KUBELET_KUBEADM_ARGS=\"--container-runtime-endpoint=unix:///run/nix-cri/nix-cri.sock \
             --image-service-endpoint=unix:///run/nix-cri/nix-cri.sock\""
        );
    }

    #[test]
    fn flags_shapes_refused() {
        for (text, why) in [
            (
                "KUBELET_EXTRA_ARGS=\"--v=2\"\n",
                "expected one line KUBELET_KUBEADM_ARGS=",
            ),
            ("KUBELET_KUBEADM_ARGS=--v=2\n", "double quotes"),
            ("KUBELET_KUBEADM_ARGS=\"$X\"\n", "double quotes"),
            (
                "KUBELET_KUBEADM_ARGS=\"--container-runtime-endpoint unix:///x\"\n",
                "separate word",
            ),
            (
                "KUBELET_KUBEADM_ARGS=\"\"\nKUBELET_KUBEADM_ARGS=\"\"\n",
                "set twice",
            ),
            ("export KUBELET_KUBEADM_ARGS=\"\"\n", "not understood"),
        ] {
            let err = read_flags(text).unwrap_err();
            assert!(err.contains(why), "{text:?}: {err}");
        }
    }
}
