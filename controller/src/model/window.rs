//! Maintenance windows: when a device may switch (and reboot). A deployment's copy
//! may happen at any time; its activation waits for the device's window.
//!
//! The spelling (`thymisctl deploy --window`, `window = "..."` in thymis.toml):
//!
//! ```text
//! window  = rule { ";" rule } [ zone ]
//! rule    = [ days ] from "-" to          from, to: HH:MM or HH:MM:SS (to may be 24:00)
//! days    = "daily" | day { "," day }      day: Mon..Sun (or the full name), or a range Mon-Fri
//! zone    = an IANA time zone (Europe/Berlin, UTC); without one, the device's own
//! ```
//!
//! `Mon-Fri 22:00-06:00` opens at 22:00 on each weekday and closes at 06:00 the next
//! morning (a rule whose end is not after its start runs past midnight; its days say
//! when it opens). `Sat,Sun 00:00-24:00; 03:00-04:00 Europe/Berlin` is all weekend and
//! an hour each night, in Berlin's time. Times that a clock change skips or repeats are
//! taken as the change leaves them (the earlier of two, the later side of a gap).

use jiff::civil::{Date, Time};
use jiff::tz::TimeZone;
use jiff::{Timestamp, ToSpan};

/// A parsed window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    rules: Vec<Rule>,
    /// `None`: the device's time zone.
    zone: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    /// The days on which it opens (Monday first).
    days: [bool; 7],
    from: Time,
    /// `None`: midnight at the end of the day (`24:00`).
    to: Option<Time>,
}

/// Whether a window is open at a moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Now {
    /// Open until this moment.
    Open { closes: Timestamp },
    /// Closed until this moment.
    Closed { opens: Timestamp },
}

/// Why a window was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("window {spec:?}: {why} (for example \"Mon-Fri 22:00-06:00\" or \"daily 02:00-04:00 Europe/Berlin\")")]
pub struct BadWindow {
    spec: String,
    why: String,
}

const DAYS: [&str; 7] = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"];

fn day(name: &str) -> Option<usize> {
    let name = name.to_ascii_lowercase();
    DAYS.iter().position(|d| name.len() >= 3 && d.starts_with(&name))
}

fn days(spec: &str) -> Result<[bool; 7], String> {
    if spec.eq_ignore_ascii_case("daily") {
        return Ok([true; 7]);
    }
    let mut days = [false; 7];
    for part in spec.split(',') {
        let bad = || format!("{part:?} is not a day (Mon..Sun), a range (Mon-Fri) or \"daily\"");
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (day(a).ok_or_else(bad)?, day(b).ok_or_else(bad)?);
                let mut d = a;
                loop {
                    days[d] = true;
                    if d == b {
                        break;
                    }
                    d = (d + 1) % 7;
                }
            }
            None => days[day(part).ok_or_else(bad)?] = true,
        }
    }
    Ok(days)
}

fn time(text: &str, end: bool) -> Result<Option<Time>, String> {
    if end && (text == "24:00" || text == "24:00:00") {
        return Ok(None);
    }
    let bad = || format!("{text:?} is not a time of day (HH:MM or HH:MM:SS)");
    let parts: Vec<&str> = text.split(':').collect();
    if !(2..=3).contains(&parts.len()) || parts.iter().any(|p| p.len() != 2) {
        return Err(bad());
    }
    let n = |i: usize| parts.get(i).map_or(Ok(0), |p| p.parse::<i8>().map_err(|_| bad()));
    Time::new(n(0)?, n(1)?, n(2)?, 0).map(Some).map_err(|_| bad())
}

impl Window {
    pub fn parse(spec: &str) -> Result<Window, BadWindow> {
        let err = |why: String| BadWindow { spec: spec.to_owned(), why };
        let text = spec.trim();
        // A zone is the last word when it is not a time range.
        let (body, zone) = match text.rsplit_once(char::is_whitespace) {
            Some((body, last)) if !last.contains(':') => (body, Some(last.to_owned())),
            _ => (text, None),
        };
        if let Some(z) = &zone {
            TimeZone::get(z)
                .map_err(|_| err(format!("{z:?} is not a time zone (an IANA name: UTC, Europe/Berlin)")))?;
        }
        let mut rules = vec![];
        for rule in body.split(';').map(str::trim) {
            let words: Vec<&str> = rule.split_whitespace().collect();
            let (days, range) = match words.as_slice() {
                [range] => ([true; 7], *range),
                [d, range] => (days(d).map_err(err)?, *range),
                _ => return Err(err(format!("{rule:?} is not [DAYS] HH:MM-HH:MM"))),
            };
            let (from, to) = range.split_once('-').ok_or_else(|| err(format!("{range:?} is not HH:MM-HH:MM")))?;
            let from = time(from, false).map_err(err)?.unwrap_or_default();
            let to = time(to, true).map_err(err)?;
            rules.push(Rule { days, from, to });
        }
        Ok(Window { rules, zone })
    }

    /// The time zone it is read in: its own, else the device's, else UTC.
    fn zone(&self, device_zone: Option<&str>) -> TimeZone {
        self.zone.as_deref().or(device_zone).and_then(|z| TimeZone::get(z).ok()).unwrap_or(TimeZone::UTC)
    }

