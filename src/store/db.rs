//! The store database, in Nix's own schema (version 10), so `nix-store --store ROOT` reads and
//! verifies what nix-cri registered.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, params};

use crate::nix::{STORE_DIR, Sha256Digest, Signature, StorePath, StorePathHash};

use super::StoreError;

/// The schema Nix 2.x creates (`src/libstore/schema.sql`), version 10. Kept byte-compatible in
/// meaning: Nix opens an existing database with `create … if not exists` and expects exactly
/// these tables, indexes and the self-reference trigger.
const SCHEMA: &str = "
create table if not exists ValidPaths (
    id               integer primary key autoincrement not null,
    path             text unique not null,
    hash             text not null,
    registrationTime integer not null,
    deriver          text,
    narSize          integer,
    ultimate         integer,
    sigs             text,
    ca               text
);
create table if not exists Refs (
    referrer  integer not null,
    reference integer not null,
    primary key (referrer, reference),
    foreign key (referrer) references ValidPaths(id) on delete cascade,
    foreign key (reference) references ValidPaths(id) on delete restrict
);
create index if not exists IndexReferrer on Refs(referrer);
create index if not exists IndexReference on Refs(reference);
create trigger if not exists DeleteSelfRefs before delete on ValidPaths
  begin
    delete from Refs where referrer = old.id and reference = old.id;
  end;
create table if not exists DerivationOutputs (
    drv  integer not null,
    id   text not null,
    path text not null,
    primary key (drv, id),
    foreign key (drv) references ValidPaths(id) on delete cascade
);
create index if not exists IndexDerivationOutputs on DerivationOutputs(path);
";

pub const SCHEMA_VERSION: &str = "10";

/// What the database records about a valid path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathInfo {
    pub path: StorePath,
    pub nar_hash: Sha256Digest,
    pub nar_size: u64,
    pub references: BTreeSet<StorePath>,
    pub deriver: Option<StorePath>,
    pub signatures: Vec<Signature>,
    pub ca: Option<String>,
    pub registration_time: i64,
}

pub struct Db {
    conn: Connection,
    file: std::path::PathBuf,
}

impl Db {
    pub fn open(file: &Path) -> Result<Self, StoreError> {
        let err = |source| StoreError::Db {
            file: file.to_owned(),
            source,
        };
        let conn = Connection::open(file).map_err(err)?;
        // The settings Nix itself uses: WAL with normal sync survives a killed process, and
        // foreign keys enforce the closure invariant (no reference to an unregistered path).
        conn.busy_timeout(std::time::Duration::from_secs(60))
            .map_err(err)?;
        conn.pragma_update(None, "foreign_keys", 1).map_err(err)?;
        conn.query_row("pragma journal_mode = wal", [], |_| Ok(()))
            .map_err(err)?;
        conn.pragma_update(None, "synchronous", "normal")
            .map_err(err)?;
        conn.execute_batch(SCHEMA).map_err(err)?;
        Ok(Self {
            conn,
            file: file.to_owned(),
        })
    }

