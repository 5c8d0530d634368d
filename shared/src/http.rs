//! The small HTTP/1.1 servers of both binaries (the proxy's admin API, the
//! agent's local API): accept until stopped (errors logged and backed off,
//! never fatal), a header-read timeout against slow clients, and graceful
//! shutdown of open connections.

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Why a request body could not be read whole.
#[derive(Debug)]
pub enum BodyError {
    /// Over the limit (answer 413).
    TooLarge,
    /// The client broke off or sent garbage (answer 400).
    Read(String),
}

/// Reads a request body of at most `max` bytes.
pub async fn read_limited(body: Incoming, max: usize) -> Result<bytes::Bytes, BodyError> {
    use http_body_util::BodyExt;
    http_body_util::Limited::new(body, max)
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                BodyError::TooLarge
            } else {
                BodyError::Read(e.to_string())
            }
        })
}

/// Drives a served connection to its end. When `stop` fires first, asks it
/// to finish gracefully (in-flight requests complete, no new ones) and waits.
/// `graceful` is the connection type's own `graceful_shutdown`.
pub async fn until_done<C, E>(
    conn: C,
    stop: &CancellationToken,
    graceful: impl FnOnce(Pin<&mut C>),
) -> Result<(), E>
where
    C: Future<Output = Result<(), E>>,
{
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => r,
        _ = stop.cancelled() => {
            graceful(conn.as_mut());
            conn.await
        }
    }
}

/// Serves `handler` on `listener` until `stop`.
pub async fn serve<F, Fut, B>(
    listener: TcpListener,
    stop: CancellationToken,
    what: &'static str,
    handler: F,
) where
    F: Fn(hyper::Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = hyper::Response<B>> + Send + 'static,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "{what}: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => return,
        };
        let handler = handler.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let fut = handler(req);
                async move { Ok::<_, Infallible>(fut.await) }
            });
            let mut b = hyper::server::conn::http1::Builder::new();
            b.timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10));
            let conn = b.serve_connection(TokioIo::new(stream), svc);
            if let Err(e) = until_done(conn, &stop, |c| c.graceful_shutdown()).await {
                tracing::debug!(error = %e, "{what}: connection ended with an error");
            }
        });
    }
}
