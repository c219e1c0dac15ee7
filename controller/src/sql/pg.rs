//! PostgreSQL behind [`super::Conn`]: its client library blocks on a runtime of its
//! own, so the connection lives on a thread of its own and statements reach it as
//! messages; TLS as `crate::pg_tls` sets it up.

use super::*;

pub(super) enum Request {
    Execute(String, Vec<Value>),
    Query(String, Vec<Value>),
    Batch(String),
    Begin,
    /// COMMIT, or ROLLBACK.
    End {
        commit: bool,
    },
}

pub(super) enum Reply {
    Count(u64),
    Rows(Vec<Row>),
    Done,
}

type Job = (Request, mpsc::SyncSender<Result<Reply>>);

/// The PostgreSQL connection's thread, and the way to it.
#[derive(Debug)]
pub struct Pg {
    jobs: mpsc::Sender<Job>,
}

impl Pg {
    /// Connects (and fails now if the server cannot be reached); the thread reconnects
    /// later if the connection is lost, though never inside a transaction.
    pub fn connect(url: &str) -> Result<Pg> {
        let (jobs, rx) = mpsc::channel::<Job>();
        let (ready, connected) = mpsc::sync_channel(1);
        let url = url.to_owned();
        std::thread::Builder::new().name("postgres".into()).spawn(move || match connect(&url) {
            Ok(client) => {
                let _ = ready.send(Ok(()));
                serve(&url, client, rx);
            }
            Err(e) => {
                let _ = ready.send(Err(e.context(format!("connecting to PostgreSQL at {}", redact(&url)))));
            }
        })?;
        connected.recv().map_err(|_| anyhow!("the PostgreSQL connection's thread ended"))??;
        Ok(Pg { jobs })
    }

    pub(super) fn call(&mut self, req: Request) -> Result<Reply> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.jobs.send((req, tx)).map_err(|_| anyhow!("the PostgreSQL connection's thread ended"))?;
        rx.recv().map_err(|_| anyhow!("the PostgreSQL connection's thread ended"))?
    }
}

/// The URL without its password, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            let user = creds.split(':').next().unwrap_or("");
            format!("{}{user}{}", &url[..s + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

/// Where the connection's transaction is.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Tx {
    None,
    Open,
    /// Its connection was lost: every statement fails until it ends.
    Lost,
}

fn serve(url: &str, client: postgres::Client, jobs: mpsc::Receiver<Job>) {
    let mut client = Some(client);
    let mut statements: HashMap<String, postgres::Statement> = HashMap::new();
    let mut tx = Tx::None;
    for (req, reply) in jobs {
        let answer = (|| -> Result<Reply> {
            let lost = || anyhow!("the connection to PostgreSQL was lost during the transaction");
            match (&req, tx) {
                (Request::End { .. }, Tx::Lost) => {
                    tx = Tx::None;
                    return Err(lost());
                }
                (_, Tx::Lost) => return Err(lost()),
                _ => {}
            }
            if client.as_ref().is_none_or(postgres::Client::is_closed) {
                statements.clear();
                if tx == Tx::Open {
                    tx = Tx::Lost;
                    return Err(lost());
                }
                client = Some(connect(url).with_context(|| format!("reconnecting to PostgreSQL at {}", redact(url)))?);
            }
            let c = client.as_mut().context("no connection")?;
            match req {
                Request::Begin => {
                    c.batch_execute("BEGIN")?;
                    tx = Tx::Open;
                    Ok(Reply::Done)
                }
                Request::End { commit } => {
                    tx = Tx::None;
                    c.batch_execute(if commit { "COMMIT" } else { "ROLLBACK" })?;
                    Ok(Reply::Done)
                }
                Request::Batch(sql) => {
                    c.batch_execute(&sql).with_context(|| format!("running {sql}"))?;
                    Ok(Reply::Done)
                }
                Request::Execute(sql, p) => {
                    let st = prepared(c, &mut statements, &sql)?;
                    Ok(Reply::Count(c.execute(&st, &params(&p)).with_context(|| format!("running {sql}"))?))
                }
                Request::Query(sql, p) => {
                    let st = prepared(c, &mut statements, &sql)?;
                    let rows = c.query(&st, &params(&p)).with_context(|| format!("running {sql}"))?;
                    rows.iter()
                        .map(|r| {
                            (0..r.len())
                                .map(|i| r.try_get::<_, Value>(i).with_context(|| format!("column {i} of {sql}")))
                                .collect::<Result<Vec<_>>>()
                                .map(Row)
                        })
                        .collect::<Result<Vec<_>>>()
                        .map(Reply::Rows)
                }
            }
        })();
        // Lost (or never regained) connections say so, for the API's 503.
        let answer = answer.map_err(|e| {
            if client.as_ref().is_none_or(postgres::Client::is_closed) { e.context(Unavailable) } else { e }
        });
        let _ = reply.send(answer);
    }
}

/// A connection with a bounded connect time and TCP keepalives (a server that vanished
/// from the network is noticed instead of waited on for ever).
fn connect(url: &str) -> Result<postgres::Client> {
    let wanted = crate::pg_tls::wanted(url);
    let mut config: postgres::Config =
        wanted.url.parse().with_context(|| format!("{} is not a PostgreSQL URL", redact(url)))?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(std::time::Duration::from_secs(10));
    }
    config.keepalives(true).keepalives_idle(std::time::Duration::from_secs(30));
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .map(|h| match h {
            postgres::config::Host::Tcp(name) => name.clone(),
            postgres::config::Host::Unix(dir) => dir.display().to_string(),
        })
        .collect();
    crate::pg_tls::check(&hosts, &wanted)?;
    match &wanted.root_cert {
        Some(ca) if wanted.tls => {
            config.ssl_mode(postgres::config::SslMode::Require);
            Ok(config.connect(crate::pg_tls::Connector::new(ca)?)?)
        }
        _ => Ok(config.connect(postgres::NoTls)?),
    }
}

