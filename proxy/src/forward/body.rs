//! Body types of the request path. Bodies are streamed frame by frame in
//! both directions, never collected.

use crate::affinity::MatchLease;
use crate::state::ConnGuard;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::Either;
use hyper::body::Incoming;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

/// A client's request body: read by hyper's server (HTTP/1.1 requests with
/// a body, TLS) or straight from an HTTP/2 stream ([`H2Body`]).
pub type ClientBody = Either<Incoming, H2Body>;

/// The body of a request on an HTTP/2 stream. Each DATA frame's bytes are
/// given back to the client's flow-control window as they are passed on,
/// so the client sends no faster than the server takes them. (`h2` checks
/// the frames against `content-length`.)
#[derive(Debug)]
pub struct H2Body {
    recv: h2::RecvStream,
    data_done: bool,
    /// The request's `content-length`, if any.
    length: Option<u64>,
}

impl H2Body {
    pub fn new(recv: h2::RecvStream, length: Option<u64>) -> H2Body {
        H2Body {
            recv,
            data_done: false,
            length,
        }
    }
}

impl Body for H2Body {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = &mut *self;
        if !this.data_done {
            match std::task::ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => this.data_done = true,
            }
        }
        match std::task::ready!(this.recv.poll_trailers(cx)) {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        match self.length {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

/// A request body that can be handed to a second server when connecting to
/// the first failed: it stays in a shared slot until the client polls it,
/// which only happens once a connection is established.
#[derive(Debug)]
pub struct UpstreamBody {
    slot: Option<Arc<Mutex<Option<ClientBody>>>>,
    body: Option<ClientBody>,
    end: bool,
    hint: SizeHint,
}

/// Holds a request body between attempts.
#[derive(Debug, Clone)]
pub struct BodySlot {
    slot: Option<Arc<Mutex<Option<ClientBody>>>>,
    end: bool,
    hint: SizeHint,
}

impl BodySlot {
    pub fn new(body: ClientBody) -> Self {
        let end = body.is_end_stream();
        let hint = body.size_hint();
        let slot = (!end).then(|| Arc::new(Mutex::new(Some(body))));
        BodySlot { slot, end, hint }
    }

    /// A request without a body.
    pub fn empty() -> Self {
        BodySlot {
            slot: None,
            end: true,
            hint: SizeHint::with_exact(0),
        }
    }

    /// A body for one attempt.
    pub fn body(&self) -> UpstreamBody {
        UpstreamBody {
            slot: self.slot.clone(),
            body: None,
            end: self.end,
            hint: self.hint,
        }
    }

    /// The request has no body at all.
    pub fn is_empty(&self) -> bool {
        self.end
    }

    /// Can another attempt still send the whole body?
    pub fn intact(&self) -> bool {
        self.slot
            .as_ref()
            .is_none_or(|s| s.lock().unwrap_or_else(|p| p.into_inner()).is_some())
    }
}

impl UpstreamBody {
    /// No body (health checks).
    pub fn empty() -> Self {
        UpstreamBody {
            slot: None,
            body: None,
            end: true,
            hint: SizeHint::with_exact(0),
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.body.is_none() {
            match this.slot.take() {
                Some(slot) => this.body = slot.lock().unwrap_or_else(|p| p.into_inner()).take(),
                None => return Poll::Ready(None),
            }
        }
        match this.body.as_mut() {
            Some(b) => Pin::new(b).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.end || self.body.as_ref().is_some_and(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        match &self.body {
            Some(b) => b.size_hint(),
            None => self.hint,
        }
    }
}

/// A response body as a server sends it: read by our own HTTP/1.1 client
/// (plain backends) or by hyper's (TLS backends, upgrades).
#[derive(Debug)]
pub enum FromServer {
    H1(super::h1::H1Body),
    Hyper(Incoming),
}

impl Body for FromServer {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            FromServer::H1(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            FromServer::Hyper(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            FromServer::H1(b) => b.is_end_stream(),
            FromServer::Hyper(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            FromServer::H1(b) => b.size_hint(),
            FromServer::Hyper(b) => b.size_hint(),
        }
    }
}

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The response body sent to the client.
#[derive(Debug)]
pub enum ProxyBody {
    /// Streamed from a server; holds the server's connection count (and the
    /// match's) until the body is done or dropped.
    Upstream {
        body: FromServer,
        guard: Option<ConnGuard>,
        lease: Option<MatchLease>,
    },
    /// Generated by the proxy.
    Full(Option<Bytes>),
}

impl ProxyBody {
    pub fn empty() -> Self {
        ProxyBody::Full(None)
    }

    pub fn text(s: impl Into<Bytes>) -> Self {
        ProxyBody::Full(Some(s.into()))
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut *self {
            ProxyBody::Upstream { body, guard, lease } => {
                let r = Pin::new(body).poll_frame(cx);
                if let Poll::Ready(None) = r {
                    // done: release the counts now rather than when hyper drops us
                    guard.take();
                    lease.take();
                }
                r
            }
            ProxyBody::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Upstream { body, .. } => body.is_end_stream(),
            ProxyBody::Full(d) => d.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Upstream { body, .. } => body.size_hint(),
            ProxyBody::Full(d) => SizeHint::with_exact(d.as_ref().map_or(0, |d| d.len() as u64)),
        }
    }
}
