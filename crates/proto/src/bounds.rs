//! What the controller keeps of the text a device sends: each field of a report or an
//! outcome cut to a stated size before it is stored, listed or logged, so a compromised
//! device cannot grow the controller's database, its listings or its log.

use crate::message::{DeviceReport, Outcome};

/// Versions, commits and unit names.
pub const MAX_NAME: usize = 256;
/// An error's text.
pub const MAX_ERROR: usize = 4096;
/// Failed units named in one outcome.
pub const MAX_UNITS: usize = 64;
/// Journal lines kept per failed unit, and the bytes of each.
pub const MAX_UNIT_LOG_LINES: usize = 20;
pub const MAX_UNIT_LOG_LINE: usize = 512;

/// Cuts `text` to at most `max` bytes (at a character boundary), saying so.
pub fn cut(text: &mut String, max: usize) {
    if text.len() <= max {
        return;
    }
    const MARK: &str = " [cut]";
    let mut end = max.saturating_sub(MARK.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text.push_str(MARK);
}

impl DeviceReport {
    /// The report with its device-chosen text cut to the bounds above.
    pub fn bounded(mut self) -> DeviceReport {
        cut(&mut self.agent_version, MAX_NAME);
        if let Some(c) = self.commit.as_mut() {
            cut(c, MAX_NAME);
        }
        if let Some(h) = self.hold.as_mut() {
            cut(&mut h.reason, MAX_NAME);
        }
        for text in [&mut self.time_zone, &mut self.no_journal, &mut self.no_terminal].into_iter().flatten() {
            cut(text, MAX_NAME);
        }
        self
    }
}

impl Outcome {
    /// The outcome with its device-chosen text cut to the bounds above.
    pub fn bounded(mut self) -> Outcome {
        if let Some(e) = self.error.as_mut() {
            cut(e, MAX_ERROR);
        }
        if let Some(c) = self.commit.as_mut() {
            cut(c, MAX_NAME);
        }
        self.failed_units.truncate(MAX_UNITS);
        self.failed_units.iter_mut().for_each(|u| cut(u, MAX_NAME));
        self.failed_checks.truncate(MAX_UNITS);
        self.failed_checks.iter_mut().for_each(|c| cut(c, MAX_NAME));
        while self.unit_logs.len() > MAX_UNITS {
            self.unit_logs.pop_last();
        }
        self.unit_logs = std::mem::take(&mut self.unit_logs)
            .into_iter()
            .map(|(mut unit, lines)| {
                cut(&mut unit, MAX_NAME);
                let skip = lines.len().saturating_sub(MAX_UNIT_LOG_LINES);
                let lines = lines
                    .into_iter()
                    .skip(skip)
                    .map(|mut l| {
                        cut(&mut l, MAX_UNIT_LOG_LINE);
                        l
                    })
                    .collect();
                (unit, lines)
            })
            .collect();
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_cut_at_a_character_boundary_and_says_so() {
        let mut s = "é".repeat(10);
        cut(&mut s, 9);
        assert!(s.len() <= 9 && s.ends_with(" [cut]"), "{s:?}");
        let mut short = "fine".to_owned();
        cut(&mut short, 9);
        assert_eq!(short, "fine");
    }

    #[test]
    fn an_outcome_keeps_bounded_text() {
        let o = Outcome {
            deployment_id: "dp-1".into(),
            result: crate::DeviceResult::Failed,
            reason: None,
            phase: None,
            error: Some("e".repeat(1 << 20)),
            failed_units: vec!["u".repeat(1000); 1000],
            unit_logs: (0..100).map(|i| (format!("u{i}"), vec!["l".repeat(1000); 100])).collect(),
            failed_checks: vec![],
            system: None,
            commit: Some("c".repeat(1000)),
            generation: None,
        }
        .bounded();
        assert!(o.error.as_ref().is_some_and(|e| e.len() <= MAX_ERROR));
        assert_eq!(o.failed_units.len(), MAX_UNITS);
        assert!(o.failed_units.iter().all(|u| u.len() <= MAX_NAME));
        assert_eq!(o.unit_logs.len(), MAX_UNITS);
        assert!(
            o.unit_logs
                .values()
                .all(|l| l.len() == MAX_UNIT_LOG_LINES && l.iter().all(|x| x.len() <= MAX_UNIT_LOG_LINE))
        );
        assert!(o.commit.as_ref().is_some_and(|c| c.len() <= MAX_NAME));
    }
}
