//! Cron expressions evaluated in a time zone, with defined behaviour across daylight-saving changes.
//!
//! Syntax: five fields (`minute hour day-of-month month day-of-week`) or six with a leading
//! seconds field; `*`, lists (`1,15`), ranges (`1-5`), steps (`*/15`, `10-50/20`), month and day
//! names (`jan`, `mon-fri`), 0 or 7 for Sunday, and the macros `@yearly`, `@monthly`, `@weekly`,
//! `@daily`, `@hourly`. When both day fields are restricted, a day matches if either does (as in
//! Vixie cron).
//!
//! Daylight saving, as ISC cron behaves:
//! - a wall-clock time skipped by a spring-forward change fires once, at the first instant after
//!   the gap (so a 02:30 job still runs on the night the clocks jump from 02:00 to 03:00);
//! - a wall-clock time that occurs twice in a fall-back change fires once, at its first
//!   occurrence, unless the hour field is a wildcard (`*`, `*/n`): then it fires in both, so an
//!   hourly or every-N-minutes schedule keeps its real-time interval.

use chrono::{
    DateTime, Datelike, Duration, LocalResult, NaiveDate, NaiveDateTime, TimeZone, Timelike, Utc,
};
use chrono_tz::Tz;

/// A parsed schedule: a cron expression and the time zone it is read in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CronSchedule {
    expression: String,
    tz: Tz,
    seconds: u64,
    minutes: u64,
    hours: u32,
    days_of_month: u32,
    months: u16,
    days_of_week: u8,
    any_day_of_month: bool,
    any_day_of_week: bool,
    wildcard_hour: bool,
}

/// Why an expression or time zone was refused; the message names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CronError {
    #[error(
        "cron: expected 5 fields (minute hour day-of-month month day-of-week) or 6 with seconds first, got {0}"
    )]
    FieldCount(usize),
    #[error("cron {field}: {message}")]
    Field {
        field: &'static str,
        message: String,
    },
    #[error("cron: unknown macro {0:?} (expected @yearly, @monthly, @weekly, @daily or @hourly)")]
    Macro(String),
    #[error("time zone: unknown zone {0:?} (expected an IANA name such as Europe/Berlin or UTC)")]
    TimeZone(String),
    #[error("cron: {0:?} never fires (no date matches its day and month fields)")]
    NeverFires(String),
}

const MONTHS: [&str; 12] = [
    "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
];
const DAYS: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];
/// Daylight-saving shifts are at most a few hours; candidates are compared within this span.
const DST_SPAN: Duration = Duration::hours(3);

struct FieldSpec {
    name: &'static str,
    min: u32,
    max: u32,
    names: &'static [&'static str],
    /// First value `names[0]` stands for.
    names_base: u32,
}

const SECOND: FieldSpec = FieldSpec {
    name: "second",
    min: 0,
    max: 59,
    names: &[],
    names_base: 0,
};
const MINUTE: FieldSpec = FieldSpec {
    name: "minute",
    min: 0,
    max: 59,
    names: &[],
    names_base: 0,
};
const HOUR: FieldSpec = FieldSpec {
    name: "hour",
    min: 0,
    max: 23,
    names: &[],
    names_base: 0,
};
const DAY_OF_MONTH: FieldSpec = FieldSpec {
    name: "day-of-month",
    min: 1,
    max: 31,
    names: &[],
    names_base: 0,
};
const MONTH: FieldSpec = FieldSpec {
    name: "month",
    min: 1,
    max: 12,
    names: &MONTHS,
    names_base: 1,
};
const DAY_OF_WEEK: FieldSpec = FieldSpec {
    name: "day-of-week",
    min: 0,
    max: 7,
    names: &DAYS,
    names_base: 0,
};

impl FieldSpec {
    fn err(&self, message: String) -> CronError {
        CronError::Field {
            field: self.name,
            message,
        }
    }

    fn value(&self, s: &str) -> Result<u32, CronError> {
        let lower = s.to_ascii_lowercase();
        if let Some(i) = self.names.iter().position(|n| *n == lower) {
            return Ok(i as u32 + self.names_base);
        }
        let v: u32 = s
            .parse()
            .map_err(|_| self.err(format!("{s:?} is not a number or a known name")))?;
        if v < self.min || v > self.max {
            return Err(self.err(format!("{v} is out of range {}-{}", self.min, self.max)));
        }
        Ok(v)
    }

