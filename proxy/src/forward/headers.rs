//! Header rewriting at the proxy boundary: hop-by-hop headers go (RFC 9110
//! §7.6.1), the forwarding headers are added, `Host` stays as the client sent it.

use crate::config::ForwardedHeaders;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use std::net::IpAddr;

static HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Removes hop-by-hop headers and any header the `Connection` header names.
/// `Upgrade` is removed too unless `keep_upgrade`.
pub fn strip_hop_by_hop(h: &mut HeaderMap, keep_upgrade: bool) {
    // most messages carry none: one pass over the names, not ten lookups
    let hop = |n: &HeaderName| HOP_BY_HOP.contains(n) || (!keep_upgrade && n == header::UPGRADE);
    if !h.keys().any(hop) {
        return;
    }
    if let Some(conn) = h.get(header::CONNECTION) {
        if conn.as_bytes().contains(&b',') || !conn.as_bytes().eq_ignore_ascii_case(b"keep-alive") {
            let named: Vec<HeaderName> = h
                .get_all(header::CONNECTION)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
                .filter(|n| !(keep_upgrade && n == header::UPGRADE))
                .collect();
            for n in named {
                h.remove(n);
            }
        }
    }
    for n in &HOP_BY_HOP {
        h.remove(n);
    }
    if !keep_upgrade {
        h.remove(header::UPGRADE);
    }
}

