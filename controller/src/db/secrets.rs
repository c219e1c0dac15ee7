//! Secrets as stored: each value sealed to the controller's key by the caller
//! (`crate::secrets`); nothing here sees a value in clear.

use anyhow::{Context, Result};
use thymis_api::secrets::{Scope, SecretInfo};

use super::*;

/// A stored secret: what is listed, and its sealed value.
#[derive(Debug, Clone)]
pub struct StoredSecret {
    pub info: SecretInfo,
    pub mode: u32,
    pub sealed: Vec<u8>,
}

impl Db {
    pub fn set_secret(
        &self,
        name: &str,
        scope: &Scope,
        owner: &str,
        group: &str,
        mode: u32,
        sealed: &[u8],
    ) -> Result<()> {
        let (kind, of) = scope.parts();
        self.c().transaction(|c| {
            c.execute("DELETE FROM secrets WHERE name = ?1 AND scope_kind = ?2 AND scope = ?3", vals![name, kind, of])?;
            c.execute(
                "INSERT INTO secrets (name, scope_kind, scope, owner, grp, mode, value, updated)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                vals![name, kind, of, owner, group, mode as i64, sealed.to_vec(), now()],
            )?;
            Ok(())
        })
    }

    /// Whether there was one.
    pub fn remove_secret(&self, name: &str, scope: &Scope) -> Result<bool> {
        let (kind, of) = scope.parts();
        let n = self
            .c()
            .execute("DELETE FROM secrets WHERE name = ?1 AND scope_kind = ?2 AND scope = ?3", vals![name, kind, of])?;
        Ok(n > 0)
    }

    /// Every secret, by name and scope.
    pub fn secrets(&self) -> Result<Vec<StoredSecret>> {
        let rows = self.c().query(
            "SELECT name, scope_kind, scope, owner, grp, mode, value, updated FROM secrets ORDER BY name, scope_kind, scope",
            &[],
        )?;
        rows.iter()
            .map(|r| {
                let (kind, of): (String, String) = (r.get(1)?, r.get(2)?);
                let scope = Scope::from_parts(&kind, &of).with_context(|| format!("a secret's scope {kind:?}"))?;
                let mode = r.get::<i64>(5)? as u32;
                Ok(StoredSecret {
                    info: SecretInfo {
                        name: r.get(0)?,
                        scope,
                        owner: r.get(3)?,
                        group: r.get(4)?,
                        mode: format!("{mode:04o}"),
                        updated: r.get(7)?,
                    },
                    mode,
                    sealed: r.get(6)?,
                })
            })
            .collect()
    }
}
