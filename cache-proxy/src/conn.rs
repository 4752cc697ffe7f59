//! The connection layer: accepts TCP connections under a limit and serves HTTP/1.1 on each, bounding
//! what a slow, oversized or flooding client can cost (header read timeout, header size, write stalls,
//! and the share of slots held by connections that have not sent a request head yet).

use std::collections::{BTreeSet, HashMap};
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::body::{Body, HttpBody};
use bytes::Bytes;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::config::HttpLimits;

/// Serve `app` on `listener` until `shutdown` resolves; then stop accepting, let in-flight requests
/// finish and return once every connection closed.
///
/// Overflow policy: at `max_connections` we stop calling `accept`, so further clients wait in the
/// kernel's backlog (and get refused once it is full) instead of costing memory here. Of those
/// slots, at most `max_connections_awaiting_headers` may be waiting for a request head (a new
/// connection, or a kept-alive one between requests); past that, the one that has waited longest
/// among those of the client address with the most waiters is closed. A legitimate client sends
/// its head within milliseconds, so the oldest waiter is a dribbler (issue 16: slow headers without
/// a URL held every slot); and a flood from one job pod only ever closes its own connections, never
/// those of a pod that just connected (issue 16 soak: a flood reconnecting hundreds of times a
/// second closed other clients' connections before their heads were read).
///
/// With `tls`, each connection first completes a TLS handshake, which counts as waiting for the
/// request head (bounded by `header_read_timeout`, and evictable like a slow head).
pub async fn serve_connections(
    listener: TcpListener,
    app: axum::Router,
    limits: HttpLimits,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let max = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    let permits = Arc::new(Semaphore::new(max as usize));
    let waiters = Arc::new(HeadWaiters::new(limits.max_connections_awaiting_headers));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => p.expect("the semaphore is never closed"),
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, peer)) => (s, peer.ip()),
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning; the listener stays usable.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let io = WriteStallTimeout::new(stream, limits.body_idle_timeout);
        let slot = Arc::new(ConnSlot::new(waiters.clone(), peer));
        slot.await_head();
        let svc = TrackHeads {
            inner: TowerToHyperService::new(app.clone()),
            slot: slot.clone(),
        };
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            .max_buf_size(limits.max_header_bytes);
        let stop = stop_rx.clone();
        let tls = tls.clone();
        let handshake_limit = limits.header_read_timeout;
        tokio::spawn(async move {
            let _permit = permit;
            match tls {
                None => drive(TokioIo::new(io), &builder, svc, &slot, stop).await,
                Some(acceptor) => {
                    let handshake = tokio::time::timeout(handshake_limit, acceptor.accept(io));
                    tokio::select! {
                        r = handshake => match r {
                            Ok(Ok(tls_stream)) => {
                                drive(TokioIo::new(tls_stream), &builder, svc, &slot, stop).await;
                            }
                            Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                            Err(_) => tracing::debug!("TLS handshake timed out"),
                        },
                        () = slot.evict.cancelled() => {
                            tracing::debug!("closed a connection that waited longest for a TLS handshake");
                        }
                    }
                }
            }
            slot.head_arrived();
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    // Every connection holds a permit until it is done.
    let _ = permits.acquire_many(max).await;
    Ok(())
}

/// Serve HTTP/1.1 on one connection until it ends, is evicted, or shutdown drains it.
async fn drive<I>(
    io: I,
    builder: &hyper::server::conn::http1::Builder,
    svc: TrackHeads<TowerToHyperService<axum::Router>>,
    slot: &ConnSlot,
    mut stop: tokio::sync::watch::Receiver<bool>,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let conn = builder.serve_connection(io, svc);
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        }
        () = slot.evict.cancelled() => {
            tracing::debug!("closed a connection that waited longest for a request head");
        }
        () = async { drop(stop.wait_for(|s| *s).await) } => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

/// Connections waiting for a request head, at most `cap` of them.
#[derive(Debug)]
struct HeadWaiters {
    cap: usize,
    state: Mutex<Waiting>,
}

#[derive(Debug, Default)]
struct Waiting {
    next: u64,
    /// Ticket (increasing, so a smaller one waited longer) → how to close that connection.
    tokens: HashMap<u64, CancellationToken>,
    /// Each client address's waiting tickets.
    by_peer: HashMap<IpAddr, BTreeSet<u64>>,
}

impl HeadWaiters {
    fn new(cap: usize) -> Self {
        Self {
            cap: cap.max(1),
            state: Mutex::new(Waiting::default()),
        }
    }

    /// Add a waiter; while over `cap`, closes the longest waiter of the address with the most
    /// waiters (the oldest of all when every address has one). Returns its ticket.
    fn enter(&self, peer: IpAddr, evict: &CancellationToken) -> u64 {
        let mut guard = self.state.lock().expect("head waiters lock");
        let w = &mut *guard;
        let ticket = w.next;
        w.next += 1;
        w.tokens.insert(ticket, evict.clone());
        w.by_peer.entry(peer).or_default().insert(ticket);
        while w.tokens.len() > self.cap {
            // Most waiters first; among equals, the address whose longest waiter waited longest.
            let Some((&heaviest, _)) = w.by_peer.iter().max_by(|(_, a), (_, b)| {
                a.len()
                    .cmp(&b.len())
                    .then_with(|| b.first().cmp(&a.first()))
            }) else {
                break;
            };
            let tickets = w.by_peer.get_mut(&heaviest).expect("just found");
            let oldest = tickets.pop_first().expect("no empty sets are kept");
            if tickets.is_empty() {
                w.by_peer.remove(&heaviest);
            }
            if let Some(token) = w.tokens.remove(&oldest) {
                token.cancel();
            }
        }
        ticket
    }

    fn leave(&self, peer: IpAddr, ticket: u64) {
        let mut guard = self.state.lock().expect("head waiters lock");
        let w = &mut *guard;
        w.tokens.remove(&ticket);
        if let Some(tickets) = w.by_peer.get_mut(&peer) {
            tickets.remove(&ticket);
            if tickets.is_empty() {
                w.by_peer.remove(&peer);
            }
        }
    }
}

/// One connection's place among the head waiters.
#[derive(Debug)]
struct ConnSlot {
    waiters: Arc<HeadWaiters>,
    peer: IpAddr,
    ticket: Mutex<Option<u64>>,
    evict: CancellationToken,
}

impl ConnSlot {
    fn new(waiters: Arc<HeadWaiters>, peer: IpAddr) -> Self {
        Self {
            waiters,
            peer,
            ticket: Mutex::new(None),
            evict: CancellationToken::new(),
        }
    }

    /// The connection now waits for a request head (new, or done with its last response).
    fn await_head(&self) {
        let mut t = self.ticket.lock().expect("slot lock");
        if t.is_none() {
            *t = Some(self.waiters.enter(self.peer, &self.evict));
        }
    }

    /// A request head arrived (or the connection ended).
    fn head_arrived(&self) {
        if let Some(ticket) = self.ticket.lock().expect("slot lock").take() {
            self.waiters.leave(self.peer, ticket);
        }
    }
}

/// The app as a hyper service that tells the connection's [`ConnSlot`] when a request head arrived
/// and when its response is done (the connection then waits for the next head).
struct TrackHeads<S> {
    inner: S,
    slot: Arc<ConnSlot>,
}

impl<S, F> hyper::service::Service<hyper::Request<Incoming>> for TrackHeads<S>
where
    S: hyper::service::Service<
            hyper::Request<Incoming>,
            Response = hyper::Response<Body>,
            Error = Infallible,
            Future = F,
        >,
    F: Future<Output = Result<hyper::Response<Body>, Infallible>> + Send + 'static,
{
    type Response = hyper::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, req: hyper::Request<Incoming>) -> Self::Future {
        self.slot.head_arrived();
        let fut = self.inner.call(req);
        let done = ResponseDone(Some(self.slot.clone()));
        Box::pin(async move {
            let resp = fut.await?;
            Ok(resp.map(|inner| Body::new(TrackedBody { inner, _done: done })))
        })
    }
}

