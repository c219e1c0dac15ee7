//! Staged rollouts: a deployment's devices in waves (a canary first, then waves of a
//! size), each wave finished before the next is offered, an optional soak after each,
//! and a halt by itself once more devices failed than allowed. The plan and the pure
//! decisions are here; the controller drives them (its `deploy` module), and its task
//! row keeps where a rollout is, so it survives a restart.

use serde::{Deserialize, Serialize};
use thymis_proto::DeviceResult;

/// A number of devices, or a percentage of the deployment's devices (`3`, `25%`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Count {
    Devices(usize),
    Percent(u8),
}

impl Count {
    /// How many of `total` devices (a percentage rounds up, so that it is never none).
    pub fn of(self, total: usize) -> usize {
        match self {
            Count::Devices(n) => n,
            Count::Percent(p) => (total * p as usize).div_ceil(100),
        }
    }
}

impl std::str::FromStr for Count {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is neither a number of devices nor a percentage like 25%");
        match s.trim().strip_suffix('%') {
            Some(p) => match p.trim().parse::<u8>() {
                Ok(p) if p <= 100 => Ok(Count::Percent(p)),
                _ => Err(bad()),
            },
            None => s.trim().parse().map(Count::Devices).map_err(|_| bad()),
        }
    }
}

impl std::fmt::Display for Count {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Count::Devices(n) => write!(f, "{n}"),
            Count::Percent(p) => write!(f, "{p}%"),
        }
    }
}

impl Serialize for Count {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Count::Devices(n) => s.serialize_u64(*n as u64),
            Count::Percent(_) => s.serialize_str(&self.to_string()),
        }
    }
}

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(usize),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(Count::Devices(n)),
            Raw::S(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// What a deployment request asks for (all optional: no waves by default).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Staging {
    /// Devices deployed to first, alone.
    pub canary: Option<Count>,
    /// Devices per wave after the canary (default: all the rest at once).
    pub wave_size: Option<Count>,
    /// Failed devices tolerated before the rollout halts (default: none, when there are
    /// waves).
    pub max_failures: Option<Count>,
    /// Seconds to wait after each wave before the next.
    pub soak: Option<u64>,
}

impl Staging {
    pub fn is_staged(&self) -> bool {
        self.canary.is_some() || self.wave_size.is_some()
    }

    /// The waves' sizes for `total` devices: the canary (at least one device), then
    /// waves of `wave_size` (at least one), the last one what is left.
    pub fn waves(&self, total: usize) -> Vec<usize> {
        let mut sizes = vec![];
        let mut left = total;
        if let Some(c) = self.canary {
            let n = c.of(total).clamp(1, left.max(1)).min(left);
            if n > 0 {
                sizes.push(n);
                left -= n;
            }
        }
        let step = self.wave_size.map(|w| w.of(total).max(1)).unwrap_or(left.max(1));
        while left > 0 {
            let n = step.min(left);
            sizes.push(n);
            left -= n;
        }
        sizes
    }

    /// Failed devices allowed in all, of `total`.
    pub fn tolerated(&self, total: usize) -> usize {
        self.max_failures.map(|m| m.of(total)).unwrap_or(0)
    }
}

/// Whether a device's result counts against the rollout.
pub fn is_failure(r: DeviceResult) -> bool {
    matches!(r, DeviceResult::RolledBack | DeviceResult::Failed | DeviceResult::RollbackFailed)
}

/// After a wave (and its soak): halt, or go on.
pub fn halts(failures: usize, tolerated: usize) -> bool {
    failures > tolerated
}

#[cfg(test)]
mod tests {
    use super::*;

    fn staging(canary: Option<&str>, wave: Option<&str>) -> Staging {
        Staging {
            canary: canary.map(|c| c.parse().expect("count")),
            wave_size: wave.map(|w| w.parse().expect("count")),
            ..Default::default()
        }
    }

    #[test]
    fn waves_cover_every_device_once() {
        assert_eq!(staging(Some("1"), Some("2")).waves(6), [1, 2, 2, 1]);
        assert_eq!(staging(Some("1"), None).waves(6), [1, 5]);
        assert_eq!(staging(None, Some("50%")).waves(5), [3, 2]);
        assert_eq!(staging(Some("10%"), Some("25%")).waves(8), [1, 2, 2, 2, 1]);
        assert_eq!(staging(Some("0"), None).waves(3), [1, 2], "a canary is at least one device");
        assert_eq!(staging(Some("9"), None).waves(3), [3]);
        assert_eq!(staging(None, None).waves(4), [4]);
        assert_eq!(staging(Some("1"), Some("0")).waves(3), [1, 1, 1]);
        for total in 0..40 {
            for (c, w) in [(Some("3"), Some("7%")), (None, Some("1")), (Some("100%"), None)] {
                assert_eq!(staging(c, w).waves(total).iter().sum::<usize>(), total, "{c:?} {w:?} of {total}");
            }
        }
    }

    #[test]
    fn counts_parse_and_print() {
        assert_eq!("25%".parse::<Count>(), Ok(Count::Percent(25)));
        assert_eq!(" 3 ".parse::<Count>(), Ok(Count::Devices(3)));
        for bad in ["", "x", "101%", "-1", "2.5"] {
            assert!(bad.parse::<Count>().is_err(), "{bad:?}");
        }
        assert_eq!(Count::Percent(10).of(5), 1);
        let json = serde_json::to_string(&staging(Some("1"), Some("25%"))).expect("json");
        assert_eq!(json, r#"{"canary":1,"wave_size":"25%","max_failures":null,"soak":null}"#);
        assert_eq!(serde_json::from_str::<Staging>(&json).expect("back"), staging(Some("1"), Some("25%")));
    }

    #[test]
    fn the_default_tolerates_no_failure() {
        let s = staging(Some("1"), None);
        assert!(halts(1, s.tolerated(6)));
        let s = Staging { max_failures: Some(Count::Percent(50)), ..s };
        assert!(!halts(3, s.tolerated(6)) && halts(4, s.tolerated(6)));
        assert!(is_failure(DeviceResult::RolledBack) && !is_failure(DeviceResult::Expired));
    }
}
