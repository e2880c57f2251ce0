//! nix-cri's configuration file (TOML, given with `--config`). Every key has a command-line
//! flag of the same name with dashes (`stall_timeout_secs` ↔ `--stall-timeout-secs`); flags win.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::cache::{FetchConfig, SubstituterUrl};
use crate::nix::{TrustedKeys, VerifyingKey};
use crate::store::SubstituterConfig;

/// The store root when none is configured: never `/`, so a host's own Nix is left alone.
pub const DEFAULT_ROOT: &str = "/var/lib/nix-cri";
pub const DEFAULT_LISTEN: &str = "/run/nix-cri/nix-cri.sock";
pub const DEFAULT_UPSTREAM: &str = "/run/containerd/containerd.sock";
pub const DEFAULT_REGISTRY_ADDR: &str = "127.0.0.1:7480";
pub const DEFAULT_RUNTIME_HANDLER: &str = "nix";
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9477";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {}: {message}", path.display())]
    Parse { path: PathBuf, message: String },
    #[error("invalid trusted public key {key:?}: {why}")]
    TrustedKey { key: String, why: String },
    #[error(transparent)]
    Substituter(#[from] crate::cache::CacheError),
    #[error("{0}")]
    Invalid(String),
}

/// Settings for the store and its substituters.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Store root: the store is `<root>/nix/store`, its database `<root>/nix/var/nix/db`.
    /// Default `/var/lib/nix-cri`.
    pub root: Option<PathBuf>,
    /// Binary caches in Nix's URL syntax (`https://…`, `http://…`, `file:///…`, with an
    /// optional `?priority=N`).
    #[serde(default)]
    pub substituters: Vec<String>,
    /// Public keys whose signatures are accepted, as `name:base64` (Nix's format).
    #[serde(default)]
    pub trusted_public_keys: Vec<String>,
    /// Accept paths without a valid signature. For development only. Default false.
    pub no_require_sigs: Option<bool>,
    /// NARs fetched at once. Default 16. Of these, at most two xz NARs per core are unpacked at
    /// once: each xz decoder holds its dictionary (8 MiB for Nix's default compression).
    pub jobs: Option<usize>,
    /// TCP and TLS connect timeout, in seconds. Default 5.
    pub connect_timeout_secs: Option<f64>,
    /// A transfer with no new bytes for this long is abandoned (and retried), in seconds.
    /// Default 30.
    pub stall_timeout_secs: Option<f64>,
    /// Retries of a failed request (server errors, resets, stalls). Default 3.
    pub retries: Option<u32>,
    /// The CRI socket nix-cri serves (kubelet's containerRuntimeEndpoint and
    /// imageServiceEndpoint). Default `/run/nix-cri/nix-cri.sock`.
    pub listen: Option<PathBuf>,
    /// The runtime's CRI socket. Default `/run/containerd/containerd.sock`.
    pub upstream: Option<PathBuf>,
    /// Loopback address of the embedded registry that serves root images to the runtime.
    /// Keep it fixed: the runtime records it in the images it pulled. Default
    /// `127.0.0.1:7480`.
    pub registry_addr: Option<std::net::SocketAddr>,
    /// The RuntimeClass handler that opts pods in. Default `nix`.
    pub runtime_handler: Option<String>,
    /// The runtime's handler that opted-in sandboxes run with. Default empty: the runtime's
    /// default handler.
    pub upstream_runtime_handler: Option<String>,
    /// Allow nix images in every pod, not only those with the nix RuntimeClass. Default false.
    pub allow_all_sandboxes: Option<bool>,
    /// Where `/metrics`, `/healthz` and `/readyz` are served. Default `127.0.0.1:9477`.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Usage (percent) of the store's file system at which unused nix images are removed,
    /// least recently used first. Default 85.
    pub gc_high_watermark_percent: Option<u8>,
    /// Usage (percent) that collection brings the file system down to. Default 80.
    pub gc_low_watermark_percent: Option<u8>,
    /// Store size (NAR bytes) at which unused nix images are removed too. Default: no limit.
    pub gc_max_store_bytes: Option<u64>,
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml_from_str(&text).map_err(|message| ConfigError::Parse {
            path: path.to_owned(),
            message,
        })
    }

    /// `self` with every setting `overrides` makes replacing ours (lists replace, not extend).
    pub fn overridden_by(self, overrides: Config) -> Config {
        // Destructured without `..`: a new field that is not merged here does not compile.
        let Config {
            root,
            substituters,
            trusted_public_keys,
            no_require_sigs,
            jobs,
            connect_timeout_secs,
            stall_timeout_secs,
            retries,
            listen,
            upstream,
            registry_addr,
            runtime_handler,
            upstream_runtime_handler,
            allow_all_sandboxes,
            metrics_addr,
            gc_high_watermark_percent,
            gc_low_watermark_percent,
            gc_max_store_bytes,
        } = overrides;
        let list =
            |ours: Vec<String>, theirs: Vec<String>| if theirs.is_empty() { ours } else { theirs };
        Config {
            root: root.or(self.root),
            substituters: list(self.substituters, substituters),
            trusted_public_keys: list(self.trusted_public_keys, trusted_public_keys),
            no_require_sigs: no_require_sigs.or(self.no_require_sigs),
            jobs: jobs.or(self.jobs),
            connect_timeout_secs: connect_timeout_secs.or(self.connect_timeout_secs),
            stall_timeout_secs: stall_timeout_secs.or(self.stall_timeout_secs),
            retries: retries.or(self.retries),
            listen: listen.or(self.listen),
            upstream: upstream.or(self.upstream),
            registry_addr: registry_addr.or(self.registry_addr),
            runtime_handler: runtime_handler.or(self.runtime_handler),
            upstream_runtime_handler: upstream_runtime_handler.or(self.upstream_runtime_handler),
            allow_all_sandboxes: allow_all_sandboxes.or(self.allow_all_sandboxes),
            metrics_addr: metrics_addr.or(self.metrics_addr),
            gc_high_watermark_percent: gc_high_watermark_percent.or(self.gc_high_watermark_percent),
            gc_low_watermark_percent: gc_low_watermark_percent.or(self.gc_low_watermark_percent),
            gc_max_store_bytes: gc_max_store_bytes.or(self.gc_max_store_bytes),
        }
    }

    pub fn metrics_addr(&self) -> Result<std::net::SocketAddr, ConfigError> {
        match self.metrics_addr {
            Some(addr) => Ok(addr),
            None => DEFAULT_METRICS_ADDR
                .parse()
                .map_err(|e| ConfigError::Invalid(format!("metrics_addr: {e}"))),
        }
    }

    pub fn gc_policy(&self) -> Result<crate::cri::GcPolicy, ConfigError> {
        let mut policy = crate::cri::GcPolicy::default();
        if let Some(high) = self.gc_high_watermark_percent {
            policy.high_percent = high;
        }
        if let Some(low) = self.gc_low_watermark_percent {
            policy.low_percent = low;
        }
        policy.max_store_bytes = self.gc_max_store_bytes;
        if policy.high_percent > 100 || policy.low_percent >= policy.high_percent {
            return Err(ConfigError::Invalid(format!(
                "gc watermarks must satisfy low < high <= 100 (low {}, high {})",
                policy.low_percent, policy.high_percent
            )));
        }
        Ok(policy)
    }

    pub fn root(&self) -> PathBuf {
        self.root
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_ROOT))
    }

    pub fn listen(&self) -> PathBuf {
        self.listen
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_LISTEN))
    }

    pub fn upstream(&self) -> PathBuf {
        self.upstream
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_UPSTREAM))
    }

    pub fn proxy_config(&self) -> Result<crate::cri::ProxyConfig, ConfigError> {
        let registry_addr = match self.registry_addr {
            Some(addr) => addr,
            None => DEFAULT_REGISTRY_ADDR
                .parse()
                .map_err(|e| ConfigError::Invalid(format!("registry_addr: {e}")))?,
        };
        if !registry_addr.ip().is_loopback() {
            return Err(ConfigError::Invalid(format!(
                "registry_addr {registry_addr} must be a loopback address: root images are for \
                 this node's runtime only"
            )));
        }
        let runtime_handler = self
            .runtime_handler
            .clone()
            .unwrap_or_else(|| DEFAULT_RUNTIME_HANDLER.to_owned());
        if runtime_handler.is_empty() {
            return Err(ConfigError::Invalid(
                "runtime_handler must not be empty: pods opt in by naming it".into(),
            ));
        }
        Ok(crate::cri::ProxyConfig {
            runtime_handler,
            upstream_runtime_handler: self.upstream_runtime_handler.clone().unwrap_or_default(),
            allow_all_sandboxes: self.allow_all_sandboxes.unwrap_or(false),
            registry_addr,
        })
    }

    /// Checks all that `serve` checks of its configuration before it starts, so that
    /// `install` can refuse a file `serve` would refuse.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.proxy_config()?;
        self.gc_policy()?;
        self.metrics_addr()?;
        self.require_substituters()?;
        self.substituter_urls()?;
        self.substituter_config()?;
        self.fetch_config()?;
        Ok(())
    }

    pub fn require_substituters(&self) -> Result<(), ConfigError> {
        if self.substituters.is_empty() {
            return Err(ConfigError::Invalid(
                "no substituters: give --substituter URL or set substituters in the config file"
                    .into(),
            ));
        }
        Ok(())
    }

    pub fn substituter_urls(&self) -> Result<Vec<SubstituterUrl>, ConfigError> {
        Ok(self
            .substituters
            .iter()
            .map(|s| SubstituterUrl::parse(s))
            .collect::<Result<_, _>>()?)
    }

    pub fn fetch_config(&self) -> Result<FetchConfig, ConfigError> {
        let mut fetch = FetchConfig::default();
        if let Some(secs) = self.connect_timeout_secs {
            fetch.connect_timeout = seconds("connect_timeout_secs", secs)?;
        }
        if let Some(secs) = self.stall_timeout_secs {
            fetch.stall_timeout = seconds("stall_timeout_secs", secs)?;
        }
        if let Some(retries) = self.retries {
            fetch.max_retries = retries;
        }
        Ok(fetch)
    }

    pub fn substituter_config(&self) -> Result<SubstituterConfig, ConfigError> {
        let keys = self
            .trusted_public_keys
            .iter()
            .map(|key| {
                VerifyingKey::parse(key).map_err(|e| ConfigError::TrustedKey {
                    key: key.clone(),
                    why: e.to_string(),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut config = SubstituterConfig::new(TrustedKeys::new(keys));
        config.require_sigs = !self.no_require_sigs.unwrap_or(false);
        if let Some(jobs) = self.jobs {
            if jobs == 0 {
                return Err(ConfigError::Invalid("jobs must be at least 1".into()));
            }
            config.nar_jobs = jobs;
        }
        Ok(config)
    }
}

fn seconds(key: &str, secs: f64) -> Result<Duration, ConfigError> {
    Duration::try_from_secs_f64(secs)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| ConfigError::Invalid(format!("{key} must be a positive number of seconds")))
}

/// The command-line flag of a config key: the key with dashes, singular for the repeatable
/// list flags.
pub fn flag_for_key(key: &str) -> String {
    match key {
        "substituters" => "--substituter".to_owned(),
        "trusted_public_keys" => "--trusted-public-key".to_owned(),
        _ => format!("--{}", key.replace('_', "-")),
    }
}

/// The reference table of every key, read from the doc comments of [`Config`] in this file,
/// so docs/configuration.md is generated from the type and a test keeps them equal.
pub fn reference_table() -> String {
    let source = include_str!("config.rs");
    let mut rows = vec![
        "| key | flag | type | meaning |".to_owned(),
        "| --- | --- | --- | --- |".to_owned(),
    ];
    let mut doc = Vec::new();
    let mut inside = false;
    for line in source.lines() {
        let line = line.trim();
        if line == "pub struct Config {" {
            inside = true;
            continue;
        }
        if !inside {
            continue;
        }
        if line == "}" {
            break;
        }
        if let Some(text) = line.strip_prefix("///") {
            doc.push(text.trim().to_owned());
        } else if let Some(field) = line.strip_prefix("pub ") {
            let Some((name, ty)) = field.split_once(':') else {
                continue;
            };
            let ty = ty.trim().trim_end_matches(',');
            let ty = ty
                .strip_prefix("Option<")
                .and_then(|t| t.strip_suffix('>'))
                .unwrap_or(ty)
                .rsplit("::")
                .next()
                .unwrap_or(ty);
            rows.push(format!(
                "| `{name}` | `{}` | {ty} | {} |",
                flag_for_key(name),
                doc.join(" ")
            ));
            doc.clear();
        }
    }
    rows.join("\n") + "\n"
}

fn toml_from_str(text: &str) -> Result<Config, String> {
    toml::from_str(text).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_the_file() {
        let file: Config = toml_from_str(
            r#"
            root = "/srv/nix-cri"
            substituters = ["https://a.example", "https://b.example"]
            retries = 5
            jobs = 4
            "#,
        )
        .unwrap();
        let flags = Config {
            substituters: vec!["file:///tmp/c".into()],
            jobs: Some(8),
            ..Config::default()
        };
        let merged = file.overridden_by(flags);
        assert_eq!(merged.root(), PathBuf::from("/srv/nix-cri"));
        assert_eq!(merged.substituters, vec!["file:///tmp/c".to_owned()]);
        assert_eq!(merged.retries, Some(5));
        assert_eq!(merged.jobs, Some(8));
    }

    #[test]
    fn every_serve_key_can_be_overridden() {
        let file: Config = toml_from_str(
            r#"
            listen = "/run/a.sock"
            upstream = "/run/b.sock"
            registry_addr = "127.0.0.1:1"
            runtime_handler = "nixos"
            "#,
        )
        .unwrap();
        let flags = Config {
            listen: Some("/run/c.sock".into()),
            upstream: Some("/run/d.sock".into()),
            registry_addr: Some("127.0.0.1:0".parse().unwrap()),
            upstream_runtime_handler: Some("runc".into()),
            allow_all_sandboxes: Some(true),
            ..Config::default()
        };
        let merged = file.overridden_by(flags);
        assert_eq!(merged.listen(), PathBuf::from("/run/c.sock"));
        assert_eq!(merged.upstream(), PathBuf::from("/run/d.sock"));
        let proxy = merged.proxy_config().unwrap();
        assert_eq!(proxy.registry_addr.port(), 0);
        assert_eq!(proxy.runtime_handler, "nixos");
        assert_eq!(proxy.upstream_runtime_handler, "runc");
        assert!(proxy.allow_all_sandboxes);
        let remote = Config {
            registry_addr: Some("10.0.0.1:5000".parse().unwrap()),
            ..Config::default()
        };
        assert!(
            remote
                .proxy_config()
                .unwrap_err()
                .to_string()
                .contains("loopback")
        );
    }

    /// docs/configuration.md holds the generated table between two markers. Regenerate it
    /// with `NIX_CRI_UPDATE_DOCS=1 cargo test -p nix-cri --lib config`.
    #[test]
    fn configuration_reference_matches_the_config_type() {
        const BEGIN: &str = "<!-- BEGIN GENERATED from src/config.rs: do not edit -->\n";
        const END: &str = "<!-- END GENERATED -->";
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/configuration.md");
        let doc = std::fs::read_to_string(path).unwrap_or_default();
        let table = reference_table();
        let (before, rest) = doc.split_once(BEGIN).unwrap_or((&doc, ""));
        let after = rest.split_once(END).map(|(_, a)| a).unwrap_or("");
        let current = rest.split_once(END).map(|(t, _)| t).unwrap_or("");
        if std::env::var_os("NIX_CRI_UPDATE_DOCS").is_some() {
            std::fs::write(path, format!("{before}{BEGIN}{table}{END}{after}")).unwrap();
            return;
        }
        assert_eq!(
            current, table,
            "docs/configuration.md is out of date: run NIX_CRI_UPDATE_DOCS=1 cargo test -p nix-cri --lib config"
        );
        assert!(table.contains("`gc_max_store_bytes`"), "{table}");
    }

    #[test]
    fn validate_refuses_what_serve_would() {
        let good = toml_from_str("substituters = [\"https://cache.nixos.org\"]\n").unwrap();
        good.validate().unwrap();
        for (text, why) in [
            ("", "no substituters"),
            ("substituters = [\"gopher://x\"]\n", "gopher"),
            (
                "substituters = [\"file:///c\"]\ntrusted_public_keys = [\"k:not-base64\"]\n",
                "k:not-base64",
            ),
            ("substituters = [\"file:///c\"]\njobs = 0\n", "jobs"),
            (
                "substituters = [\"file:///c\"]\nregistry_addr = \"10.0.0.1:5000\"\n",
                "loopback",
            ),
            (
                "substituters = [\"file:///c\"]\ngc_low_watermark_percent = 95\n",
                "watermarks",
            ),
        ] {
            let err = toml_from_str(text)
                .unwrap()
                .validate()
                .unwrap_err()
                .to_string();
            assert!(err.contains(why), "{text}: {err}");
        }
    }

    #[test]
    fn gc_watermarks_are_checked() {
        let config = Config {
            gc_high_watermark_percent: Some(70),
            gc_low_watermark_percent: Some(75),
            ..Config::default()
        };
        assert!(
            config
                .gc_policy()
                .unwrap_err()
                .to_string()
                .contains("low < high")
        );
        let policy = Config::default().gc_policy().unwrap();
        assert_eq!((policy.high_percent, policy.low_percent), (85, 80));
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        let err = toml_from_str("substituter = []").unwrap_err();
        assert!(err.contains("substituter"), "{err}");
        let config = Config {
            stall_timeout_secs: Some(0.0),
            ..Config::default()
        };
        assert!(
            config
                .fetch_config()
                .unwrap_err()
                .to_string()
                .contains("stall_timeout_secs")
        );
        let config = Config {
            trusted_public_keys: vec!["nokey".into()],
            ..Config::default()
        };
        assert!(
            config
                .substituter_config()
                .unwrap_err()
                .to_string()
                .contains("nokey")
        );
    }

    #[test]
    fn defaults_keep_away_from_the_hosts_nix() {
        let config = Config::default();
        assert_eq!(config.root(), PathBuf::from("/var/lib/nix-cri"));
        assert!(config.substituter_config().unwrap().require_sigs);
    }
}
