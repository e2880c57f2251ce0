//! Substituter URLs as Nix users write them: `https://cache.example.org?priority=30`,
//! `http://127.0.0.1:8080`, `file:///srv/cache`.

use std::fmt;
use std::path::PathBuf;

use super::CacheError;

/// Nix's default priority for a cache whose `nix-cache-info` names none.
pub const DEFAULT_PRIORITY: u64 = 50;

/// Where a binary cache lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    /// `http://` or `https://`; the base never ends with `/`.
    Http { base: String },
    /// `file://` followed by an absolute directory.
    File { dir: PathBuf },
}

/// One configured binary cache.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubstituterUrl {
    /// The URL as given, for messages and metrics.
    display: String,
    location: Location,
    /// `?priority=N` in the URL overrides the cache's own `nix-cache-info`, as in Nix.
    priority_override: Option<u64>,
}

impl SubstituterUrl {
    pub fn parse(url: &str) -> Result<Self, CacheError> {
        let invalid = |why: &str| CacheError::InvalidUrl {
            url: url.to_owned(),
            why: why.to_owned(),
        };
        let (without_query, query) = match url.split_once('?') {
            Some((u, q)) => (u, Some(q)),
            None => (url, None),
        };
        let mut priority_override = None;
        for param in query.into_iter().flat_map(|q| q.split('&')) {
            match param.split_once('=') {
                Some(("priority", value)) => {
                    let priority = value
                        .parse()
                        .map_err(|_| invalid("priority must be a whole number"))?;
                    priority_override = Some(priority);
                }
                // Nix accepts many store parameters (trusted, want-mass-query, …); those that do
                // not change how we fetch are ignored rather than refused, so users can reuse
                // their nix.conf lines unchanged.
                _ => tracing::debug!(url, param, "ignoring substituter parameter"),
            }
        }
        let location = if let Some(rest) = without_query.strip_prefix("file://") {
            if !rest.starts_with('/') {
                return Err(invalid("file:// needs an absolute path"));
            }
            Location::File {
                dir: PathBuf::from(rest.trim_end_matches('/')),
            }
        } else if without_query.starts_with("http://") || without_query.starts_with("https://") {
            let base = without_query.trim_end_matches('/');
            base.parse::<http::Uri>()
                .map_err(|e| invalid(&format!("not a valid URL: {e}")))?;
            Location::Http {
                base: base.to_owned(),
            }
        } else {
            return Err(invalid(
                "only http://, https:// and file:// caches are supported",
            ));
        };
        Ok(Self {
            display: url.to_owned(),
            location,
            priority_override,
        })
    }

    pub fn location(&self) -> &Location {
        &self.location
    }

    pub fn priority_override(&self) -> Option<u64> {
        self.priority_override
    }

    pub fn as_str(&self) -> &str {
        &self.display
    }

    /// A short label for metrics: the scheme and authority, or `file`.
    pub fn label(&self) -> &str {
        match &self.location {
            Location::Http { base } => base,
            Location::File { .. } => "file",
        }
    }
}

impl fmt::Display for SubstituterUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.display)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_forms_nix_users_write() {
        let u = SubstituterUrl::parse("https://cache.nixos.org/?priority=40").unwrap();
        assert_eq!(
            u.location(),
            &Location::Http {
                base: "https://cache.nixos.org".into()
            }
        );
        assert_eq!(u.priority_override(), Some(40));

        let u = SubstituterUrl::parse("file:///srv/cache/").unwrap();
        assert_eq!(
            u.location(),
            &Location::File {
                dir: "/srv/cache".into()
            }
        );
        assert_eq!(u.priority_override(), None);

        let u = SubstituterUrl::parse("http://127.0.0.1:8080?trusted=1").unwrap();
        assert_eq!(u.as_str(), "http://127.0.0.1:8080?trusted=1");
    }

    #[test]
    fn refuses_what_it_cannot_fetch() {
        for bad in [
            "s3://bucket",
            "file://relative",
            "cache.nixos.org",
            "https://x?priority=high",
        ] {
            let err = SubstituterUrl::parse(bad).unwrap_err().to_string();
            assert!(err.contains(bad), "{err}");
        }
    }
}
