//! Users and groups by name, as `/etc/passwd` and `/etc/group` list them (NixOS writes
//! both; a number is taken as the id it is).

use anyhow::{Result, anyhow};

fn id_in(file: &str, name: &str) -> Result<u32> {
    if let Ok(n) = name.parse() {
        return Ok(n);
    }
    let text = std::fs::read_to_string(file).map_err(|e| anyhow!("reading {file}: {e}"))?;
    text.lines()
        .find_map(|l| {
            let mut f = l.split(':');
            (f.next()? == name).then_some(())?;
            f.nth(1)?.parse().ok()
        })
        .ok_or_else(|| anyhow!("no {name:?} in {file}"))
}

pub fn user_id(name: &str) -> Result<u32> {
    id_in("/etc/passwd", name)
}

pub fn group_id(name: &str) -> Result<u32> {
    id_in("/etc/group", name)
}