/// Marks the connection as waiting for its next head when dropped (response sent, or abandoned).
struct ResponseDone(Option<Arc<ConnSlot>>);

impl Drop for ResponseDone {
    fn drop(&mut self) {
        if let Some(slot) = self.0.take() {
            slot.await_head();
        }
    }
}

struct TrackedBody {
    inner: Body,
    _done: ResponseDone,
}

impl HttpBody for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A TCP stream whose writes fail with `TimedOut` after making no progress for `limit`: a client that
/// stops reading a download cannot hold its connection (and our read buffers) forever.
#[derive(Debug)]
pub struct WriteStallTimeout {
    inner: TcpStream,
    limit: Duration,
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl WriteStallTimeout {
    #[must_use]
    pub fn new(inner: TcpStream, limit: Duration) -> Self {
        Self {
            inner,
            limit,
            stalled: None,
        }
    }

    fn check<T>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if r.is_ready() {
            self.stalled = None;
            return r;
        }
        let limit = self.limit;
        let sleep = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        ready!(sleep.as_mut().poll(cx));
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the client stopped reading",
        )))
    }
}

impl AsyncRead for WriteStallTimeout {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for WriteStallTimeout {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.check(cx, r)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        self.check(cx, r)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.check(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    /// Over the cap, the address with the most waiters loses its longest waiter; a client that
    /// just connected from elsewhere is never the one closed.
    #[test]
    fn eviction_takes_from_the_address_with_the_most_waiters() {
        let w = HeadWaiters::new(3);
        let flood: Vec<CancellationToken> = (0..3).map(|_| CancellationToken::new()).collect();
        for t in &flood {
            w.enter(ip(9), t);
        }
        let legit = CancellationToken::new();
        let legit_ticket = w.enter(ip(1), &legit);
        assert!(flood[0].is_cancelled() && !flood[1].is_cancelled());
        assert!(!legit.is_cancelled());
        // Two each now: the tie goes to the address whose waiter waited longest (the flood's).
        let second = CancellationToken::new();
        w.enter(ip(1), &second);
        assert!(flood[1].is_cancelled());
        assert!(!legit.is_cancelled() && !second.is_cancelled());
        // Leaving frees a place: the next one closes nobody.
        w.leave(ip(1), legit_ticket);
        let third = CancellationToken::new();
        w.enter(ip(2), &third);
        assert!(!flood[2].is_cancelled() && !second.is_cancelled() && !third.is_cancelled());
        // One waiter per address: the oldest of all goes.
        let fourth = CancellationToken::new();
        w.enter(ip(3), &fourth);
        assert!(flood[2].is_cancelled());
        assert!(!second.is_cancelled() && !third.is_cancelled() && !fourth.is_cancelled());
    }
}