    /// Parses one field into a bit set over `min..=max`.
    fn parse(&self, field: &str) -> Result<u64, CronError> {
        let mut bits = 0u64;
        for part in field.split(',') {
            let (range, step) = match part.split_once('/') {
                Some((r, s)) => {
                    let step: u32 =
                        s.parse().ok().filter(|n| *n > 0).ok_or_else(|| {
                            self.err(format!("step {s:?} must be a positive number"))
                        })?;
                    (r, step)
                }
                None => (part, 1),
            };
            let (lo, hi) = if range == "*" {
                (self.min, self.max)
            } else if let Some((a, b)) = range.split_once('-') {
                let (a, b) = (self.value(a)?, self.value(b)?);
                if a > b {
                    return Err(self.err(format!("range {range:?} runs backwards")));
                }
                (a, b)
            } else if range.is_empty() {
                return Err(self.err(format!("empty item in {field:?}")));
            } else {
                let v = self.value(range)?;
                // `5/15` means from 5 to the end, every 15.
                (v, if part.contains('/') { self.max } else { v })
            };
            let mut v = lo;
            while v <= hi {
                bits |= 1 << v;
                v += step;
            }
        }
        Ok(bits)
    }
}

impl CronSchedule {
    /// Parses `expression` read in the IANA time zone `time_zone`.
    pub fn parse(expression: &str, time_zone: &str) -> Result<Self, CronError> {
        let tz: Tz = time_zone
            .parse()
            .map_err(|_| CronError::TimeZone(time_zone.to_string()))?;
        let expanded = match expression.trim() {
            "@yearly" | "@annually" => "0 0 1 1 *",
            "@monthly" => "0 0 1 * *",
            "@weekly" => "0 0 * * 0",
            "@daily" | "@midnight" => "0 0 * * *",
            "@hourly" => "0 * * * *",
            m if m.starts_with('@') => return Err(CronError::Macro(m.to_string())),
            other => other,
        };
        let fields: Vec<&str> = expanded.split_whitespace().collect();
        let (second, rest) = match fields.len() {
            5 => ("0", &fields[..]),
            6 => (fields[0], &fields[1..]),
            n => return Err(CronError::FieldCount(n)),
        };
        let mut days_of_week = DAY_OF_WEEK.parse(rest[4])?;
        if days_of_week & (1 << 7) != 0 {
            days_of_week = (days_of_week | 1) & 0x7f;
        }
        let schedule = Self {
            expression: expression.trim().to_string(),
            tz,
            seconds: SECOND.parse(second)?,
            minutes: MINUTE.parse(rest[0])?,
            hours: HOUR.parse(rest[1])? as u32,
            days_of_month: DAY_OF_MONTH.parse(rest[2])? as u32,
            months: MONTH.parse(rest[3])? as u16,
            days_of_week: days_of_week as u8,
            any_day_of_month: rest[2] == "*",
            any_day_of_week: rest[4] == "*",
            wildcard_hour: rest[1].starts_with('*'),
        };
        // A day-of-month that no month has (`31 2`) with an unrestricted weekday never fires.
        let probe = Utc.with_ymd_and_hms(2000, 1, 1, 0, 0, 0).unwrap();
        if schedule.next_after(probe).is_none() {
            return Err(CronError::NeverFires(schedule.expression));
        }
        Ok(schedule)
    }

    pub fn expression(&self) -> &str {
        &self.expression
    }

    pub fn time_zone(&self) -> Tz {
        self.tz
    }

    fn day_matches(&self, d: NaiveDate) -> bool {
        if self.months & (1 << d.month()) == 0 {
            return false;
        }
        let dom = self.days_of_month & (1 << d.day()) != 0;
        let dow = self.days_of_week & (1 << d.weekday().num_days_from_sunday()) != 0;
        match (self.any_day_of_month, self.any_day_of_week) {
            (true, true) => true,
            (false, true) => dom,
            (true, false) => dow,
            (false, false) => dom || dow,
        }
    }

    /// The first wall-clock time at or after `from` that the fields match, searching nine years
    /// (enough for 29 February on a given weekday).
    fn next_local_match(&self, from: NaiveDateTime) -> Option<NaiveDateTime> {
        let limit = from + Duration::days(9 * 366);
        let mut t = from.with_nanosecond(0)?;
        while t <= limit {
            let date = t.date();
            if !self.day_matches(date) {
                t = date.succ_opt()?.and_hms_opt(0, 0, 0)?;
                continue;
            }
            if self.hours & (1 << t.hour()) == 0 {
                t = t.with_minute(0)?.with_second(0)? + Duration::hours(1);
                continue;
            }
            if self.minutes & (1 << t.minute()) == 0 {
                t = t.with_second(0)? + Duration::minutes(1);
                continue;
            }
            if self.seconds & (1 << t.second()) == 0 {
                t += Duration::seconds(1);
                continue;
            }
            return Some(t);
        }
        None
    }

