//! Browser sessions of the web UI (kept by the hash of their id).

use anyhow::Result;

use super::*;

fn hash_token(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

impl Db {
    /// A browser session; returns (session id, CSRF token). Only the id's hash is stored.
    pub fn create_session(&self, ttl: i64) -> Result<(String, String)> {
        let (id, csrf) = (crate::random::hex::<32>()?, crate::random::hex::<32>()?);
        let mut c = self.c();
        c.execute("DELETE FROM sessions WHERE expires < ?1", vals![now()])?;
        c.execute(
            "INSERT INTO sessions (id_hash, csrf, expires) VALUES (?1, ?2, ?3)",
            vals![hash_token(&id), csrf.as_str(), now() + ttl],
        )?;
        Ok((id, csrf))
    }

    /// The CSRF token of a live session.
    pub fn session_csrf(&self, id: &str) -> Result<Option<String>> {
        let row = self.c().query_opt(
            "SELECT csrf FROM sessions WHERE id_hash = ?1 AND expires >= ?2",
            vals![hash_token(id), now()],
        )?;
        row.map(|r| r.get(0)).transpose()
    }

    /// Sessions were opened with the admin token: a new token (rotated) ends them all.
    /// Returns how many ended.
    pub fn end_sessions_of_other_tokens(&self, admin_token: &str) -> Result<usize> {
        let current = hash_token(&format!("admin-token:{admin_token}"));
        self.c().transaction(|c| {
            let stored = c.query_opt("SELECT value FROM meta WHERE key = 'admin_token_hash' FOR UPDATE", &[])?;
            if stored.map(|r| r.get::<Vec<u8>>(0)).transpose()?.as_deref() == Some(current.as_slice()) {
                return Ok(0);
            }
            let ended = c.execute("DELETE FROM sessions", &[])?;
            c.execute(
                "INSERT INTO meta (key, value) VALUES ('admin_token_hash', ?1)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                vals![current.clone()],
            )?;
            Ok(ended as usize)
        })
    }

    pub fn delete_session(&self, id: &str) -> Result<()> {
        self.c().execute("DELETE FROM sessions WHERE id_hash = ?1", vals![hash_token(id)])?;
        Ok(())
    }
}
