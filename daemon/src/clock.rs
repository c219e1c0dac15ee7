//! Time that deadlines can trust on devices without a real-time clock: CLOCK_BOOTTIME
//! (counts through suspend, restarts at boot) together with the boot id.

use std::time::Duration;

use rustix::time::{ClockId, clock_gettime};

/// Time since boot, including suspend.
pub fn boottime() -> Duration {
    let ts = clock_gettime(ClockId::Boottime);
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// This boot's id; changes at every boot.
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id").map(|s| s.trim().to_owned()).unwrap_or_default()
}

/// Whether the wall clock is known to be synchronised (systemd-timesyncd's flag file),
/// the only case where the agent enforces an offer's expiry itself.
pub fn wall_clock_synchronised() -> bool {
    std::path::Path::new("/run/systemd/timesync/synchronized").exists()
}

/// Unix seconds by the wall clock.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// The device's time zone, as its `/etc/localtime` names it (NixOS's `time.timeZone`
/// links it into the zone database): windows without a zone of their own are read in
/// it. `None` (read as UTC) without the link.
pub fn time_zone() -> Option<String> {
    zone_of_link(&std::fs::read_link("/etc/localtime").ok()?)
}

fn zone_of_link(target: &std::path::Path) -> Option<String> {
    let target = target.to_str()?;
    let (_, zone) = target.split_once("zoneinfo/")?;
    let valid = !zone.is_empty()
        && zone.len() <= 64
        && zone.chars().all(|c| c.is_ascii_alphanumeric() || "/_+-".contains(c))
        && !zone.split('/').any(|part| part.is_empty() || part == "..");
    valid.then(|| zone.to_owned())
}

#[cfg(test)]
mod zone_tests {
    #[test]
    fn the_zone_is_what_localtime_links_to() {
        use std::path::Path;
        assert_eq!(super::zone_of_link(Path::new("/etc/zoneinfo/Europe/Berlin")).as_deref(), Some("Europe/Berlin"));
        assert_eq!(super::zone_of_link(Path::new("../usr/share/zoneinfo/Etc/UTC")).as_deref(), Some("Etc/UTC"));
        assert_eq!(super::zone_of_link(Path::new("/nix/store/x-tzdata/share/zoneinfo/")), None);
        assert_eq!(super::zone_of_link(Path::new("/etc/localtime.bak")), None);
    }
}

/// A point on the boot clock of one boot.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BootDeadline {
    pub boot_id: String,
    pub boottime_ms: u64,
}

impl BootDeadline {
    pub fn in_(d: Duration) -> Self {
        BootDeadline { boot_id: boot_id(), boottime_ms: (boottime() + d).as_millis() as u64 }
    }

    /// Time left in this boot; `None` if the deadline belongs to another boot.
    pub fn remaining(&self) -> Option<Duration> {
        if self.boot_id != boot_id() {
            return None;
        }
        Some(Duration::from_millis(self.boottime_ms).saturating_sub(boottime()))
    }
}
