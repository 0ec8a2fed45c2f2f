//! The tracker's clock, injectable: the system clock in service, a manual
//! clock in tests, so that no test sleeps for a deadline.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use tokio::sync::watch;

/// What time it is, and a way to wait until a time.
#[derive(Clone)]
pub enum Clock {
    /// The system clock.
    System,
    /// A clock that moves only when told to.
    Manual(Arc<watch::Sender<DateTime<Utc>>>),
}

impl Clock {
    /// A manual clock starting at `at`.
    #[must_use]
    pub fn manual(at: DateTime<Utc>) -> Self {
        Clock::Manual(Arc::new(watch::channel(at).0))
    }

    #[must_use]
    pub fn now(&self) -> DateTime<Utc> {
        match self {
            Clock::System => Utc::now(),
            Clock::Manual(time) => *time.borrow(),
        }
    }

    /// Moves a manual clock to `at` (never backwards); no effect on the
    /// system clock.
    pub fn set(&self, at: DateTime<Utc>) {
        if let Clock::Manual(time) = self {
            time.send_modify(|now| *now = (*now).max(at));
        }
    }

    /// Moves a manual clock forward by `by`.
    pub fn advance(&self, by: chrono::Duration) {
        self.set(self.now() + by);
    }

    /// Resolves once the clock reads `at` or later.
    pub async fn sleep_until(&self, at: DateTime<Utc>) {
        match self {
            Clock::System => {
                let wait = (at - Utc::now()).to_std().unwrap_or_default();
                tokio::time::sleep(wait).await;
            }
            Clock::Manual(time) => {
                let mut rx = time.subscribe();
                let _ = rx.wait_for(|now| *now >= at).await;
            }
        }
    }
}

/// Unix milliseconds of a time, as stored in the ledger.
#[must_use]
pub fn millis(at: DateTime<Utc>) -> i64 {
    at.timestamp_millis()
}

/// The time of stored Unix milliseconds.
#[must_use]
pub fn from_millis(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[tokio::test]
    async fn a_manual_clock_wakes_sleepers_when_it_reaches_their_time() {
        let start = Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).unwrap();
        let clock = Clock::manual(start);
        let sleeper = tokio::spawn({
            let clock = clock.clone();
            async move { clock.sleep_until(start + chrono::Duration::hours(24)).await }
        });
        clock.advance(chrono::Duration::hours(23));
        tokio::task::yield_now().await;
        assert!(!sleeper.is_finished());
        clock.advance(chrono::Duration::hours(1));
        sleeper.await.unwrap();
        assert_eq!(clock.now(), start + chrono::Duration::hours(24));
        clock.set(start);
        assert_eq!(
            clock.now(),
            start + chrono::Duration::hours(24),
            "never backwards"
        );
    }
}
