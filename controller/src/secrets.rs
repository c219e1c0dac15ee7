//! Per-device secrets: set for a device, a configuration or a tag, kept sealed to the
//! controller's identity key (a database dump or backup holds no value in clear), and
//! sent to each device sealed to that device's key inside its signed offer
//! (`thymis_proto::secrets`). A device's own value overrides its configuration's, which
//! overrides its tags' (the first of its configuration's tags that has one).

use anyhow::{Context, Result, anyhow, bail};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use thymis_api::secrets::{Scope, SecretInfo, SetSecret};
use thymis_proto::secrets::{self as wire, MAX_SECRETS, MAX_VALUE, valid_account, valid_name};
use thymis_store::sealed;
use thymis_store::signing::PublicKey;

use crate::controller::Controller;

/// The context a value is sealed under at rest: which secret it is.
fn at_rest(name: &str, scope: &Scope) -> String {
    let (kind, of) = scope.parts();
    format!("thymis/secret-at-rest/v1\n{kind}\n{of}\n{name}")
}

fn parse_mode(mode: &str) -> Result<u32> {
    let m = u32::from_str_radix(mode.trim_start_matches("0o"), 8)
        .map_err(|_| anyhow!("mode {mode:?} is not octal (e.g. 0400)"))?;
    if m > 0o777 {
        bail!("mode {mode:?} has more than permission bits (at most 0777)");
    }
    Ok(m)
}

/// Sets a secret; its value is sealed before it reaches the database.
pub fn set(ctl: &Controller, req: &SetSecret) -> Result<SecretInfo> {
    if !valid_name(&req.name) {
        bail!("secret name {:?} must be [A-Za-z0-9._-]{{1,64}}, not starting with a dot", req.name);
    }
    for (what, account) in [("owner", &req.owner), ("group", &req.group)] {
        if !valid_account(account) {
            bail!("{what} {account:?} is not a user or group name (or number)");
        }
    }
    let mode = parse_mode(&req.mode)?;
    let value = STANDARD.decode(&req.value).context("the value is not base64")?;
    if value.len() > MAX_VALUE {
        bail!("the value has {} bytes; a secret holds at most {MAX_VALUE}", value.len());
    }
    match &req.scope {
        Scope::Device(d) if ctl.db.device(d)?.is_none() => bail!("no device {d:?}"),
        Scope::Config(c) if !ctl.project.toml_worktree()?.configs.contains_key(c) => {
            bail!("no configuration {c:?} in thymis.toml")
        }
        Scope::Tag(t) if ctl.project.toml_worktree()?.with_tag(t).is_empty() => {
            bail!("no configuration carries tag {t:?}")
        }
        _ => {}
    }
    let sealed = sealed::seal(&ctl.identity.public(), &at_rest(&req.name, &req.scope), &value)?;
    ctl.db.set_secret(&req.name, &req.scope, &req.owner, &req.group, mode, &sealed)?;
    list(ctl)?
        .into_iter()
        .find(|s| s.name == req.name && s.scope == req.scope)
        .context("the secret vanished after it was set")
}

pub fn list(ctl: &Controller) -> Result<Vec<SecretInfo>> {
    Ok(ctl.db.secrets()?.into_iter().map(|s| s.info).collect())
}

/// The secrets `device` (bound to `config`, whose tags are `tags`) gets, sealed to its
/// key for this deployment (base64); none for a device whose key is unknown.
pub fn for_device(
    ctl: &Controller,
    device: &str,
    config: &str,
    tags: &[String],
    deployment_id: &str,
) -> Result<Option<String>> {
    let Some(row) = ctl.db.device(device)? else { return Ok(None) };
    let Some(key) = row.public_key.as_deref() else { return Ok(None) };
    let key: PublicKey = key.parse().map_err(|e| anyhow!("device {device}'s key: {e}"))?;
    let secrets = secrets_of(ctl, device, config, tags)?;
    Ok(Some(seal_for(&key, device, deployment_id, secrets)?))
}

/// `secrets` sealed to `key` for `device`'s deployment `deployment_id` (base64).
pub fn seal_for(key: &PublicKey, device: &str, deployment_id: &str, secrets: Vec<wire::Secret>) -> Result<String> {
    let payload = wire::Secrets { device: device.to_owned(), deployment_id: deployment_id.to_owned(), secrets };
    let sealed = sealed::seal(key, &wire::context(device, deployment_id), &serde_json::to_vec(&payload)?)?;
    Ok(STANDARD.encode(sealed))
}

/// The secrets that apply to `device`, opened from their seal at rest.
pub fn secrets_of(ctl: &Controller, device: &str, config: &str, tags: &[String]) -> Result<Vec<wire::Secret>> {
    // The most specific scope wins: device, then configuration, then its tags in order.
    let rank = |scope: &Scope| match scope {
        Scope::Device(d) if d == device => Some(0),
        Scope::Config(c) if c == config => Some(1),
        Scope::Tag(t) => tags.iter().position(|x| x == t).map(|i| 2 + i),
        _ => None,
    };
    let mut chosen: std::collections::BTreeMap<String, (usize, thymis_api::secrets::SecretInfo, u32, Vec<u8>)> =
        Default::default();
    for s in ctl.db.secrets()? {
        let Some(r) = rank(&s.info.scope) else { continue };
        if chosen.get(&s.info.name).is_none_or(|(best, ..)| r < *best) {
            chosen.insert(s.info.name.clone(), (r, s.info, s.mode, s.sealed));
        }
    }
    if chosen.len() > MAX_SECRETS {
        bail!("device {device} would get {} secrets; at most {MAX_SECRETS}", chosen.len());
    }
    let mut secrets = vec![];
    for (name, (_, info, mode, stored)) in chosen {
        let value = sealed::open(&ctl.identity, &at_rest(&name, &info.scope), &stored)
            .map_err(|e| anyhow!("secret {name} ({}): {e}", info.scope))?;
        secrets.push(wire::Secret { name, owner: info.owner, group: info.group, mode, value: STANDARD.encode(value) });
    }
    Ok(secrets)
}
