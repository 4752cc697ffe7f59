//! A minimum transfer rate for request bodies: a stream wrapper that fails once fewer than
//! `min_bytes_per_sec` arrived over a sliding `window`, so a client dribbling a byte now and then
//! cannot hold a connection slot for ever (issue 16; the idle timeout alone only catches silence).
//!
//! Only time spent waiting for the client counts: while the consumer holds an item (spooling it,
//! chunking it, waiting on the backend), the window's clock stands still, so our own backpressure
//! never makes a client look slow.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use tokio::time::{Instant, Sleep};

/// The window is checked at this many evenly spaced points, so a too-slow body is cut at most
/// `window / SLOTS` after the window it failed in.
const SLOTS: u32 = 10;

/// The rule: at least `min_bytes_per_sec` on average over every `window` of client time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MinRate {
    pub min_bytes_per_sec: u64,
    pub window: Duration,
}

impl MinRate {
    /// Bytes one full window must bring.
    #[must_use]
    pub fn bytes_per_window(&self) -> u64 {
        let n = u128::from(self.min_bytes_per_sec) * self.window.as_millis() / 1000;
        u64::try_from(n).unwrap_or(u64::MAX)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BodyRateError<E> {
    /// S3 answers this case with 400 `RequestTimeout`.
    #[error(
        "request body too slow: {got} bytes in the last {}s, the minimum is {min_bytes_per_sec} bytes/s",
        .window.as_secs()
    )]
    TooSlow {
        got: u64,
        window: Duration,
        min_bytes_per_sec: u64,
    },
    #[error("reading the request body: {0}")]
    Body(#[source] E),
}

/// `inner` with [`MinRate`] enforced; a rule of 0 bytes/s passes everything through.
pub struct MinRateStream<S> {
    inner: S,
    rule: MinRate,
    slot: Duration,
    /// Bytes of the last completed slots, oldest first (at most [`SLOTS`]).
    done: VecDeque<u64>,
    current: u64,
    /// Client time (see the module docs) at which `current` ends.
    slot_end: Duration,
    /// Client time accumulated before the present wait.
    waited: Duration,
    /// Set while we wait for the client, i.e. after `inner` returned `Pending`.
    wait_since: Option<Instant>,
    /// Fires when `current` ends in client time (created on the first wait: needs a runtime).
    timer: Option<Pin<Box<Sleep>>>,
    failed: bool,
}

impl<S> std::fmt::Debug for MinRateStream<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MinRateStream")
            .field("rule", &self.rule)
            .field("waited", &self.waited)
            .finish_non_exhaustive()
    }
}

impl<S> MinRateStream<S> {
    #[must_use]
    pub fn new(inner: S, rule: MinRate) -> Self {
        let slot = (rule.window / SLOTS).max(Duration::from_millis(1));
        Self {
            inner,
            rule,
            slot,
            done: VecDeque::with_capacity(SLOTS as usize + 1),
            current: 0,
            slot_end: slot,
            waited: Duration::ZERO,
            wait_since: None,
            timer: None,
            failed: false,
        }
    }

    fn enabled(&self) -> bool {
        self.rule.min_bytes_per_sec > 0 && !self.rule.window.is_zero()
    }

    fn client_time(&self, now: Instant) -> Duration {
        self.waited + self.wait_since.map_or(Duration::ZERO, |t| now - t)
    }

    /// Close every slot that ended by client time `t`; the bytes of the last full window once one
    /// closes below the minimum.
    fn roll(&mut self, t: Duration) -> Option<u64> {
        let need = self.rule.bytes_per_window();
        while t >= self.slot_end {
            self.done.push_back(std::mem::take(&mut self.current));
            if self.done.len() > SLOTS as usize {
                self.done.pop_front();
            }
            self.slot_end += self.slot;
            if self.done.len() == SLOTS as usize {
                let got: u64 = self.done.iter().sum();
                if got < need {
                    return Some(got);
                }
            }
        }
        None
    }
}

