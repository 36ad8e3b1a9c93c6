//! Periodic counter resets: the [`ResetStrategy`] of a user and the calendar arithmetic (UTC)
//! that says when its next reset is due. Pure: every function takes unix seconds.

use serde::{Deserialize, Serialize};

const DAY: u64 = 86_400;

/// When a user's counters are zeroed by themselves.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResetStrategy {
    /// Never (only `POST /api/users/{key}/reset`).
    #[default]
    None,
    /// Every day at 00:00 UTC.
    Day,
    /// Every Monday at 00:00 UTC.
    Week,
    /// On the 1st of every month at 00:00 UTC.
    Month,
    /// Every month at 00:00 UTC on the day of the month the user was created (the last day of
    /// shorter months).
    MonthRolling,
}

impl ResetStrategy {
    /// Every strategy, as the API names them.
    pub const ALL: [ResetStrategy; 5] = [
        ResetStrategy::None,
        ResetStrategy::Day,
        ResetStrategy::Week,
        ResetStrategy::Month,
        ResetStrategy::MonthRolling,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ResetStrategy::None => "none",
            ResetStrategy::Day => "day",
            ResetStrategy::Week => "week",
            ResetStrategy::Month => "month",
            ResetStrategy::MonthRolling => "month_rolling",
        }
    }

    pub fn parse(text: &str) -> Option<ResetStrategy> {
        ResetStrategy::ALL.into_iter().find(|s| s.as_str() == text)
    }

    pub fn is_none(&self) -> bool {
        *self == ResetStrategy::None
    }

    /// The first reset boundary strictly after `after` (`None` for [`ResetStrategy::None`]).
    /// `created_at` gives the day of the month for [`ResetStrategy::MonthRolling`].
    pub fn next_boundary(self, after: u64, created_at: u64) -> Option<u64> {
        let day = after / DAY;
        let days = match self {
            ResetStrategy::None => return None,
            ResetStrategy::Day => day + 1,
            // 1970-01-01 was a Thursday: (day + 3) % 7 is 0 on Mondays.
            ResetStrategy::Week => day + 7 - (day + 3) % 7,
            ResetStrategy::Month => {
                let (y, m, _) = civil_from_days(day);
                let (y, m) = next_month(y, m);
                days_from_civil(y, m, 1)
            }
            ResetStrategy::MonthRolling => {
                let (_, _, anchor) = civil_from_days(created_at / DAY);
                let (y, m, _) = civil_from_days(day);
                let this = days_from_civil(y, m, anchor.min(days_in_month(y, m)));
                if this > day {
                    this
                } else {
                    let (y, m) = next_month(y, m);
                    days_from_civil(y, m, anchor.min(days_in_month(y, m)))
                }
            }
        };
        days.checked_mul(DAY)
    }
}

fn next_month(y: u64, m: u64) -> (u64, u64) {
    if m == 12 { (y + 1, 1) } else { (y, m + 1) }
}

fn is_leap(y: u64) -> bool {
    y % 4 == 0 && (y % 100 != 0 || y % 400 == 0)
}

fn days_in_month(y: u64, m: u64) -> u64 {
    match m {
        2 if is_leap(y) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 → (year, month 1..=12, day 1..=31) (H. Hinnant's algorithm, years ≥ 1970).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

/// (year ≥ 1970, month, day) → days since 1970-01-01.
fn days_from_civil(y: u64, m: u64, d: u64) -> u64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y / 400;
    let yoe = y % 400;
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    (era * 146_097 + doe).saturating_sub(719_468)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2024-01-31 00:00:00 UTC (a Wednesday; 2024 is a leap year).
    const JAN31: u64 = 1_706_659_200;

    #[test]
    fn calendar_round_trips() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(JAN31 / DAY), (2024, 1, 31));
        for d in 0..200_000 {
            let (y, m, dd) = civil_from_days(d);
            assert_eq!(days_from_civil(y, m, dd), d);
        }
    }

    #[test]
    fn boundaries_are_utc_calendar_instants_strictly_after() {
        let noon = JAN31 + DAY / 2;
        let s = |st: ResetStrategy, at: u64| st.next_boundary(at, JAN31).unwrap();
        assert_eq!(ResetStrategy::None.next_boundary(noon, 0), None);
        assert_eq!(s(ResetStrategy::Day, noon), JAN31 + DAY);
        assert_eq!(s(ResetStrategy::Day, JAN31), JAN31 + DAY, "strictly after");
        // Wednesday → next Monday, 2024-02-05.
        assert_eq!(s(ResetStrategy::Week, noon), JAN31 + 5 * DAY);
        assert_eq!(s(ResetStrategy::Week, JAN31 + 5 * DAY), JAN31 + 12 * DAY);
        assert_eq!(s(ResetStrategy::Month, noon), JAN31 + DAY, "2024-02-01");
        // Created on the 31st: Feb 29 (leap year), then Mar 31.
        let feb29 = JAN31 + 29 * DAY;
        assert_eq!(s(ResetStrategy::MonthRolling, noon), feb29);
        assert_eq!(s(ResetStrategy::MonthRolling, feb29), feb29 + 31 * DAY);
        // Created mid-month, asked before that day in the month: this month's.
        let created = JAN31 + 15 * DAY; // 2024-02-15
        assert_eq!(
            ResetStrategy::MonthRolling.next_boundary(JAN31 + 3 * DAY, created),
            Some(created)
        );
        assert_eq!(
            ResetStrategy::Month.next_boundary(1_733_011_200 + 5, 0), // 2024-12-01
            Some(1_735_689_600),                                      // 2025-01-01
        );
    }

    #[test]
    fn names_round_trip() {
        for s in ResetStrategy::ALL {
            assert_eq!(ResetStrategy::parse(s.as_str()), Some(s));
            let json = serde_json::to_string(&s).unwrap();
            assert_eq!(json, format!("\"{}\"", s.as_str()));
        }
        assert_eq!(ResetStrategy::parse("daily"), None);
    }
}
