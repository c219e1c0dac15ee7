//! One small SQL interface over the controller's two databases: SQLite (embedded, the
//! default) and PostgreSQL (shared by several controllers). `crate::db` writes each
//! statement once, in the dialect both accept, with `?N` parameters; this module binds
//! values, reads rows, and runs transactions on either.
//!
//! PostgreSQL's client library blocks on a runtime of its own, which must not run inside
//! the controller's: the connection lives on a thread of its own, and statements reach it
//! as messages (the caller blocks, as it does on SQLite).

use std::collections::HashMap;
use std::sync::mpsc;

use anyhow::{Context, Result, anyhow, bail};

mod pg;

pub use pg::{Pg, redact};
use pg::{Reply, Request};

/// A value bound to a statement or read from a row. Booleans are stored as integers
/// (0, 1) in both databases; integers are 64-bit.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Int(i64),
    Text(String),
    Blob(Vec<u8>),
}

impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Value::Int(v)
    }
}
impl From<bool> for Value {
    fn from(v: bool) -> Self {
        Value::Int(v.into())
    }
}
impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Value::Text(v.to_owned())
    }
}
impl From<String> for Value {
    fn from(v: String) -> Self {
        Value::Text(v)
    }
}
impl From<&String> for Value {
    fn from(v: &String) -> Self {
        Value::Text(v.clone())
    }
}
impl From<Vec<u8>> for Value {
    fn from(v: Vec<u8>) -> Self {
        Value::Blob(v)
    }
}
impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Self {
        v.map_or(Value::Null, Into::into)
    }
}

/// `vals![a, b]`: statement parameters, each converted with `Value::from`.
macro_rules! vals {
    ($($v:expr),* $(,)?) => { &[$($crate::sql::Value::from($v)),*][..] };
}
pub(crate) use vals;

/// A value read back as a Rust type.
pub trait FromValue: Sized {
    fn from_value(v: &Value) -> Option<Self>;
}
impl FromValue for i64 {
    fn from_value(v: &Value) -> Option<Self> {
        match v {
            Value::Int(i) => Some(*i),
            _ => None,
        }
    }
}
impl FromValue for bool {
    fn from_value(v: &Value) -> Option<Self> {
        i64::from_value(v).map(|i| i != 0)
    }
}
impl FromValue for String {
    fn from_value(v: &Value) -> Option<Self> {
        match v {
            Value::Text(s) => Some(s.clone()),
            _ => None,
        }
    }
}
impl FromValue for Vec<u8> {
    fn from_value(v: &Value) -> Option<Self> {
        match v {
            Value::Blob(b) => Some(b.clone()),
            _ => None,
        }
    }
}
impl<T: FromValue> FromValue for Option<T> {
    fn from_value(v: &Value) -> Option<Self> {
        match v {
            Value::Null => Some(None),
            v => T::from_value(v).map(Some),
        }
    }
}

/// One row of a result.
#[derive(Debug, Clone)]
pub struct Row(Vec<Value>);

impl Row {
    /// Column `i` as a `T`; an error names the column and what it held.
    pub fn get<T: FromValue>(&self, i: usize) -> Result<T> {
        let v = self.0.get(i).with_context(|| format!("no column {i}"))?;
        T::from_value(v).with_context(|| format!("column {i} holds {v:?}, not a {}", std::any::type_name::<T>()))
    }
}

/// The database cannot be reached now (the API answers 503 Service Unavailable).
#[derive(Debug, thiserror::Error)]
#[error("the database server (PostgreSQL) cannot be reached")]
pub struct Unavailable;

/// Which database, from `--database`: a PostgreSQL URL, or an SQLite file.
#[derive(Debug, Clone, PartialEq)]
pub enum Location {
    Sqlite(std::path::PathBuf),
    Postgres(String),
}

impl Location {
    pub fn parse(s: &str) -> Location {
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            Location::Postgres(s.to_owned())
        } else {
            Location::Sqlite(s.strip_prefix("sqlite:").unwrap_or(s).into())
        }
    }
}

/// An open database connection.
#[derive(Debug)]
pub enum Conn {
    Sqlite(rusqlite::Connection),
    Postgres(Pg),
}

impl Conn {
    pub fn is_postgres(&self) -> bool {
        matches!(self, Conn::Postgres(_))
    }

    /// Runs `sql` (`?N` parameters); the number of rows it changed.
    pub fn execute(&mut self, sql: &str, params: &[Value]) -> Result<u64> {
        match self {
            Conn::Sqlite(c) => {
                let mut st = c.prepare_cached(&sqlite_text(sql)).with_context(|| format!("preparing {sql}"))?;
                Ok(st.execute(rusqlite::params_from_iter(params)).with_context(|| format!("running {sql}"))? as u64)
            }
            Conn::Postgres(p) => match p.call(Request::Execute(postgres_text(sql), params.to_vec()))? {
                Reply::Count(n) => Ok(n),
                _ => bail!("unexpected reply"),
            },
        }
    }