fn params(p: &[Value]) -> Vec<&(dyn postgres::types::ToSql + Sync)> {
    p.iter().map(|p| p as &(dyn postgres::types::ToSql + Sync)).collect()
}

fn prepared(
    c: &mut postgres::Client,
    cache: &mut HashMap<String, postgres::Statement>,
    sql: &str,
) -> Result<postgres::Statement> {
    if let Some(st) = cache.get(sql) {
        return Ok(st.clone());
    }
    let st = c.prepare(sql).with_context(|| format!("preparing {sql}"))?;
    cache.insert(sql.to_owned(), st.clone());
    Ok(st)
}

// Values convert to whatever type PostgreSQL inferred for the parameter (an integer
// compared with a literal is an int4 there), and back from the column types the schema
// uses.
impl postgres::types::ToSql for Value {
    fn to_sql(
        &self,
        ty: &postgres::types::Type,
        out: &mut postgres::types::private::BytesMut,
    ) -> std::result::Result<postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        use postgres::types::{IsNull, Type};
        match (self, ty) {
            (Value::Null, _) => Ok(IsNull::Yes),
            (Value::Int(i), &Type::INT8) => i.to_sql(ty, out),
            (Value::Int(i), &Type::INT4) => i32::try_from(*i)?.to_sql(ty, out),
            (Value::Int(i), &Type::INT2) => i16::try_from(*i)?.to_sql(ty, out),
            (Value::Int(i), &Type::BOOL) => (*i != 0).to_sql(ty, out),
            (Value::Int(i), &Type::TEXT | &Type::VARCHAR) => i.to_string().to_sql(ty, out),
            (Value::Text(s), _) => s.to_sql(ty, out),
            (Value::Blob(b), _) => b.to_sql(ty, out),
            (v, ty) => Err(format!("cannot bind {v:?} as {ty}").into()),
        }
    }

    fn accepts(_: &postgres::types::Type) -> bool {
        true
    }

    postgres::types::to_sql_checked!();
}

impl<'a> postgres::types::FromSql<'a> for Value {
    fn from_sql(
        ty: &postgres::types::Type,
        raw: &'a [u8],
    ) -> std::result::Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        use postgres::types::Type;
        Ok(match *ty {
            Type::INT8 => Value::Int(i64::from_sql(ty, raw)?),
            Type::INT4 => Value::Int(i32::from_sql(ty, raw)?.into()),
            Type::INT2 => Value::Int(i16::from_sql(ty, raw)?.into()),
            Type::BOOL => Value::Int(bool::from_sql(ty, raw)?.into()),
            Type::BYTEA => Value::Blob(raw.to_vec()),
            _ => Value::Text(String::from_sql(ty, raw)?),
        })
    }

    fn from_sql_null(_: &postgres::types::Type) -> std::result::Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Value::Null)
    }

    fn accepts(ty: &postgres::types::Type) -> bool {
        use postgres::types::Type;
        matches!(*ty, Type::INT8 | Type::INT4 | Type::INT2 | Type::BOOL | Type::BYTEA | Type::TEXT | Type::VARCHAR)
    }
}
