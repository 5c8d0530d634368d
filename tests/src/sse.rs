//! A small Server-Sent Events client for the tests: real HTTP, frames read
//! as they arrive, comments skipped.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use std::time::Duration;

/// One event.
#[derive(Debug, Clone)]
pub struct Event {
    /// `message` unless the server named it (`reload`, `end`).
    pub event: String,
    pub id: String,
    pub data: serde_json::Value,
}

impl Event {
    pub fn version(&self) -> u64 {
        self.data["version"].as_u64().unwrap_or(0)
    }
}

pub struct Sse {
    body: Incoming,
    buf: String,
}

impl Sse {
    /// Opens `url`, resuming after `last_event_id` when given.
    pub async fn connect(url: &str, last_event_id: Option<&str>) -> Sse {
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<Full<Bytes>>();
        let mut req = http::Request::get(url).header("accept", "text/event-stream");
        if let Some(id) = last_event_id {
            req = req.header("last-event-id", id);
        }
        let resp = client
            .request(req.body(Full::new(Bytes::new())).unwrap())
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e}"));
        assert_eq!(resp.status(), 200, "GET {url}");
        assert_eq!(
            resp.headers()["content-type"],
            "text/event-stream",
            "GET {url}"
        );
        Sse {
            body: resp.into_body(),
            buf: String::new(),
        }
    }

    /// The next event, or `None` if none comes within `within`.
    pub async fn next(&mut self, within: Duration) -> Option<Event> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(e) = self.take() {
                return Some(e);
            }
            let frame = tokio::time::timeout_at(deadline, self.body.frame())
                .await
                .ok()??
                .expect("event stream broke");
            if let Ok(data) = frame.into_data() {
                self.buf.push_str(&String::from_utf8_lossy(&data));
            }
        }
    }

    /// Parses one complete block from the buffer, skipping comment-only ones.
    fn take(&mut self) -> Option<Event> {
        loop {
            let end = self.buf.find("\n\n")?;
            let block: String = self.buf.drain(..end + 2).collect();
            let (mut event, mut id, mut data) =
                ("message".to_owned(), String::new(), String::new());
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event: ") {
                    event = v.to_owned();
                } else if let Some(v) = line.strip_prefix("id: ") {
                    id = v.to_owned();
                } else if let Some(v) = line.strip_prefix("data: ") {
                    data.push_str(v);
                }
            }
            if data.is_empty() {
                continue;
            }
            let data = serde_json::from_str(&data).expect("event data is JSON");
            return Some(Event { event, id, data });
        }
    }
}
