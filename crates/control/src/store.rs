//! The embedded store: every object in one SQLite file, written in
//! transactions so an apply lands whole or not at all and survives a crash.

use std::path::Path;

use rusqlite::{Connection, OptionalExtension, params};
use waystone_model::Resource;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store {path}: {source}")]
    Open {
        path: String,
        source: rusqlite::Error,
    },
    #[error("store: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("store holds an unreadable {kind} {namespace}/{name}: {reason}")]
    Corrupt {
        kind: String,
        namespace: String,
        name: String,
        reason: String,
    },
}

/// One write of a batch.
pub enum Write {
    Put(Box<Resource>),
    Delete {
        kind: &'static str,
        namespace: String,
        name: String,
    },
}

pub struct Store {
    conn: Connection,
}

impl Store {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let open = |source| StoreError::Open {
            path: path.display().to_string(),
            source,
        };
        let conn = Connection::open(path).map_err(open)?;
        // WAL + FULL sync: an acknowledged write survives a crash or power loss.
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(open)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(open)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(open)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS objects (
                kind TEXT NOT NULL,
                namespace TEXT NOT NULL,
                name TEXT NOT NULL,
                body TEXT NOT NULL,
                PRIMARY KEY (kind, namespace, name)
            );
            CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
            INSERT OR IGNORE INTO counters (name, value) VALUES ('resourceVersion', 0);",
        )
        .map_err(open)?;
        Ok(Self { conn })
    }

    /// The next resourceVersion (not yet stored: commit it with [`Store::commit`]).
    pub fn current_version(&self) -> Result<u64, StoreError> {
        let v: i64 = self.conn.query_row(
            "SELECT value FROM counters WHERE name = 'resourceVersion'",
            [],
            |r| r.get(0),
        )?;
        Ok(v as u64)
    }

    pub fn get(
        &self,
        kind: &str,
        namespace: &str,
        name: &str,
    ) -> Result<Option<Resource>, StoreError> {
        let body: Option<String> = self
            .conn
            .query_row(
                "SELECT body FROM objects WHERE kind = ?1 AND namespace = ?2 AND name = ?3",
                params![kind, namespace, name],
                |r| r.get(0),
            )
            .optional()?;
        body.map(|b| decode(kind, namespace, name, &b)).transpose()
    }

    /// Objects of `kind` (all kinds when `None`), optionally in one namespace, sorted.
    pub fn list(
        &self,
        kind: Option<&str>,
        namespace: Option<&str>,
    ) -> Result<Vec<Resource>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT kind, namespace, name, body FROM objects
             WHERE (?1 IS NULL OR kind = ?1) AND (?2 IS NULL OR namespace = ?2)
             ORDER BY kind, namespace, name",
        )?;
        let rows = stmt.query_map(params![kind, namespace], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (k, ns, n, body) = row?;
            out.push(decode(&k, &ns, &n, &body)?);
        }
        Ok(out)
    }

    /// Applies `writes` in one transaction and records `version` as the latest resourceVersion.
    pub fn commit(&mut self, writes: &[Write], version: u64) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        for w in writes {
            match w {
                Write::Put(obj) => {
                    let meta = obj.meta();
                    tx.execute(
                        "INSERT INTO objects (kind, namespace, name, body) VALUES (?1, ?2, ?3, ?4)
                         ON CONFLICT (kind, namespace, name) DO UPDATE SET body = excluded.body",
                        params![
                            obj.kind_info().kind,
                            meta.namespace.as_deref().unwrap_or(""),
                            meta.name,
                            obj.to_json().to_string()
                        ],
                    )?;
                }
                Write::Delete {
                    kind,
                    namespace,
                    name,
                } => {
                    tx.execute(
                        "DELETE FROM objects WHERE kind = ?1 AND namespace = ?2 AND name = ?3",
                        params![kind, namespace, name],
                    )?;
                }
            }
        }
        tx.execute(
            "UPDATE counters SET value = ?1 WHERE name = 'resourceVersion'",
            params![version as i64],
        )?;
        tx.commit()?;
        Ok(())
    }
}

fn decode(kind: &str, namespace: &str, name: &str, body: &str) -> Result<Resource, StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt {
        kind: kind.to_string(),
        namespace: namespace.to_string(),
        name: name.to_string(),
        reason,
    };
    let value: serde_json::Value =
        serde_json::from_str(body).map_err(|e| corrupt(e.to_string()))?;
    Resource::from_json(value).map_err(|e| corrupt(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wasmplugin(name: &str) -> Resource {
        let mut r = waystone_model::parse_manifests(
            &format!(
                "apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata:\n  name: {name}\nspec:\n  url: file:///x.wasm\n"
            ),
            "test",
        )
        .unwrap()
        .remove(0);
        r.set_default_namespace("default");
        r
    }

    #[test]
    fn writes_are_atomic_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        {
            let mut s = Store::open(&path).unwrap();
            s.commit(
                &[
                    Write::Put(Box::new(wasmplugin("a"))),
                    Write::Put(Box::new(wasmplugin("b"))),
                ],
                2,
            )
            .unwrap();
            s.commit(
                &[Write::Delete {
                    kind: "WasmPlugin",
                    namespace: "default".into(),
                    name: "a".into(),
                }],
                3,
            )
            .unwrap();
        }
        let s = Store::open(&path).unwrap();
        assert_eq!(s.current_version().unwrap(), 3);
        let all = s.list(Some("WasmPlugin"), None).unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].meta().name, "b");
        assert!(s.get("WasmPlugin", "default", "a").unwrap().is_none());
        assert!(s.get("WasmPlugin", "default", "b").unwrap().is_some());
        assert!(
            s.list(Some("WasmPlugin"), Some("other"))
                .unwrap()
                .is_empty()
        );
    }
}
