//! How much of a device's log one deployment may store: its lines are kept up to a
//! byte budget, then dropped and counted (a device that printed without end filled the
//! database, and every reader of the task's log with it).

use std::collections::HashMap;
use std::sync::Mutex;

use crate::sync::lock;

/// Log bytes stored per device deployment.
pub const LOG_BUDGET: usize = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogBudget {
    /// Store the line.
    Within,
    /// This line spent the budget: say so once, instead of storing it.
    NowSpent,
    /// Dropped (and counted).
    Spent,
}

/// Bytes stored and (lines, bytes) dropped, per child deployment in flight.
#[derive(Debug, Default)]
pub struct LogBudgets(Mutex<HashMap<i64, (usize, usize, usize)>>);

impl LogBudgets {
    pub fn take(&self, child: i64, bytes: usize) -> LogBudget {
        let mut m = lock(&self.0);
        let (used, dropped_lines, dropped_bytes) = m.entry(child).or_default();
        if *used + bytes <= LOG_BUDGET {
            *used += bytes;
            return LogBudget::Within;
        }
        let first = *dropped_lines == 0;
        *dropped_lines += 1;
        *dropped_bytes += bytes;
        if first { LogBudget::NowSpent } else { LogBudget::Spent }
    }

    /// The deployments that have a budget now.
    pub fn children(&self) -> Vec<i64> {
        lock(&self.0).keys().copied().collect()
    }

    /// The deployment ended: forget it; (lines, bytes) dropped, if any.
    pub fn finish(&self, child: i64) -> Option<(usize, usize)> {
        let (_, lines, bytes) = lock(&self.0).remove(&child)?;
        (lines > 0).then_some((lines, bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_past_the_budget_are_dropped_and_counted() {
        let b = LogBudgets::default();
        assert_eq!(b.take(1, LOG_BUDGET - 10), LogBudget::Within);
        assert_eq!(b.take(1, 10), LogBudget::Within);
        assert_eq!(b.take(2, 100), LogBudget::Within, "another deployment has its own budget");
        assert_eq!(b.take(1, 1), LogBudget::NowSpent);
        assert_eq!(b.take(1, 5), LogBudget::Spent);
        let mut open = b.children();
        open.sort();
        assert_eq!(open, [1, 2]);
        assert_eq!(b.finish(1), Some((2, 6)));
        assert_eq!(b.finish(1), None);
        assert_eq!(b.finish(2), None, "nothing dropped");
    }
}
