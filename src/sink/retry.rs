//! Exponential backoff with full jitter, capped by attempts and elapsed time.
//!
//! Classification (is this failure worth retrying, and after how long does the server ask us to
//! wait) belongs to each backend; this module only decides how long to wait.

use std::time::Duration;

use crate::datagen::Rng;

/// When to try again.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    max_attempts: u32,
    max_elapsed: Duration,
    rng: Rng,
}

impl Backoff {
    /// A policy: the n-th retry waits a uniformly random time in `[0, min(max, initial * 2^n))`.
    pub fn new(
        initial: Duration,
        max: Duration,
        max_attempts: u32,
        max_elapsed: Duration,
        seed: u64,
    ) -> Self {
        Self {
            initial,
            max,
            max_attempts,
            max_elapsed,
            rng: Rng::new(seed),
        }
    }

    /// The wait before attempt `attempt + 1`, after `attempt` failed attempts and `elapsed` time,
    /// or `None` when the budget is spent. A server's Retry-After is honoured (never waiting
    /// less than it asks) as long as it fits in the elapsed budget.
    pub fn next_delay(
        &mut self,
        attempt: u32,
        elapsed: Duration,
        retry_after: Option<Duration>,
    ) -> Option<Duration> {
        if attempt >= self.max_attempts || elapsed >= self.max_elapsed {
            return None;
        }
        let ceiling = self
            .initial
            .saturating_mul(1u32.checked_shl(attempt.saturating_sub(1)).unwrap_or(u32::MAX))
            .min(self.max);
        let jitter = Duration::from_nanos(self.rng.below(ceiling.as_nanos().max(1) as u64));
        let delay = retry_after.map_or(jitter, |ra| ra.max(jitter));
        (elapsed.saturating_add(delay) <= self.max_elapsed).then_some(delay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Backoff {
        Backoff::new(
            Duration::from_millis(100),
            Duration::from_secs(2),
            6,
            Duration::from_secs(60),
            7,
        )
    }

    #[test]
    fn delays_stay_under_a_doubling_ceiling() {
        let mut b = policy();
        for attempt in 1..6 {
            let ceiling = Duration::from_millis(100 * (1 << (attempt - 1))).min(Duration::from_secs(2));
            for _ in 0..200 {
                let d = b.next_delay(attempt, Duration::ZERO, None).unwrap();
                assert!(d < ceiling, "attempt {attempt}: {d:?} >= {ceiling:?}");
            }
        }
    }

    #[test]
    fn jitter_spreads_delays() {
        let mut b = policy();
        let ds: Vec<Duration> = (0..100)
            .map(|_| b.next_delay(4, Duration::ZERO, None).unwrap())
            .collect();
        let min = ds.iter().min().unwrap();
        let max = ds.iter().max().unwrap();
        assert!(*max - *min > Duration::from_millis(400), "{min:?}..{max:?}");
    }

    #[test]
    fn budget_is_attempts_and_elapsed() {
        let mut b = policy();
        assert!(b.next_delay(6, Duration::ZERO, None).is_none());
        assert!(b.next_delay(1, Duration::from_secs(60), None).is_none());
        // A Retry-After that would overrun the elapsed budget ends the retries.
        assert!(
            b.next_delay(1, Duration::from_secs(50), Some(Duration::from_secs(20)))
                .is_none()
        );
    }

    #[test]
    fn retry_after_is_honoured() {
        let mut b = policy();
        let d = b
            .next_delay(1, Duration::ZERO, Some(Duration::from_secs(3)))
            .unwrap();
        assert_eq!(d, Duration::from_secs(3));
        // A server asking for an absurd wait gives up the request; it does not overflow.
        assert_eq!(b.next_delay(1, Duration::from_secs(1), Some(Duration::MAX)), None);
    }

    /// The waits, as a sender sleeps them, add up under tokio's paused clock (whose timer
    /// wheel rounds each deadline up to the next millisecond).
    #[tokio::test(start_paused = true)]
    async fn sleeps_follow_the_policy_under_paused_time() {
        let mut b = policy();
        let start = tokio::time::Instant::now();
        let mut expected = Duration::ZERO;
        let mut attempt = 1;
        while let Some(d) = b.next_delay(attempt, start.elapsed(), None) {
            tokio::time::sleep(d).await;
            expected += d;
            let slack = Duration::from_millis(u64::from(attempt));
            assert!(start.elapsed() >= expected && start.elapsed() <= expected + slack);
            attempt += 1;
        }
        assert_eq!(attempt, 6, "stopped by max_attempts");
        assert!(expected < Duration::from_millis(100 + 200 + 400 + 800 + 1600));
    }
}