/// Is this an HTTP/1.1 upgrade request (WebSocket or another protocol)?
pub fn is_upgrade(h: &HeaderMap) -> bool {
    h.contains_key(header::UPGRADE)
        && h.get_all(header::CONNECTION).iter().any(|v| {
            v.to_str().is_ok_and(|s| {
                s.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
        })
}

pub fn is_websocket(h: &HeaderMap) -> bool {
    h.get(header::UPGRADE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"))
}

static XFF: HeaderName = HeaderName::from_static("x-forwarded-for");
static XFP: HeaderName = HeaderName::from_static("x-forwarded-proto");
static XFH: HeaderName = HeaderName::from_static("x-forwarded-host");
static XRI: HeaderName = HeaderName::from_static("x-real-ip");

/// A client address in the forms the forwarding headers write it.
#[derive(Debug, Clone)]
pub struct Client {
    ip: IpAddr,
    /// `X-Forwarded-For` and `X-Real-IP`: the bare address
    value: HeaderValue,
    /// `Forwarded`: `for=` with IPv6 quoted and bracketed (RFC 7239 §6)
    node: String,
}

impl Client {
    pub fn new(ip: IpAddr) -> Client {
        let text = ip.to_string();
        let node = match ip {
            IpAddr::V4(_) => text.clone(),
            IpAddr::V6(_) => format!("\"[{text}]\""),
        };
        let value = owned_value(text).expect("an IP address is a valid header value");
        // a Bytes made from a Vec allocates on its first clone; clone once
        // here so each request's clone only counts a reference
        let _ = value.clone();
        Client { ip, value, node }
    }
}

/// Adds the forwarding headers `which` names: `X-Forwarded-For` and
/// `Forwarded` (RFC 7239) append to what earlier proxies wrote,
/// `X-Forwarded-Proto/-Host` and `X-Real-IP` replace it. The host is the
/// request's `Host`.
pub fn add_forwarded(
    h: &mut HeaderMap,
    which: ForwardedHeaders,
    client: &Client,
    proto: &'static str,
) {
    if which == ForwardedHeaders::default() {
        return;
    }
    if which.x_forwarded_for {
        let xff = match h.get(&XFF).and_then(|v| v.to_str().ok()) {
            Some(prev) => owned_value(format!("{prev}, {}", client.ip)).ok(),
            None => Some(client.value.clone()),
        };
        if let Some(v) = xff {
            h.insert(&XFF, v);
        }
    }
    if which.x_real_ip {
        h.insert(&XRI, client.value.clone());
    }
    if which.x_forwarded_proto {
        h.insert(&XFP, HeaderValue::from_static(proto));
    }
    if !(which.x_forwarded_host || which.forwarded) {
        return;
    }
    let host = h.get(header::HOST).cloned();
    if let (true, Some(host)) = (which.x_forwarded_host, &host) {
        h.insert(&XFH, host.clone());
    }
    if !which.forwarded {
        return;
    }
    let mut fwd = String::with_capacity(64);
    if let Some(prev) = h.get(header::FORWARDED).and_then(|v| v.to_str().ok()) {
        fwd.push_str(prev);
        fwd.push_str(", ");
    }
    fwd.push_str("for=");
    fwd.push_str(&client.node);
    fwd.push_str(";proto=");
    fwd.push_str(proto);
    if let Some(host) = host.as_ref().and_then(|v| v.to_str().ok()) {
        fwd.push_str(";host=\"");
        fwd.push_str(host);
        fwd.push('"');
    }
    if let Ok(v) = owned_value(fwd) {
        h.insert(header::FORWARDED, v);
    }
}

/// A header value that takes the string's buffer instead of copying it.
fn owned_value(s: String) -> Result<HeaderValue, http::header::InvalidHeaderValue> {
    HeaderValue::from_maybe_shared(bytes::Bytes::from(s))
}

/// The value of cookie `name` in the request's `Cookie` headers.
pub fn cookie<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|kv| {
            let (k, v) = kv.trim().split_once('=')?;
            (k == name).then(|| v.trim_matches('"'))
        })
}

/// Writes one header field as HTTP/1.1 puts it on the wire.
pub fn write_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Where a parsed header's name and value lie in their head, as byte
/// offsets: the head can be frozen before the values are cut from it.
/// (A head is at most a few dozen KiB: 32 bits suffice.)
pub type FieldSpan = [[u32; 2]; 2];

/// Where `part` lies in `head`, which it was parsed from.
pub fn offsets(head: &[u8], part: &[u8]) -> [u32; 2] {
    let start = part.as_ptr() as usize - head.as_ptr() as usize;
    [start as u32, (start + part.len()) as u32]
}

/// The byte range of an offset pair.
pub fn range([a, b]: [u32; 2]) -> std::ops::Range<usize> {
    a as usize..b as usize
}

/// The header map of a frozen head: the names parsed, the values sliced
/// from the head (no copy). Err: what is wrong, for the error message.
pub fn header_map(head: &Bytes, fields: &[FieldSpan]) -> Result<HeaderMap, String> {
    let mut headers = HeaderMap::with_capacity(fields.len());
    for &[name, value] in fields {
        let name = HeaderName::from_bytes(&head[range(name)]).map_err(|_| {
            format!(
                "invalid header name {:?}",
                String::from_utf8_lossy(&head[range(name)])
            )
        })?;
        let value = HeaderValue::from_maybe_shared(head.slice(range(value)))
            .map_err(|_| format!("invalid value of header {name}"))?;
        headers.append(name, value);
    }
    Ok(headers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_hop_by_hop_and_connection_named() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            "keep-alive, x-secret, Upgrade".parse().unwrap(),
        );
        h.insert("x-secret", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert(header::TRANSFER_ENCODING, "chunked".parse().unwrap());
        h.insert(header::UPGRADE, "websocket".parse().unwrap());
        h.insert(header::HOST, "a".parse().unwrap());
        assert!(is_upgrade(&h) && is_websocket(&h));
        let mut up = h.clone();
        strip_hop_by_hop(&mut up, true);
        assert!(up.contains_key(header::UPGRADE) && !up.contains_key("x-secret"));
        strip_hop_by_hop(&mut h, false);
        let names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["host"]);
    }

    #[test]
    fn forwarded_headers_append() {
        let mut h = HeaderMap::new();
        h.insert(&XFF, "10.0.0.1".parse().unwrap());
        h.insert(header::HOST, HeaderValue::from_static("play.example"));
        h.insert(&XRI, "10.0.0.1".parse().unwrap());
        let all = ForwardedHeaders {
            x_forwarded_for: true,
            x_forwarded_proto: true,
            x_forwarded_host: true,
            forwarded: true,
            x_real_ip: true,
        };
        let ip = Client::new("::1".parse().unwrap());
        add_forwarded(&mut h, all, &ip, "http");
        assert_eq!(h[&XFF], "10.0.0.1, ::1");
        assert_eq!(
            h[&XRI], "::1",
            "X-Real-IP is the peer, as nginx's $remote_addr"
        );
        assert_eq!(h[&XFP], "http");
        assert_eq!(h[&XFH], "play.example");
        assert_eq!(
            h[header::FORWARDED],
            "for=\"[::1]\";proto=http;host=\"play.example\""
        );
    }

    #[test]
    fn only_the_chosen_forwarding_headers_are_added() {
        let ip = Client::new("10.1.2.3".parse().unwrap());
        let mut none = HeaderMap::new();
        add_forwarded(&mut none, ForwardedHeaders::default(), &ip, "https");
        assert!(none.is_empty());
        let mut h = HeaderMap::new();
        let nginx_like = ForwardedHeaders {
            x_forwarded_for: true,
            x_real_ip: true,
            ..Default::default()
        };
        add_forwarded(&mut h, nginx_like, &ip, "https");
        let mut names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        names.sort();
        assert_eq!(names, ["x-forwarded-for", "x-real-ip"]);
        assert_eq!(h[&XRI], "10.1.2.3");
    }

    #[test]
    fn finds_cookie() {
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, "a=1; kp5_srv=server-2".parse().unwrap());
        assert_eq!(cookie(&h, "kp5_srv"), Some("server-2"));
        assert_eq!(cookie(&h, "b"), None);
    }
}
