//! `nix-cache-info`, the file at the root of a binary cache.
//!
//! ```text
//! StoreDir: /nix/store      required; must be the client's store directory
//! WantMassQuery: 1          optional, 0 or 1
//! Priority: 40              optional; lower is preferred
//! ```
//!
//! Unknown keys are ignored; a known key may appear only once.

use std::fmt;

use thiserror::Error;

use super::store_path::STORE_DIR;

/// Why a `nix-cache-info` is invalid or unusable.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CacheInfoError {
    #[error("nix-cache-info line {line} is not of the form 'Key: value': {content:?}")]
    MalformedLine { line: usize, content: String },
    #[error("nix-cache-info field {field} appears more than once")]
    DuplicateField { field: &'static str },
    #[error("nix-cache-info is missing required field StoreDir")]
    MissingStoreDir,
    #[error("nix-cache-info field {field} has invalid value {value:?}")]
    BadValue { field: &'static str, value: String },
    #[error("binary cache has store directory {found:?}, but this store is {expected:?}")]
    StoreDirMismatch { found: String, expected: String },
}

/// A parsed `nix-cache-info`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheInfo {
    store_dir: String,
    want_mass_query: bool,
    priority: Option<u64>,
}

impl CacheInfo {
    pub fn new(store_dir: impl Into<String>, want_mass_query: bool, priority: Option<u64>) -> Self {
        Self {
            store_dir: store_dir.into(),
            want_mass_query,
            priority,
        }
    }

    pub fn parse(text: &str) -> Result<Self, CacheInfoError> {
        let mut store_dir = None;
        let mut want_mass_query = None;
        let mut priority = None;
        for (index, line) in text.lines().enumerate() {
            if line.is_empty() {
                continue;
            }
            let (key, value) =
                line.split_once(':')
                    .ok_or_else(|| CacheInfoError::MalformedLine {
                        line: index + 1,
                        content: line.to_string(),
                    })?;
            let value = value.trim();
            let bad = |field| CacheInfoError::BadValue {
                field,
                value: value.to_string(),
            };
            match key {
                "StoreDir" => set(&mut store_dir, "StoreDir", value.to_string())?,
                "WantMassQuery" => {
                    let v = match value {
                        "1" => true,
                        "0" => false,
                        _ => return Err(bad("WantMassQuery")),
                    };
                    set(&mut want_mass_query, "WantMassQuery", v)?
                }
                "Priority" => {
                    let v = value
                        .bytes()
                        .all(|b| b.is_ascii_digit())
                        .then(|| value.parse().ok())
                        .flatten()
                        .ok_or_else(|| bad("Priority"))?;
                    set(&mut priority, "Priority", v)?
                }
                _ => {}
            }
        }
        Ok(Self {
            store_dir: store_dir.ok_or(CacheInfoError::MissingStoreDir)?,
            want_mass_query: want_mass_query.unwrap_or(false),
            priority,
        })
    }

    pub fn store_dir(&self) -> &str {
        &self.store_dir
    }

    pub fn want_mass_query(&self) -> bool {
        self.want_mass_query
    }

    pub fn priority(&self) -> Option<u64> {
        self.priority
    }

    /// A cache for another store directory holds paths we cannot use.
    pub fn check_store_dir(&self) -> Result<(), CacheInfoError> {
        if self.store_dir != STORE_DIR {
            return Err(CacheInfoError::StoreDirMismatch {
                found: self.store_dir.clone(),
                expected: STORE_DIR.to_string(),
            });
        }
        Ok(())
    }
}

impl fmt::Display for CacheInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "StoreDir: {}", self.store_dir)?;
        if self.want_mass_query {
            writeln!(f, "WantMassQuery: 1")?;
        }
        if let Some(p) = self.priority {
            writeln!(f, "Priority: {p}")?;
        }
        Ok(())
    }
}

fn set<T>(slot: &mut Option<T>, field: &'static str, value: T) -> Result<(), CacheInfoError> {
    if slot.replace(value).is_some() {
        return Err(CacheInfoError::DuplicateField { field });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn real_file_cache() {
        let text = include_str!("testdata/nix-cache-info");
        let info = CacheInfo::parse(text).unwrap();
        assert_eq!(info.store_dir(), "/nix/store");
        assert!(!info.want_mass_query());
        assert_eq!(info.priority(), None);
        info.check_store_dir().unwrap();
        assert_eq!(info.to_string(), text);
    }

    #[test]
    fn cache_nixos_org() {
        let text = "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n";
        let info = CacheInfo::parse(text).unwrap();
        assert!(info.want_mass_query());
        assert_eq!(info.priority(), Some(40));
        assert_eq!(info.to_string(), text);
        assert_eq!(info, CacheInfo::new("/nix/store", true, Some(40)));
        // Unknown keys are ignored.
        assert_eq!(
            CacheInfo::parse(&format!("Foo: bar\n{text}")).unwrap(),
            info
        );
    }

    #[test]
    fn rejects_invalid() {
        let err = |t: &str| CacheInfo::parse(t).unwrap_err();
        assert_eq!(err("WantMassQuery: 1\n"), CacheInfoError::MissingStoreDir);
        assert_eq!(
            err("StoreDir: /nix/store\nStoreDir: /nix/store\n"),
            CacheInfoError::DuplicateField { field: "StoreDir" }
        );
        assert!(matches!(
            err("StoreDir: /nix/store\nWantMassQuery: yes\n"),
            CacheInfoError::BadValue {
                field: "WantMassQuery",
                ..
            }
        ));
        assert!(matches!(
            err("StoreDir: /nix/store\nPriority: -1\n"),
            CacheInfoError::BadValue {
                field: "Priority",
                ..
            }
        ));
        assert!(matches!(
            err("StoreDir /nix/store\n"),
            CacheInfoError::MalformedLine { line: 1, .. }
        ));
        let other = CacheInfo::parse("StoreDir: /gnu/store\n").unwrap();
        let e = other.check_store_dir().unwrap_err();
        assert_eq!(
            e.to_string(),
            "binary cache has store directory \"/gnu/store\", but this store is \"/nix/store\""
        );
    }
}