    fn err(&self) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
        |source| StoreError::Db {
            file: self.file.clone(),
            source,
        }
    }

    fn id_of(&self, path: &StorePath) -> Result<Option<i64>, StoreError> {
        self.conn
            .prepare_cached("select id from ValidPaths where path = ?1")
            .and_then(|mut stmt| {
                stmt.query_row([path.to_absolute_path()], |row| row.get(0))
                    .optional()
            })
            .map_err(self.err())
    }

    /// As Nix's `queryPathFromHashPart`: paths sort by hash right after the store dir, so the
    /// first path not below `/nix/store/<hash>` is the only candidate.
    pub fn path_from_hash(&self, hash: &StorePathHash) -> Result<Option<StorePath>, StoreError> {
        let prefix = format!("{STORE_DIR}/{hash}");
        let found: Option<String> = self
            .conn
            .prepare_cached("select path from ValidPaths where path >= ?1 limit 1")
            .and_then(|mut stmt| stmt.query_row([&prefix], |row| row.get(0)).optional())
            .map_err(self.err())?;
        match found {
            Some(text) if text.starts_with(&format!("{prefix}-")) => {
                parse_db_path(&self.file, &text).map(Some)
            }
            _ => Ok(None),
        }
    }

    pub fn is_valid(&self, path: &StorePath) -> Result<bool, StoreError> {
        Ok(self.id_of(path)?.is_some())
    }

    /// Registers `info.path`. Every reference other than the path itself must already be
    /// registered: this is the closure invariant, and the foreign keys refuse anything else.
    pub fn register(&mut self, info: &PathInfo) -> Result<(), StoreError> {
        let path = info.path.to_absolute_path();
        let sigs = info
            .signatures
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(" ");
        let tx = self.conn.transaction().map_err(|source| StoreError::Db {
            file: self.file.clone(),
            source,
        })?;
        let file = self.file.clone();
        let err = |source| StoreError::Db {
            file: file.clone(),
            source,
        };
        tx.execute(
            "insert into ValidPaths (path, hash, registrationTime, deriver, narSize, ultimate, sigs, ca)
             values (?1, ?2, ?3, ?4, ?5, null, ?6, ?7)",
            params![
                path,
                info.nar_hash.to_base16_string(),
                info.registration_time,
                info.deriver.as_ref().map(StorePath::to_absolute_path),
                info.nar_size as i64,
                (!sigs.is_empty()).then_some(sigs),
                info.ca,
            ],
        )
        .map_err(err)?;
        let id = tx.last_insert_rowid();
        for reference in &info.references {
            let reference_id: Option<i64> = if reference == &info.path {
                Some(id)
            } else {
                tx.query_row(
                    "select id from ValidPaths where path = ?1",
                    [reference.to_absolute_path()],
                    |row| row.get(0),
                )
                .optional()
                .map_err(err)?
            };
            let Some(reference_id) = reference_id else {
                return Err(StoreError::MissingReference {
                    path: info.path.clone(),
                    reference: reference.clone(),
                });
            };
            tx.execute(
                "insert or ignore into Refs (referrer, reference) values (?1, ?2)",
                params![id, reference_id],
            )
            .map_err(err)?;
        }
        tx.commit().map_err(err)
    }

    pub fn path_info(&self, path: &StorePath) -> Result<Option<PathInfo>, StoreError> {
        let row = self
            .conn
            .prepare_cached(
                "select id, hash, registrationTime, deriver, narSize, sigs, ca
                 from ValidPaths where path = ?1",
            )
            .and_then(|mut stmt| {
                stmt.query_row([path.to_absolute_path()], |row| {
                    Ok((
                        row.get::<_, i64>(0)?,
                        row.get::<_, String>(1)?,
                        row.get::<_, i64>(2)?,
                        row.get::<_, Option<String>>(3)?,
                        row.get::<_, Option<i64>>(4)?,
                        row.get::<_, Option<String>>(5)?,
                        row.get::<_, Option<String>>(6)?,
                    ))
                })
                .optional()
            })
            .map_err(self.err())?;
        let Some((id, hash, registration_time, deriver, nar_size, sigs, ca)) = row else {
            return Ok(None);
        };
        let corrupt = |what: String| StoreError::CorruptDb {
            file: self.file.clone(),
            path: path.to_absolute_path(),
            what,
        };
        let nar_hash =
            Sha256Digest::parse(&hash).map_err(|e| corrupt(format!("hash {hash:?}: {e}")))?;
        let deriver = deriver
            .map(|d| {
                StorePath::from_absolute_path(&d).map_err(|e| corrupt(format!("deriver: {e}")))
            })
            .transpose()?;
        let signatures = sigs
            .unwrap_or_default()
            .split_whitespace()
            .map(|s| Signature::parse(s).map_err(|e| corrupt(format!("signature {s:?}: {e}"))))
            .collect::<Result<_, _>>()?;
        let references = self.references_of_id(id)?;
        Ok(Some(PathInfo {
            path: path.clone(),
            nar_hash,
            nar_size: nar_size.unwrap_or(0).max(0) as u64,
            references,
            deriver,
            signatures,
            ca,
            registration_time,
        }))
    }

    fn references_of_id(&self, id: i64) -> Result<BTreeSet<StorePath>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "select v.path from Refs r join ValidPaths v on r.reference = v.id
                 where r.referrer = ?1",
            )
            .map_err(self.err())?;
        let rows = stmt
            .query_map([id], |row| row.get::<_, String>(0))
            .map_err(self.err())?;
        let mut refs = BTreeSet::new();
        for row in rows {
            let text = row.map_err(self.err())?;
            refs.insert(parse_db_path(&self.file, &text)?);
        }
        Ok(refs)
    }

    /// The closure of `path` (itself included) with the sum of its NAR sizes, in one recursive
    /// query: a closure of a thousand paths is one round trip, not two thousand.
    pub fn closure(&self, path: &StorePath) -> Result<Option<(Vec<StorePath>, u64)>, StoreError> {
        let Some(id) = self.id_of(path)? else {
            return Ok(None);
        };
        let mut stmt = self
            .conn
            .prepare_cached(
                "with recursive closure(id) as (
                     select ?1
                     union
                     select r.reference from Refs r join closure c on r.referrer = c.id
                 )
                 select v.path, coalesce(v.narSize, 0) from ValidPaths v join closure c on v.id = c.id",
            )
            .map_err(self.err())?;
        let rows = stmt
            .query_map([id], |row| {
                Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?))
            })
            .map_err(self.err())?;
        let mut paths = Vec::new();
        let mut nar_size = 0u64;
        for row in rows {
            let (text, size) = row.map_err(self.err())?;
            paths.push(parse_db_path(&self.file, &text)?);
            nar_size += size.max(0) as u64;
        }
        Ok(Some((paths, nar_size)))
    }

    /// Every valid path with its references, for GC and closure walks.
    pub fn graph(&self) -> Result<HashMap<StorePath, (u64, Vec<StorePath>)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("select id, path, narSize from ValidPaths")
            .map_err(self.err())?;
        let rows = stmt
            .query_map([], |row| {
                Ok((
                    row.get::<_, i64>(0)?,
                    row.get::<_, String>(1)?,
                    row.get::<_, Option<i64>>(2)?,
                ))
            })
            .map_err(self.err())?;
        let mut by_id = HashMap::new();
        for row in rows {
            let (id, path, size) = row.map_err(self.err())?;
            by_id.insert(
                id,
                (
                    parse_db_path(&self.file, &path)?,
                    size.unwrap_or(0).max(0) as u64,
                ),
            );
        }
        let mut graph: HashMap<StorePath, (u64, Vec<StorePath>)> = by_id
            .values()
            .map(|(path, size)| (path.clone(), (*size, Vec::new())))
            .collect();
        let mut stmt = self
            .conn
            .prepare("select referrer, reference from Refs")
            .map_err(self.err())?;
        let rows = stmt
            .query_map([], |row| Ok((row.get::<_, i64>(0)?, row.get::<_, i64>(1)?)))
            .map_err(self.err())?;
        for row in rows {
            let (referrer, reference) = row.map_err(self.err())?;
            if let (Some((from, _)), Some((to, _))) = (by_id.get(&referrer), by_id.get(&reference))
                && let Some(entry) = graph.get_mut(from)
            {
                entry.1.push(to.clone());
            }
        }
        Ok(graph)
    }

    /// Unregisters `paths` in one transaction. The caller guarantees no path outside the set
    /// refers to one inside it (they are all dead), so dropping their own references first
    /// satisfies the `on delete restrict` foreign key whatever the order.
    pub fn unregister(&mut self, paths: &[StorePath]) -> Result<(), StoreError> {
        let file = self.file.clone();
        let err = |source| StoreError::Db {
            file: file.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(err)?;
        for path in paths {
            tx.execute(
                "delete from Refs where referrer = (select id from ValidPaths where path = ?1)",
                [path.to_absolute_path()],
            )
            .map_err(err)?;
        }
        for path in paths {
            tx.execute(
                "delete from ValidPaths where path = ?1",
                [path.to_absolute_path()],
            )
            .map_err(err)?;
        }
        tx.commit().map_err(err)
    }

    /// Total NAR bytes and number of valid paths.
    pub fn usage(&self) -> Result<(u64, u64), StoreError> {
        self.conn
            .query_row(
                "select coalesce(sum(narSize), 0), count(*) from ValidPaths",
                [],
                |row| {
                    Ok((
                        row.get::<_, i64>(0)?.max(0) as u64,
                        row.get::<_, i64>(1)?.max(0) as u64,
                    ))
                },
            )
            .map_err(self.err())
    }
}

fn parse_db_path(file: &Path, text: &str) -> Result<StorePath, StoreError> {
    StorePath::from_absolute_path(text).map_err(|e| StoreError::CorruptDb {
        file: file.to_owned(),
        path: text.to_owned(),
        what: e.to_string(),
    })
}

pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
