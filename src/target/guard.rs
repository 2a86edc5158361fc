//! What keeps one target from being flooded or hammered while it is down: an adaptive request
//! rate shared by every task of the process, and a circuit breaker.
//!
//! Hand-written rather than `governor`: the rate must move (halve on 429, recover gradually)
//! and pause everyone for a Retry-After, which governor's fixed quotas do not do.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The rate a target that never said "too many requests" gets when it first does.
const FIRST_LIMIT: f64 = 50.0;
/// Never slower than this many requests a second.
const MIN_RATE: f64 = 0.5;

#[derive(Debug)]
pub struct RateLimiter {
    /// The configured ceiling (requests/s); None: unlimited until the target throttles.
    ceiling: Option<f64>,
    burst: f64,
    state: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    /// Current rate; None while unlimited.
    rate: Option<f64>,
    tokens: f64,
    last: Instant,
    paused_until: Option<Instant>,
}

impl RateLimiter {
    pub fn new(ceiling: Option<f64>, burst: u32) -> RateLimiter {
        let burst = f64::from(burst.max(1));
        RateLimiter {
            ceiling,
            burst,
            state: Mutex::new(Bucket {
                rate: ceiling,
                tokens: burst,
                last: Instant::now(),
                paused_until: None,
            }),
        }
    }

    /// How long to wait before the next request may go (zero: go now; the token is taken).
    fn reserve(&self, now: Instant) -> Duration {
        let mut b = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(until) = b.paused_until {
            if now < until {
                return until - now;
            }
            b.paused_until = None;
        }
        let Some(rate) = b.rate else {
            return Duration::ZERO;
        };
        let elapsed = now.saturating_duration_since(b.last).as_secs_f64();
        b.last = now;
        b.tokens = (b.tokens + elapsed * rate).min(self.burst);
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Duration::ZERO
        } else {
            Duration::from_secs_f64((1.0 - b.tokens) / rate)
        }
    }

    pub async fn acquire(&self) {
        loop {
            let wait = self.reserve(Instant::now());
            if wait.is_zero() {
                return;
            }
            tokio::time::sleep(wait).await;
        }
    }

    /// The target answered 429: everyone waits out Retry-After, and the rate halves.
    pub fn throttled(&self, retry_after: Option<Duration>) {
        let now = Instant::now();
        let mut b = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let rate = b.rate.unwrap_or(FIRST_LIMIT);
        b.rate = Some((rate / 2.0).max(MIN_RATE));
        b.tokens = b.tokens.min(1.0);
        if let Some(ra) = retry_after {
            let until = now + ra;
            if b.paused_until.is_none_or(|p| p < until) {
                b.paused_until = Some(until);
            }
        }
    }

    /// A request went through: the rate creeps back up (5% a success) to its ceiling.
    pub fn succeeded(&self) {
        let mut b = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(rate) = b.rate {
            let next = rate * 1.05 + 0.1;
            b.rate = match self.ceiling {
                Some(c) => Some(next.min(c)),
                // Unlimited again once it is well past where throttling began.
                None if next > FIRST_LIMIT * 4.0 => None,
                None => Some(next),
            };
        }
    }

    pub fn current_rate(&self) -> Option<f64> {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).rate
    }
}

/// Outcomes remembered by the breaker.
const WINDOW: usize = 20;
/// Outcomes needed before it may open.
const MIN_SAMPLES: usize = 10;
/// Share of failures among the window that opens it.
const TRIP_RATIO: f64 = 0.8;

#[derive(Debug)]
pub struct Breaker {
    cooldown: Duration,
    state: Mutex<BreakerState>,
}

#[derive(Debug, Default)]
struct BreakerState {
    window: VecDeque<bool>,
    open_until: Option<Instant>,
    probing: bool,
}

/// Why the breaker refused a request.
#[derive(Debug, Clone)]
pub struct Open {
    pub retry_in: Duration,
    /// A probe is under way: its answer decides in a moment.
    pub probing: bool,
}