    /// The instants a matching wall-clock time stands for (see the module docs on daylight saving).
    fn instants(&self, local: NaiveDateTime) -> Vec<DateTime<Utc>> {
        match self.tz.from_local_datetime(&local) {
            LocalResult::Single(t) => vec![t.to_utc()],
            LocalResult::Ambiguous(first, second) if self.wildcard_hour => {
                vec![first.to_utc(), second.to_utc()]
            }
            LocalResult::Ambiguous(first, _) => vec![first.to_utc()],
            LocalResult::None => {
                // In a gap: the first wall-clock minute after it that exists.
                let minute = local.with_second(0).unwrap_or(local);
                (1..=24 * 60)
                    .map(|k| minute + Duration::minutes(k))
                    .find_map(|m| self.tz.from_local_datetime(&m).earliest())
                    .map(|t| vec![t.to_utc()])
                    .unwrap_or_default()
            }
        }
    }

    fn offset_at(&self, t: DateTime<Utc>) -> i64 {
        use chrono::Offset;
        self.tz
            .offset_from_utc_datetime(&t.naive_utc())
            .fix()
            .local_minus_utc() as i64
    }

    fn near_transition(&self, t: DateTime<Utc>) -> bool {
        self.offset_at(t - DST_SPAN) != self.offset_at(t + DST_SPAN)
    }

