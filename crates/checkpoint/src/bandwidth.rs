//! A cap on the bytes per second one migration writes onto the share, like KubeVirt's
//! `bandwidthPerMigration`: a shared NFS/SMB link is what every node's migrations and every
//! other user of the share compete for, so a node can bound what one pack takes.
//!
//! The cap is a token bucket in front of the archive writer (see [`crate::archive::pack`]):
//! tokens accrue at `rate` bytes per second up to a burst of one second's worth, and a write
//! that finds too few waits until its bytes are covered. The clock is a parameter so the
//! accounting is tested exactly, without timing anything.

use std::time::{Duration, Instant};

/// A rate in bytes per second, written like a Kubernetes quantity: `64Mi` (MiB/s), `500M`,
/// `1.5Gi`, `1048576`. Zero means no cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Bandwidth(pub u64);

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("bandwidth {value:?} is not a quantity of bytes per second like 64Mi, 500M or 1048576: {reason}")]
pub struct BandwidthError {
    pub value: String,
    pub reason: &'static str,
}

impl Bandwidth {
    pub const UNLIMITED: Bandwidth = Bandwidth(0);

    /// Parses a Kubernetes-style quantity (binary `Ki Mi Gi Ti Pi Ei`, decimal `k M G T P E`).
    pub fn parse(value: &str) -> Result<Bandwidth, BandwidthError> {
        let err = |reason| BandwidthError {
            value: value.to_string(),
            reason,
        };
        let text = value.trim();
        let split = text
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(text.len());
        let (number, suffix) = text.split_at(split);
        if number.is_empty() {
            return Err(err("no number"));
        }
        let number: f64 = number.parse().map_err(|_| err("malformed number"))?;
        let multiplier: f64 = match suffix {
            "" => 1.0,
            "k" => 1e3,
            "M" => 1e6,
            "G" => 1e9,
            "T" => 1e12,
            "P" => 1e15,
            "E" => 1e18,
            "Ki" => 1024.0,
            "Mi" => 1024f64.powi(2),
            "Gi" => 1024f64.powi(3),
            "Ti" => 1024f64.powi(4),
            "Pi" => 1024f64.powi(5),
            "Ei" => 1024f64.powi(6),
            _ => return Err(err("unknown suffix (use Ki, Mi, Gi, Ti, k, M, G, T)")),
        };
        let bytes = (number * multiplier).round();
        if !bytes.is_finite() || bytes >= u64::MAX as f64 {
            return Err(err("too large"));
        }
        if bytes == 0.0 && number != 0.0 {
            return Err(err("below one byte per second"));
        }
        Ok(Bandwidth(bytes as u64))
    }

    pub fn is_unlimited(self) -> bool {
        self.0 == 0
    }

    /// The stricter of two caps, where zero means none: a pod may lower the node's cap, never
    /// lift it.
    pub fn stricter(self, other: Bandwidth) -> Bandwidth {
        match (self.is_unlimited(), other.is_unlimited()) {
            (true, _) => other,
            (_, true) => self,
            _ => Bandwidth(self.0.min(other.0)),
        }
    }
}

impl std::fmt::Display for Bandwidth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_unlimited() {
            return f.write_str("unlimited");
        }
        let mib = self.0 as f64 / (1024.0 * 1024.0);
        write!(f, "{mib:.1} MiB/s")
    }
}

/// Time as the limiter sees it: monotonic, and a way to wait.
pub trait Clock {
    /// Time since some fixed start.
    fn now(&self) -> Duration;
    fn sleep(&mut self, duration: Duration);
}

/// The real clock: `Instant` and a thread sleep (packing runs on its own threads).
#[derive(Debug)]
pub struct SystemClock(Instant);

impl Default for SystemClock {
    fn default() -> Self {
        SystemClock(Instant::now())
    }
}

