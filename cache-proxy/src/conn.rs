//! The connection layer: accepts TCP connections under a limit and serves HTTP/1.1 on each, bounding
//! what a slow, oversized or flooding client can cost (header read timeout, header size, write stalls,
//! and the share of slots held by connections that have not sent a request head yet).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
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
/// is closed. A legitimate client sends its head within milliseconds, so the oldest waiter is a
/// dribbler (issue 16: slow headers without a URL held every slot).
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
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
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
        let slot = Arc::new(ConnSlot::new(waiters.clone()));
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

/// Connections waiting for a request head, oldest first, at most `cap` of them.
#[derive(Debug)]
struct HeadWaiters {
    cap: usize,
    /// Ticket (increasing, so the first is the oldest) → how to close that connection.
    waiting: Mutex<(u64, BTreeMap<u64, CancellationToken>)>,
}

impl HeadWaiters {
    fn new(cap: usize) -> Self {
        Self {
            cap: cap.max(1),
            waiting: Mutex::new((0, BTreeMap::new())),
        }
    }

    /// Add a waiter; closes the oldest ones while over `cap`. Returns its ticket.
    fn enter(&self, evict: &CancellationToken) -> u64 {
        let mut guard = self.waiting.lock().expect("head waiters lock");
        let (next, waiting) = &mut *guard;
        let ticket = *next;
        *next += 1;
        waiting.insert(ticket, evict.clone());
        while waiting.len() > self.cap {
            if let Some((_, oldest)) = waiting.pop_first() {
                oldest.cancel();
            }
        }
        ticket
    }

    fn leave(&self, ticket: u64) {
        self.waiting
            .lock()
            .expect("head waiters lock")
            .1
            .remove(&ticket);
    }
}

/// One connection's place among the head waiters.
#[derive(Debug)]
struct ConnSlot {
    waiters: Arc<HeadWaiters>,
    ticket: Mutex<Option<u64>>,
    evict: CancellationToken,
}

impl ConnSlot {
    fn new(waiters: Arc<HeadWaiters>) -> Self {
        Self {
            waiters,
            ticket: Mutex::new(None),
            evict: CancellationToken::new(),
        }
    }

    /// The connection now waits for a request head (new, or done with its last response).
    fn await_head(&self) {
        let mut t = self.ticket.lock().expect("slot lock");
        if t.is_none() {
            *t = Some(self.waiters.enter(&self.evict));
        }
    }

    /// A request head arrived (or the connection ended).
    fn head_arrived(&self) {
        if let Some(ticket) = self.ticket.lock().expect("slot lock").take() {
            self.waiters.leave(ticket);
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
