//! Enrollment tokens: issued for a device, kept as a key that cannot make a proof,
//! used once.

use anyhow::{Result, bail};

use super::*;

/// The enrollment token an agent proves it holds.
pub enum Presented<'a> {
    /// Named by its id ([`thymis_proto::handshake::token_id`]); `proves` checks the proof
    /// with the public half of the token's key.
    Key { id: &'a str, proves: &'a dyn Fn(&thymis_store::signing::PublicKey) -> bool },
    /// An older agent's proof, keyed with the token's hash: checked against the tokens
    /// issued before token keys, which were kept by their hash.
    Hash(&'a dyn Fn(&[u8; 32]) -> bool),
}

/// A token found: its key column's value, its device, expiry and whether it was used.
type TokenRow = (Value, String, i64, bool);

impl std::fmt::Debug for Presented<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Presented::Key { id, .. } => write!(f, "Presented::Key({id})"),
            Presented::Hash(_) => f.write_str("Presented::Hash"),
        }
    }
}

/// Forgets the device's enrollment tokens, of either kind.
pub(super) fn delete_tokens(c: &mut Conn, device: &str) -> Result<()> {
    c.execute("DELETE FROM enrollment_tokens WHERE device = ?1", vals![device])?;
    c.execute("DELETE FROM enrollment_keys WHERE device = ?1", vals![device])?;
    Ok(())
}

impl Db {
    /// A new single-use enrollment token for `device`, valid `ttl` seconds; earlier
    /// unused tokens of the device stop working. Kept: its id and its key's public half.
    pub fn issue_token(&self, device: &str, ttl: i64) -> Result<String> {
        use thymis_proto::handshake::{token_id, token_key};
        let token = crate::random::hex::<24>()?;
        let (id, verify_key) = (token_id(&token), token_key(&token).public().to_string());
        self.c().transaction(|c| {
            delete_tokens(c, device)?;
            c.execute(
                "INSERT INTO enrollment_keys (token_id, verify_key, device, expires) VALUES (?1, ?2, ?3, ?4)",
                vals![id, verify_key, device, now() + ttl],
            )
        })?;
        Ok(token)
    }

    /// Binds `public_key` to the device whose token this is; the token is used up.
    pub fn enroll(&self, token: &str, public_key: &str) -> Result<String> {
        use thymis_proto::handshake::{token_id, token_key};
        let (id, key) = (token_id(token), token_key(token).public());
        self.enroll_with(Presented::Key { id: &id, proves: &|k| *k == key }, public_key)
    }

    /// Binds `public_key` to the device of the token the agent proved it holds (the token
    /// itself never arrives). The token is used up.
    pub fn enroll_with(&self, presented: Presented, public_key: &str) -> Result<String> {
        self.c().transaction(|c| {
            let (table, column, found): (&str, &str, Option<TokenRow>) = match &presented {
                Presented::Key { id, proves } => {
                    let row = c.query_opt(
                        "SELECT verify_key, device, expires, used FROM enrollment_keys WHERE token_id = ?1 FOR UPDATE",
                        vals![*id],
                    )?;
                    let found = match row {
                        Some(r) => {
                            let key: String = r.get(0)?;
                            let proved = key.parse().is_ok_and(|k| proves(&k));
                            proved.then(|| -> Result<_> {
                                Ok((Value::from(id.to_string()), r.get(1)?, r.get(2)?, r.get(3)?))
                            })
                        }
                        None => None,
                    };
                    ("enrollment_keys", "token_id", found.transpose()?)
                }
                Presented::Hash(proves) => {
                    let rows = c.query("SELECT hash, device, expires, used FROM enrollment_tokens FOR UPDATE", &[])?;
                    let mut found = None;
                    for r in rows {
                        let hash: Vec<u8> = r.get(0)?;
                        if <[u8; 32]>::try_from(hash.as_slice()).is_ok_and(|h| proves(&h)) {
                            found = Some((Value::from(hash), r.get(1)?, r.get(2)?, r.get(3)?));
                            break;
                        }
                    }
                    ("enrollment_tokens", "hash", found)
                }
            };
            let Some((presented, device, expires, used)) = found else { bail!("unknown enrollment token") };
            if used {
                bail!("enrollment token already used");
            }
            if expires < now() {
                bail!("enrollment token expired");
            }
            let revoked: bool = c.query_one("SELECT revoked FROM devices WHERE name = ?1", vals![&device])?.get(0)?;
            if revoked {
                bail!("device {device} is revoked");
            }
            let key_revoked =
                c.query_opt("SELECT device FROM revoked_keys WHERE public_key = ?1", vals![public_key])?;
            if let Some(was) = key_revoked {
                bail!("this key was revoked (it was {}'s); enrolling takes a new key", was.get::<String>(0)?);
            }
            c.execute(&format!("UPDATE {table} SET used = 1 WHERE {column} = ?1"), &[presented])?;
            c.execute("UPDATE devices SET public_key = NULL WHERE public_key = ?1", vals![public_key])?;
            c.execute("UPDATE devices SET public_key = ?1 WHERE name = ?2", vals![public_key, &device])?;
            Ok(device)
        })
    }
}
