//! Which snapshots a retention policy keeps (`repo prune`), per disk, as restic and PBS
//! count: `keep-last N` keeps the N newest; `keep-daily N` keeps the newest snapshot of
//! each of the N most recent days that have one, and so on for hours, ISO weeks,
//! months and years. A snapshot any rule keeps is kept. Periods are UTC.

use std::collections::BTreeMap;
use std::collections::HashSet;

use crate::format::SnapshotInfo;

/// How many snapshots or periods each rule keeps (0: the rule keeps nothing).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Policy {
    /// The newest N.
    pub last: usize,
    /// The newest of each of the last N hours with snapshots.
    pub hourly: usize,
    /// ... days.
    pub daily: usize,
    /// ... ISO weeks.
    pub weekly: usize,
    /// ... months.
    pub monthly: usize,
    /// ... years.
    pub yearly: usize,
}

impl Policy {
    /// Whether the policy keeps nothing at all (refused: prune would delete every snapshot).
    pub fn is_empty(&self) -> bool {
        *self == Policy::default()
    }
}

/// The periods the `keep-*` rules count.
#[derive(Debug, Clone, Copy)]
enum Period {
    Hour,
    Day,
    Week,
    Month,
    Year,
}

impl Period {
    /// Which period of this kind the snapshot falls in (UTC).
    fn of(self, s: &SnapshotInfo) -> (i64, i64) {
        let secs = (s.time_ns / 1_000_000_000) as i64;
        let days = secs.div_euclid(86400);
        match self {
            Period::Hour => (secs.div_euclid(3600), 0),
            Period::Day => (days, 0),
            Period::Week => iso_week(days),
            Period::Month => {
                let (y, m, _) = civil(days);
                (y, i64::from(m))
            }
            Period::Year => (civil(days).0, 0),
        }
    }
}

/// (year, month, day) of a day count since 1970-01-01.
pub fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

/// The ISO week (year, week) a day count since 1970-01-01 falls in.
fn iso_week(days: i64) -> (i64, i64) {
    // 1970-01-01 was a Thursday; weekday 0 = Monday.
    let weekday = (days + 3).rem_euclid(7);
    let thursday = days - weekday + 3;
    let (year, _, _) = civil(thursday);
    let jan1 = days_from_civil(year, 1, 1);
    (year, (thursday - jan1) / 7 + 1)
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (i64::from(m) + 9) % 12;
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The ids `policy` keeps out of `snapshots` (of any number of disks; each disk is
/// counted on its own).
pub fn keep(snapshots: &[SnapshotInfo], policy: &Policy) -> HashSet<String> {
    let mut by_disk: BTreeMap<&str, Vec<&SnapshotInfo>> = BTreeMap::new();
    for s in snapshots {
        by_disk.entry(&s.disk).or_default().push(s);
    }
    let mut kept = HashSet::new();
    for list in by_disk.values_mut() {
        list.sort_by(|a, b| (b.time_ns, &b.id).cmp(&(a.time_ns, &a.id)));
        for s in list.iter().take(policy.last) {
            kept.insert(s.id.clone());
        }
        let rules = [
            (policy.hourly, Period::Hour),
            (policy.daily, Period::Day),
            (policy.weekly, Period::Week),
            (policy.monthly, Period::Month),
            (policy.yearly, Period::Year),
        ];
        for (count, period) in rules {
            let mut last = None;
            let mut periods = 0;
            for s in list.iter() {
                if periods == count {
                    break;
                }
                let p = period.of(s);
                if last != Some(p) {
                    kept.insert(s.id.clone());
                    last = Some(p);
                    periods += 1;
                }
            }
        }
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(id: &str, disk: &str, secs: u64) -> SnapshotInfo {
        SnapshotInfo {
            bitmap: None,
            id: id.into(),
            disk: disk.into(),
            time_ns: secs * 1_000_000_000,
            size: 0,
            chunk_size: 65536,
            parent: None,
            stored: 0,
            tool: String::new(),
        }
    }

    #[test]
    fn dates_and_iso_weeks_are_right() {
        assert_eq!(civil(0), (1970, 1, 1));
        assert_eq!(civil(days_from_civil(2026, 12, 1)), (2026, 12, 1));
        assert_eq!(civil(days_from_civil(2024, 2, 29)), (2024, 2, 29));
        // 2021-01-03 (a Sunday) belongs to ISO week 53 of 2020; 2026-12-01 to week 49.
        assert_eq!(iso_week(days_from_civil(2021, 1, 3)), (2020, 53));
        assert_eq!(iso_week(days_from_civil(2021, 1, 4)), (2021, 1));
        assert_eq!(iso_week(days_from_civil(2026, 12, 1)), (2026, 49));
    }

    #[test]
    fn each_rule_keeps_the_newest_of_its_periods_per_disk() {
        let day = 86400;
        let base = days_from_civil(2026, 11, 1) as u64 * day;
        // vm1: two snapshots a day for ten days; vm2: one old one.
        let mut all = Vec::new();
        for d in 0..10 {
            all.push(snap(&format!("a{d}"), "vm1", base + d * day + 3600));
            all.push(snap(&format!("b{d}"), "vm1", base + d * day + 7200));
        }
        all.push(snap("old", "vm2", base - 400 * day));
        let kept = keep(
            &all,
            &Policy {
                last: 1,
                ..Policy::default()
            },
        );
        assert_eq!(kept, HashSet::from(["b9".to_string(), "old".to_string()]));
        let kept = keep(
            &all,
            &Policy {
                daily: 3,
                ..Policy::default()
            },
        );
        assert_eq!(
            kept,
            HashSet::from(["b9", "b8", "b7", "old"].map(String::from))
        );
        let kept = keep(
            &all,
            &Policy {
                last: 2,
                daily: 2,
                monthly: 5,
                ..Policy::default()
            },
        );
        assert_eq!(
            kept,
            HashSet::from(["b9", "a9", "b8", "old"].map(String::from))
        );
        let kept = keep(
            &all,
            &Policy {
                hourly: 3,
                ..Policy::default()
            },
        );
        assert_eq!(
            kept,
            HashSet::from(["b9", "a9", "b8", "old"].map(String::from))
        );
        assert!(Policy::default().is_empty());
    }
}