    /// The rows `sql` returns.
    pub fn query(&mut self, sql: &str, params: &[Value]) -> Result<Vec<Row>> {
        match self {
            Conn::Sqlite(c) => {
                let mut st = c.prepare_cached(&sqlite_text(sql)).with_context(|| format!("preparing {sql}"))?;
                let n = st.column_count();
                let mut rows =
                    st.query(rusqlite::params_from_iter(params)).with_context(|| format!("running {sql}"))?;
                let mut out = vec![];
                while let Some(r) = rows.next()? {
                    out.push(Row((0..n).map(|i| r.get_ref(i).map(from_sqlite)).collect::<rusqlite::Result<_>>()?));
                }
                Ok(out)
            }
            Conn::Postgres(p) => match p.call(Request::Query(postgres_text(sql), params.to_vec()))? {
                Reply::Rows(rows) => Ok(rows),
                _ => bail!("unexpected reply"),
            },
        }
    }

    /// The one row `sql` returns, if any.
    pub fn query_opt(&mut self, sql: &str, params: &[Value]) -> Result<Option<Row>> {
        Ok(self.query(sql, params)?.into_iter().next())
    }

    /// The one row `sql` must return.
    pub fn query_one(&mut self, sql: &str, params: &[Value]) -> Result<Row> {
        self.query_opt(sql, params)?.with_context(|| format!("no row from {sql}"))
    }

    /// Statements without parameters, separated by `;`.
    pub fn batch(&mut self, sql: &str) -> Result<()> {
        match self {
            Conn::Sqlite(c) => Ok(c.execute_batch(sql)?),
            Conn::Postgres(p) => p.call(Request::Batch(sql.to_owned())).map(drop),
        }
    }

    /// Runs `f` in a transaction: committed if it returns `Ok`, rolled back otherwise.
    /// On SQLite the write lock is taken at the start; on PostgreSQL, rows that decide
    /// a write are read `FOR UPDATE`, so two controllers take turns.
    pub fn transaction<R>(&mut self, f: impl FnOnce(&mut Conn) -> Result<R>) -> Result<R> {
        self.end_or_begin(Request::Begin)?;
        match f(self) {
            Ok(r) => {
                self.end_or_begin(Request::End { commit: true })?;
                Ok(r)
            }
            Err(e) => {
                let _ = self.end_or_begin(Request::End { commit: false });
                Err(e)
            }
        }
    }

    fn end_or_begin(&mut self, req: Request) -> Result<()> {
        match (self, req) {
            (Conn::Sqlite(c), Request::Begin) => Ok(c.execute_batch("BEGIN IMMEDIATE")?),
            (Conn::Sqlite(c), Request::End { commit: true }) => {
                // A failed COMMIT leaves the transaction open in SQLite: end it.
                c.execute_batch("COMMIT").inspect_err(|_| drop(c.execute_batch("ROLLBACK"))).map_err(Into::into)
            }
            (Conn::Sqlite(c), _) => Ok(c.execute_batch("ROLLBACK")?),
            (Conn::Postgres(p), req) => p.call(req).map(drop),
        }
    }
}

/// SQLite has no `FOR UPDATE`: its transactions here take the write lock at `BEGIN`.
fn sqlite_text(sql: &str) -> std::borrow::Cow<'_, str> {
    match sql.strip_suffix(" FOR UPDATE") {
        Some(s) => s.into(),
        None => sql.into(),
    }
}

/// `?N` becomes `$N` (the statements hold no `?` elsewhere).
pub fn postgres_text(sql: &str) -> String {
    sql.replace('?', "$")
}

fn from_sqlite(v: rusqlite::types::ValueRef<'_>) -> Value {
    use rusqlite::types::ValueRef as V;
    match v {
        V::Null => Value::Null,
        V::Integer(i) => Value::Int(i),
        // Not stored by the controller; kept readable rather than refused.
        V::Real(f) => Value::Int(f as i64),
        V::Text(t) => Value::Text(String::from_utf8_lossy(t).into_owned()),
        V::Blob(b) => Value::Blob(b.to_vec()),
    }
}

impl rusqlite::ToSql for Value {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, ValueRef};
        Ok(ToSqlOutput::Borrowed(match self {
            Value::Null => ValueRef::Null,
            Value::Int(i) => ValueRef::Integer(*i),
            Value::Text(s) => ValueRef::Text(s.as_bytes()),
            Value::Blob(b) => ValueRef::Blob(b),
        }))
    }
}

// ---- PostgreSQL ------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_and_locations() {
        assert_eq!(postgres_text("UPDATE t SET a = ?2 WHERE id = ?1"), "UPDATE t SET a = $2 WHERE id = $1");
        assert_eq!(sqlite_text("SELECT a FROM t WHERE id = ?1 FOR UPDATE"), "SELECT a FROM t WHERE id = ?1");
        assert_eq!(Location::parse("postgres://u@h/db"), Location::Postgres("postgres://u@h/db".into()));
        assert_eq!(Location::parse("/var/lib/thymis/db.sqlite"), Location::Sqlite("/var/lib/thymis/db.sqlite".into()));
        assert_eq!(redact("postgres://thymis:s3cret@db.example/fleet"), "postgres://thymis@db.example/fleet");
    }
}
