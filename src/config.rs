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
    /// NARs fetched at once. Default 16.
    pub jobs: Option<usize>,
    /// TCP and TLS connect timeout, in seconds. Default 5.
    pub connect_timeout_secs: Option<f64>,
    /// A transfer with no new bytes for this long is abandoned (and retried), in seconds.
    /// Default 30.
    pub stall_timeout_secs: Option<f64>,
    /// Retries of a failed request (server errors, resets, stalls). Default 3.
    pub retries: Option<u32>,
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
    pub fn overridden_by(mut self, overrides: Config) -> Config {
        if overrides.root.is_some() {
            self.root = overrides.root;
        }
        if !overrides.substituters.is_empty() {
            self.substituters = overrides.substituters;
        }
        if !overrides.trusted_public_keys.is_empty() {
            self.trusted_public_keys = overrides.trusted_public_keys;
        }
        macro_rules! take {
            ($($field:ident),*) => { $( if overrides.$field.is_some() { self.$field = overrides.$field; } )* };
        }
        take!(
            no_require_sigs,
            jobs,
            connect_timeout_secs,
            stall_timeout_secs,
            retries
        );
        self
    }

    pub fn root(&self) -> PathBuf {
        self.root
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_ROOT))
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