impl Clock for SystemClock {
    fn now(&self) -> Duration {
        self.0.elapsed()
    }
    fn sleep(&mut self, duration: Duration) {
        std::thread::sleep(duration);
    }
}

/// A token bucket over bytes.
#[derive(Debug)]
pub struct TokenBucket<C: Clock = SystemClock> {
    rate: u64,
    burst: f64,
    /// May go negative: a write larger than the bucket is let through and paid off by waiting.
    tokens: f64,
    refilled_at: Duration,
    waited: Duration,
    clock: C,
}

impl TokenBucket<SystemClock> {
    /// `None` for an unlimited cap, so callers skip the bucket entirely.
    pub fn for_bandwidth(bandwidth: Bandwidth) -> Option<Self> {
        (!bandwidth.is_unlimited())
            .then(|| TokenBucket::with_clock(bandwidth, SystemClock::default()))
    }
}

impl<C: Clock> TokenBucket<C> {
    /// Starts full: the first second's worth goes at once, as a link would take it.
    pub fn with_clock(bandwidth: Bandwidth, clock: C) -> Self {
        let rate = bandwidth.0.max(1);
        TokenBucket {
            rate,
            burst: rate as f64,
            tokens: rate as f64,
            refilled_at: clock.now(),
            waited: Duration::ZERO,
            clock,
        }
    }

    fn refill(&mut self) {
        let now = self.clock.now();
        let elapsed = now.saturating_sub(self.refilled_at).as_secs_f64();
        self.refilled_at = now;
        self.tokens = (self.tokens + elapsed * self.rate as f64).min(self.burst);
    }

    /// Accounts for `bytes` about to be written, waiting first as long as the cap requires.
    pub fn take(&mut self, bytes: u64) {
        self.refill();
        self.tokens -= bytes as f64;
        if self.tokens < 0.0 {
            let wait = Duration::from_secs_f64(-self.tokens / self.rate as f64);
            self.clock.sleep(wait);
            self.waited += wait;
            self.refill();
        }
    }

    /// Total time spent waiting for tokens.
    pub fn waited(&self) -> Duration {
        self.waited
    }