impl<S, E> Stream for MinRateStream<S>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
{
    type Item = Result<Bytes, BodyRateError<E>>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.failed {
            return Poll::Ready(None);
        }
        if !this.enabled() {
            return Pin::new(&mut this.inner)
                .poll_next(cx)
                .map(|o| o.map(|r| r.map_err(BodyRateError::Body)));
        }
        loop {
            let now = Instant::now();
            if let Some(got) = this.roll(this.client_time(now)) {
                this.failed = true;
                return Poll::Ready(Some(Err(BodyRateError::TooSlow {
                    got,
                    window: this.rule.window,
                    min_bytes_per_sec: this.rule.min_bytes_per_sec,
                })));
            }
            match Pin::new(&mut this.inner).poll_next(cx) {
                Poll::Ready(item) => {
                    if let Some(since) = this.wait_since.take() {
                        this.waited += now - since;
                    }
                    if let Some(Ok(b)) = &item {
                        this.current += b.len() as u64;
                    }
                    return Poll::Ready(item.map(|r| r.map_err(BodyRateError::Body)));
                }
                Poll::Pending => {
                    let since = *this.wait_since.get_or_insert(now);
                    // Wake when the current slot ends in client time, to check the window then.
                    let client_now = this.waited + (now - since);
                    let deadline = now + this.slot_end.saturating_sub(client_now);
                    let timer = this
                        .timer
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                    if timer.deadline() != deadline {
                        timer.as_mut().reset(deadline);
                    }
                    if timer.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use futures::StreamExt;

    use super::*;

    const RULE: MinRate = MinRate {
        min_bytes_per_sec: 1024,
        window: Duration::from_secs(30),
    };

    /// A body that sends `piece` bytes every `every`, for ever.
    fn dribble(piece: usize, every: Duration) -> impl Stream<Item = Result<Bytes, Infallible>> {
        futures::stream::unfold((), move |()| async move {
            tokio::time::sleep(every).await;
            Some((Ok(Bytes::from(vec![0u8; piece])), ()))
        })
    }

    /// Read until the stream fails; how long that took and the error.
    async fn time_to_failure<S>(mut s: MinRateStream<S>) -> (Duration, String)
    where
        S: Stream<Item = Result<Bytes, Infallible>> + Unpin,
    {
        let start = Instant::now();
        loop {
            match s.next().await {
                Some(Ok(_)) => {}
                Some(Err(e)) => return (start.elapsed(), e.to_string()),
                None => panic!("the body ended"),
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_byte_every_59_seconds_is_cut_after_one_window() {
        let s = MinRateStream::new(Box::pin(dribble(1, Duration::from_secs(59))), RULE);
        let (took, e) = time_to_failure(s).await;
        assert_eq!(took, Duration::from_secs(30));
        assert_eq!(
            e,
            "request body too slow: 0 bytes in the last 30s, the minimum is 1024 bytes/s"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_slows_down_is_cut_one_slot_after_its_window_drops_below() {
        // 1 MiB/s for 60 s, then 100 bytes/s: the first window without a fast second is
        // [63 s, 93 s) (slots are 3 s), and the check at its end fails it.
        let fast = dribble(1 << 20, Duration::from_secs(1)).take(60);
        let slow = dribble(100, Duration::from_secs(1));
        let s = MinRateStream::new(Box::pin(fast.chain(slow)), RULE);
        let (took, e) = time_to_failure(s).await;
        assert_eq!(took, Duration::from_secs(93));
        assert_eq!(
            e,
            "request body too slow: 3000 bytes in the last 30s, the minimum is 1024 bytes/s"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_just_above_the_minimum_rate_completes() {
        // 29 pieces fall in each 30 s window (the first arrives after 1 s): 29 * 1100 >= 30 * 1024.
        let body = dribble(1100, Duration::from_secs(1)).take(600);
        let mut s = MinRateStream::new(Box::pin(body), RULE);
        let mut total = 0;
        while let Some(item) = s.next().await {
            total += item.unwrap().len();
        }
        assert_eq!(total, 600 * 1100);
    }

    #[tokio::test(start_paused = true)]
    async fn time_the_consumer_holds_an_item_does_not_count() {
        // 2 KiB/s from the client, but we take 10 s to process each piece: real throughput is
        // ~200 bytes/s, the client's own rate is fine.
        let body = dribble(2048, Duration::from_secs(1)).take(20);
        let mut s = MinRateStream::new(Box::pin(body), RULE);
        let mut n = 0;
        while let Some(item) = s.next().await {
            item.unwrap();
            n += 1;
            tokio::time::sleep(Duration::from_secs(10)).await;
        }
        assert_eq!(n, 20);
    }

    #[tokio::test(start_paused = true)]
    async fn zero_disables_the_rule_and_inner_errors_pass_through() {
        let rule = MinRate {
            min_bytes_per_sec: 0,
            ..RULE
        };
        let body = dribble(1, Duration::from_secs(3600)).take(2);
        let got: Vec<_> = MinRateStream::new(Box::pin(body), rule).collect().await;
        assert_eq!(got.len(), 2);
        let failing = futures::stream::iter([Err::<Bytes, _>("reset")]);
        let mut s = MinRateStream::new(failing, RULE);
        assert_eq!(
            s.next().await.unwrap().unwrap_err().to_string(),
            "reading the request body: reset"
        );
    }
}