impl Breaker {
    pub fn new(cooldown: Duration) -> Breaker {
        Breaker {
            cooldown,
            state: Mutex::new(BreakerState::default()),
        }
    }

    /// Whether a request may go now; while open, one probe goes after each cooldown.
    pub fn allow(&self) -> Result<(), Open> {
        let now = Instant::now();
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match s.open_until {
            None => Ok(()),
            Some(until) if now < until || s.probing => Err(Open {
                retry_in: until.saturating_duration_since(now),
                probing: s.probing,
            }),
            Some(_) => {
                s.probing = true;
                Ok(())
            }
        }
    }

    /// Records one request's outcome (`failed`: the target is down or refuses us).
    /// Returns Some(true) when the breaker opened, Some(false) when it closed.
    pub fn record(&self, failed: bool) -> Option<bool> {
        let now = Instant::now();
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if s.probing {
            s.probing = false;
            if failed {
                s.open_until = Some(now + self.cooldown);
                return None;
            }
            s.open_until = None;
            s.window.clear();
            return Some(false);
        }
        if s.open_until.is_some() {
            return None;
        }
        s.window.push_back(failed);
        if s.window.len() > WINDOW {
            s.window.pop_front();
        }
        let failures = s.window.iter().filter(|f| **f).count();
        if s.window.len() >= MIN_SAMPLES && failures as f64 >= TRIP_RATIO * s.window.len() as f64 {
            s.open_until = Some(now + self.cooldown);
            return Some(true);
        }
        None
    }

    pub fn is_open(&self) -> bool {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .open_until
            .is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_halves_on_429_and_recovers() {
        let r = RateLimiter::new(Some(100.0), 10);
        r.throttled(None);
        assert_eq!(r.current_rate(), Some(50.0));
        r.throttled(None);
        assert_eq!(r.current_rate(), Some(25.0));
        for _ in 0..200 {
            r.succeeded();
        }
        assert_eq!(
            r.current_rate(),
            Some(100.0),
            "back to the ceiling, not beyond"
        );
        let unlimited = RateLimiter::new(None, 10);
        assert_eq!(unlimited.reserve(Instant::now()), Duration::ZERO);
        unlimited.throttled(Some(Duration::from_secs(2)));
        assert_eq!(unlimited.current_rate(), Some(25.0));
        assert!(
            unlimited.reserve(Instant::now()) > Duration::from_millis(1500),
            "Retry-After pauses everyone"
        );
        for _ in 0..500 {
            unlimited.succeeded();
        }
        assert_eq!(unlimited.current_rate(), None, "unlimited again");
    }

    #[test]
    fn tokens_pace_requests() {
        let r = RateLimiter::new(Some(10.0), 2);
        let now = Instant::now();
        assert_eq!(r.reserve(now), Duration::ZERO);
        assert_eq!(r.reserve(now), Duration::ZERO);
        let wait = r.reserve(now);
        assert!(
            wait > Duration::from_millis(50) && wait <= Duration::from_millis(100),
            "{wait:?}"
        );
    }

    #[test]
    fn breaker_opens_when_most_fail_probes_and_closes() {
        let b = Breaker::new(Duration::from_millis(30));
        for _ in 0..5 {
            assert_eq!(b.record(false), None);
        }
        for _ in 0..19 {
            b.record(true);
        }
        assert!(b.is_open());
        assert!(b.allow().is_err(), "open: nothing goes");
        std::thread::sleep(Duration::from_millis(40));
        assert!(b.allow().is_ok(), "one probe after the cooldown");
        assert!(b.allow().is_err(), "only one");
        assert_eq!(b.record(true), None, "failed probe: open again");
        std::thread::sleep(Duration::from_millis(40));
        assert!(b.allow().is_ok());
        assert_eq!(b.record(false), Some(false), "a good probe closes it");
        assert!(!b.is_open() && b.allow().is_ok());
    }
}