    pub fn clock(&self) -> &C {
        &self.clock
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A clock that moves only when someone sleeps (or the test advances it).
    #[derive(Default)]
    struct ManualClock {
        now: Duration,
        sleeps: usize,
    }

    impl Clock for ManualClock {
        fn now(&self) -> Duration {
            self.now
        }
        fn sleep(&mut self, duration: Duration) {
            self.now += duration;
            self.sleeps += 1;
        }
    }

    const MI: u64 = 1024 * 1024;

    #[test]
    fn quantities_parse_like_kubernetes() {
        for (text, bytes) in [
            ("64Mi", 64 * MI),
            ("1Gi", 1024 * MI),
            ("1.5Gi", 1536 * MI),
            ("500M", 500_000_000),
            ("10k", 10_000),
            ("1048576", MI),
            ("0", 0),
            (" 8Ki ", 8192),
        ] {
            assert_eq!(Bandwidth::parse(text), Ok(Bandwidth(bytes)), "{text}");
        }
        for bad in ["", "Mi", "64MB", "64 Mi", "-1", "1.2.3", "0.1", "1e3"] {
            let err = Bandwidth::parse(bad).unwrap_err();
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[test]
    fn a_pod_may_lower_the_node_cap_never_lift_it() {
        let node = Bandwidth(64 * MI);
        assert_eq!(node.stricter(Bandwidth(8 * MI)), Bandwidth(8 * MI));
        assert_eq!(node.stricter(Bandwidth(512 * MI)), node);
        assert_eq!(node.stricter(Bandwidth::UNLIMITED), node);
        assert_eq!(Bandwidth::UNLIMITED.stricter(Bandwidth(MI)), Bandwidth(MI));
        assert!(Bandwidth::UNLIMITED
            .stricter(Bandwidth::UNLIMITED)
            .is_unlimited());
    }

    #[test]
    fn writing_n_bytes_at_rate_r_takes_n_over_r_less_the_burst() {
        // 100 MiB in 4 MiB-ish chunks at 10 MiB/s: the first 10 MiB are the burst, the other
        // 90 MiB take 9 seconds of waiting.
        let mut bucket = TokenBucket::with_clock(Bandwidth(10 * MI), ManualClock::default());
        let chunk = 4 * MI + 12_345;
        let total = 100 * MI;
        let mut written = 0;
        while written < total {
            let n = chunk.min(total - written);
            bucket.take(n);
            written += n;
            // Never ahead of the cap: bytes written <= burst + rate * elapsed.
            let allowed =
                10 * MI as u128 + (10 * MI) as u128 * bucket.clock().now.as_nanos() / 1_000_000_000;
            assert!(written as u128 <= allowed + 1, "{written} > {allowed}");
        }
        let expected = Duration::from_secs(9);
        let waited = bucket.waited();
        assert!(
            waited.abs_diff(expected) < Duration::from_millis(1),
            "{waited:?}"
        );
        assert_eq!(bucket.clock().now, waited);
    }

    #[test]
    fn idle_time_refills_up_to_one_second_of_burst_only() {
        let mut bucket = TokenBucket::with_clock(Bandwidth(MI), ManualClock::default());
        bucket.take(MI);
        assert_eq!(bucket.waited(), Duration::ZERO);
        // An hour idle buys one second's worth, not an hour's.
        bucket.clock.now += Duration::from_secs(3600);
        bucket.take(MI);
        assert_eq!(bucket.waited(), Duration::ZERO);
        bucket.take(MI / 2);
        assert_eq!(bucket.waited(), Duration::from_millis(500));
        assert_eq!(bucket.clock().sleeps, 1);
    }

    #[test]
    fn a_write_larger_than_the_burst_is_paid_off_by_waiting() {
        let mut bucket = TokenBucket::with_clock(Bandwidth(MI), ManualClock::default());
        bucket.take(5 * MI);
        assert_eq!(bucket.waited(), Duration::from_secs(4));
        bucket.take(MI);
        assert_eq!(bucket.waited(), Duration::from_secs(5));
    }

    /// A real pack under a cap: the time it waited is what the accounting says, and it never
    /// wrote faster than the cap plus the burst (a lower bound on its duration, which a slow
    /// machine only makes longer: no upper bound is timed).
    #[test]
    fn a_capped_pack_waits_and_never_outruns_the_cap() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ck");
        std::fs::create_dir_all(&dir).unwrap();
        let mut noise = vec![0u8; 384 << 10];
        let mut x: u64 = 0x2545_F491_4F6C_DD1D;
        for b in noise.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        std::fs::write(dir.join("pages-1.img"), &noise).unwrap();
        let rate = 128u64 << 10;
        let options = crate::archive::PackOptions {
            chunk_size: 64 << 10,
            bandwidth: Bandwidth(rate),
            ..Default::default()
        };
        let started = Instant::now();
        let summary = crate::archive::pack(&dir, &tmp.path().join("a.zip"), &options).unwrap();
        let elapsed = started.elapsed();
        crate::archive::verify(&summary.archive, &Default::default()).unwrap();
        // Random data does not compress: about 384 KiB of chunks go through the bucket.
        let floor = Duration::from_secs_f64(((384u64 << 10) - rate) as f64 / rate as f64 * 0.95);
        assert!(summary.throttled > Duration::ZERO, "{summary:?}");
        assert!(elapsed >= floor, "{elapsed:?} < {floor:?}");
        assert!(summary.throttled <= elapsed);

        let unlimited = crate::archive::pack(
            &dir,
            &tmp.path().join("b.zip"),
            &crate::archive::PackOptions::default(),
        )
        .unwrap();
        assert_eq!(unlimited.throttled, Duration::ZERO);
    }
}