    /// Whether it is open at `now`, and until or from when.
    pub fn at(&self, now: Timestamp, device_zone: Option<&str>) -> Now {
        let tz = self.zone(device_zone);
        let today = now.to_zoned_datetime(tz.clone()).date();
        let at = |date: Date, t: Time| date.to_datetime(t).to_zoned_datetime(tz.clone()).map(|z| z.timestamp()).ok();
        let mut opens: Option<Timestamp> = None;
        let mut closes: Option<Timestamp> = None;
        // Yesterday's rules may run past midnight into today; a week ahead has every day.
        for offset in -1..=7i64 {
            let Ok(date) = today.checked_add(offset.days()) else { continue };
            let Ok(next) = date.checked_add(1.day()) else { continue };
            let weekday = date.weekday().to_monday_zero_offset() as usize;
            for r in self.rules.iter().filter(|r| r.days[weekday]) {
                let end = match r.to {
                    Some(to) if to > r.from => at(date, to),
                    Some(to) => at(next, to),
                    None => at(next, Time::midnight()),
                };
                let (Some(start), Some(end)) = (at(date, r.from), end) else { continue };
                if start <= now && now < end {
                    closes = Some(closes.map_or(end, |c| c.max(end)));
                } else if start > now {
                    opens = Some(opens.map_or(start, |o| o.min(start)));
                }
            }
        }
        match (closes, opens) {
            (Some(closes), _) => Now::Open { closes },
            (None, Some(opens)) => Now::Closed { opens },
            // Every rule has a day, so one opens within the week.
            (None, None) => Now::Closed { opens: now },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Timestamp {
        s.parse().expect("timestamp")
    }

    #[test]
    fn parses_what_the_docs_show_and_refuses_the_rest() {
        for ok in [
            "Mon-Fri 22:00-06:00",
            "daily 02:00-04:00 Europe/Berlin",
            "Sat,Sun 00:00-24:00; 03:00-04:00 UTC",
            "12:00:05-12:01:00",
            "fri-mon 23:00-01:00",
        ] {
            Window::parse(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in ["", "Mon-Fri", "Funday 10:00-11:00", "25:00-26:00", "10-11", "10:00-11:00 Mars/Olympus"] {
            let e = Window::parse(bad).expect_err(bad).to_string();
            assert!(e.contains("for example"), "{bad}: {e}");
        }
    }

    #[test]
    fn open_and_closed_with_the_next_change() {
        // 2026-12-07 is a Monday.
        let w = Window::parse("Mon-Fri 22:00-06:00 UTC").expect("parse");
        assert_eq!(w.at(ts("2026-12-07T21:00:00Z"), None), Now::Closed { opens: ts("2026-12-07T22:00:00Z") });
        assert_eq!(w.at(ts("2026-12-07T23:30:00Z"), None), Now::Open { closes: ts("2026-12-08T06:00:00Z") });
        // Saturday 03:00: Friday's window runs into it.
        assert_eq!(w.at(ts("2026-12-12T03:00:00Z"), None), Now::Open { closes: ts("2026-12-12T06:00:00Z") });
        // Saturday noon: closed until Monday night.
        assert_eq!(w.at(ts("2026-12-12T12:00:00Z"), None), Now::Closed { opens: ts("2026-12-14T22:00:00Z") });
        // A window a few seconds wide.
        let w = Window::parse("12:00:05-12:00:10").expect("parse");
        assert_eq!(w.at(ts("2026-12-07T12:00:00Z"), None), Now::Closed { opens: ts("2026-12-07T12:00:05Z") });
        assert_eq!(w.at(ts("2026-12-07T12:00:07Z"), None), Now::Open { closes: ts("2026-12-07T12:00:10Z") });
        assert_eq!(w.at(ts("2026-12-07T12:00:10Z"), None), Now::Closed { opens: ts("2026-12-08T12:00:05Z") });
    }

    #[test]
    fn read_in_the_windows_zone_else_the_devices() {
        let w = Window::parse("daily 02:00-04:00").expect("parse");
        // 01:30 UTC is 02:30 in Berlin (winter): open there, closed in UTC.
        let now = ts("2026-12-07T01:30:00Z");
        assert_eq!(w.at(now, Some("Europe/Berlin")), Now::Open { closes: ts("2026-12-07T03:00:00Z") });
        assert_eq!(w.at(now, None), Now::Closed { opens: ts("2026-12-07T02:00:00Z") });
        let own = Window::parse("daily 02:00-04:00 America/New_York").expect("parse");
        assert_eq!(own.at(now, Some("Europe/Berlin")), Now::Closed { opens: ts("2026-12-07T07:00:00Z") });
        // An unknown device zone is read as UTC.
        assert_eq!(w.at(now, Some("Nowhere/Special")), w.at(now, None));
    }

    #[test]
    fn clock_changes() {
        // Berlin skips 02:00-03:00 on 2027-03-28: the window opens at the gap's end.
        let w = Window::parse("daily 02:30-04:00 Europe/Berlin").expect("parse");
        let Now::Closed { opens } = w.at(ts("2027-03-27T23:00:00Z"), None) else { panic!("closed") };
        assert_eq!(opens, ts("2027-03-28T01:30:00Z"));
    }
}