    /// The first firing strictly after `after`, or `None` if there is none within nine years.
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let local = after.with_timezone(&self.tz).naive_local();
        // Near a daylight-saving change, earlier wall-clock times may map to later instants.
        let mut from = if self.near_transition(after) {
            local - DST_SPAN
        } else {
            local + Duration::seconds(1)
        };
        let mut best: Option<DateTime<Utc>> = None;
        for _ in 0..100_000 {
            let m = self.next_local_match(from)?;
            if let Some(b) = best {
                let best_local = b.with_timezone(&self.tz).naive_local();
                if !self.near_transition(b) || m > best_local + DST_SPAN {
                    return best;
                }
            }
            for t in self.instants(m) {
                if t > after && best.is_none_or(|b| t < b) {
                    best = Some(t);
                }
            }
            from = m + Duration::seconds(1);
        }
        best
    }

    /// The next `n` firings after `after`.
    pub fn upcoming(&self, after: DateTime<Utc>, n: usize) -> Vec<DateTime<Utc>> {
        let mut out = Vec::with_capacity(n);
        let mut t = after;
        while out.len() < n {
            match self.next_after(t) {
                Some(next) => {
                    out.push(next);
                    t = next;
                }
                None => break,
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().to_utc()
    }

    fn fires(expr: &str, tz: &str, after: &str, n: usize) -> Vec<String> {
        CronSchedule::parse(expr, tz)
            .unwrap()
            .upcoming(utc(after), n)
            .iter()
            .map(|t| t.to_rfc3339())
            .collect()
    }

    #[test]
    fn weekdays_in_a_time_zone() {
        // 09:00 Tokyo is 00:00 UTC; 2026-11-27 is a Friday.
        assert_eq!(
            fires("0 9 * * mon-fri", "Asia/Tokyo", "2026-11-26T12:00:00Z", 3),
            [
                "2026-11-27T00:00:00+00:00",
                "2026-11-30T00:00:00+00:00",
                "2026-12-01T00:00:00+00:00"
            ]
        );
    }

    #[test]
    fn steps_lists_names_and_macros() {
        assert_eq!(
            fires("*/20 * * * *", "UTC", "2026-01-01T00:05:00Z", 3),
            [
                "2026-01-01T00:20:00+00:00",
                "2026-01-01T00:40:00+00:00",
                "2026-01-01T01:00:00+00:00"
            ]
        );
        assert_eq!(
            fires("0 0 1 JAN,jul *", "UTC", "2026-03-01T00:00:00Z", 2),
            ["2026-07-01T00:00:00+00:00", "2027-01-01T00:00:00+00:00"]
        );
        assert_eq!(
            fires("@weekly", "UTC", "2026-11-26T00:00:00Z", 1),
            ["2026-11-29T00:00:00+00:00"]
        );
        assert_eq!(
            fires("*/2 * * * * *", "UTC", "2026-01-01T00:00:01Z", 2),
            ["2026-01-01T00:00:02+00:00", "2026-01-01T00:00:04+00:00"]
        );
        // Sunday as 7; 10-50/20 = 10, 30, 50.
        assert_eq!(
            fires("10-50/20 12 * * 7", "UTC", "2026-11-26T00:00:00Z", 3),
            [
                "2026-11-29T12:10:00+00:00",
                "2026-11-29T12:30:00+00:00",
                "2026-11-29T12:50:00+00:00"
            ]
        );
    }

    #[test]
    fn both_day_fields_restricted_match_either() {
        // The 13th, or any Friday: 2026-11-27 (Fri), 2026-12-04 (Fri), ..., 2026-12-13 (the 13th).
        let got = fires("0 0 13 * fri", "UTC", "2026-11-26T00:00:00Z", 4);
        assert_eq!(
            got,
            [
                "2026-11-27T00:00:00+00:00",
                "2026-12-04T00:00:00+00:00",
                "2026-12-11T00:00:00+00:00",
                "2026-12-13T00:00:00+00:00"
            ]
        );
        // Leap day.
        assert_eq!(
            fires("0 0 29 2 *", "UTC", "2026-01-01T00:00:00Z", 1),
            ["2028-02-29T00:00:00+00:00"]
        );
    }

    #[test]
    fn spring_forward_gap_fires_once_after_the_gap() {
        // Berlin jumps 02:00 -> 03:00 on 2026-03-29 (01:00 UTC).
        assert_eq!(
            fires("30 2 * * *", "Europe/Berlin", "2026-03-28T12:00:00Z", 2),
            ["2026-03-29T01:00:00+00:00", "2026-03-30T00:30:00+00:00"]
        );
        // Every quarter of the missing hour collapses into one firing.
        assert_eq!(
            fires("*/15 2 * * *", "Europe/Berlin", "2026-03-28T12:00:00Z", 2),
            ["2026-03-29T01:00:00+00:00", "2026-03-30T00:00:00+00:00"]
        );
    }

    #[test]
    fn fall_back_repeated_hour() {
        // New York repeats 01:00-02:00 on 2026-11-01 (EDT 05:00-06:00 UTC, then EST 06:00-07:00).
        assert_eq!(
            fires("30 1 * * *", "America/New_York", "2026-10-31T12:00:00Z", 2),
            ["2026-11-01T05:30:00+00:00", "2026-11-02T06:30:00+00:00"]
        );
        // An hourly schedule keeps firing every real hour, both 01:00s included.
        assert_eq!(
            fires("0 * * * *", "America/New_York", "2026-11-01T03:30:00Z", 4),
            [
                "2026-11-01T04:00:00+00:00",
                "2026-11-01T05:00:00+00:00",
                "2026-11-01T06:00:00+00:00",
                "2026-11-01T07:00:00+00:00"
            ]
        );
        // Starting inside the second 01:00 hour.
        assert_eq!(
            fires(
                "*/30 * * * *",
                "America/New_York",
                "2026-11-01T06:10:00Z",
                2
            ),
            ["2026-11-01T06:30:00+00:00", "2026-11-01T07:00:00+00:00"]
        );
    }

    #[test]
    fn errors_name_the_field() {
        let err = |e: &str, tz: &str| CronSchedule::parse(e, tz).unwrap_err().to_string();
        assert_eq!(
            err("61 * * * *", "UTC"),
            "cron minute: 61 is out of range 0-59"
        );
        assert_eq!(
            err("* * * *", "UTC"),
            "cron: expected 5 fields (minute hour day-of-month month day-of-week) or 6 with seconds first, got 4"
        );
        assert_eq!(
            err("0 0 * foo *", "UTC"),
            "cron month: \"foo\" is not a number or a known name"
        );
        assert_eq!(
            err("0 0 * * 5-1", "UTC"),
            "cron day-of-week: range \"5-1\" runs backwards"
        );
        assert_eq!(
            err("*/0 * * * *", "UTC"),
            "cron minute: step \"0\" must be a positive number"
        );
        assert!(err("0 0 31 2 *", "UTC").contains("never fires"));
        assert!(err("@often", "UTC").contains("unknown macro"));
        assert!(err("0 0 * * *", "Mars/Olympus").starts_with("time zone: unknown zone"));
    }
}
