//! Finding a request's match id by the pool's rules: the first rule that
//! yields a non-empty id wins.

use crate::config::MatchRule;
use std::borrow::Cow;

/// Longest match id accepted; longer ids are ignored (no affinity).
const MAX_ID: usize = 128;

pub fn extract<'a>(
    rules: &[MatchRule],
    path: &'a str,
    query: Option<&'a str>,
    headers: &'a http::HeaderMap,
) -> Option<Cow<'a, str>> {
    rules.iter().find_map(|rule| {
        let id: Cow<'a, str> = match rule {
            MatchRule::Path { prefix, suffix } => {
                let rest = path.strip_prefix(prefix.as_str())?;
                let (seg, tail) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
                if !suffix.is_empty() && !tail.starts_with(suffix.as_str()) {
                    return None;
                }
                Cow::Borrowed(seg)
            }
            MatchRule::Query { name } => query?.split('&').find_map(|kv| {
                let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                (k == name).then(|| percent_decode(v))
            })?,
            MatchRule::Header { name } => Cow::Borrowed(headers.get(name)?.to_str().ok()?.trim()),
        };
        (!id.is_empty() && id.len() <= MAX_ID).then_some(id)
    })
}

fn percent_decode(s: &str) -> Cow<'_, str> {
    if !s.contains(['%', '+']) {
        return Cow::Borrowed(s);
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                match u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16)
                {
                    Ok(v) => {
                        out.push(v);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> Vec<MatchRule> {
        vec![
            MatchRule::Path {
                prefix: "/matches/".into(),
                suffix: String::new(),
            },
            MatchRule::Query {
                name: "matchId".into(),
            },
            MatchRule::Header {
                name: http::HeaderName::from_static("x-match-id"),
            },
        ]
    }

    #[test]
    fn first_rule_wins() {
        let mut h = http::HeaderMap::new();
        h.insert("x-match-id", " 9 ".parse().unwrap());
        let r = rules();
        assert_eq!(
            extract(&r, "/matches/42/ws", Some("matchId=7"), &h).as_deref(),
            Some("42")
        );
        assert_eq!(
            extract(&r, "/socket.io/", Some("EIO=4&matchId=m%207"), &h).as_deref(),
            Some("m 7")
        );
        assert_eq!(
            extract(&r, "/socket.io/", Some("EIO=4"), &h).as_deref(),
            Some("9")
        );
        assert_eq!(
            extract(&r, "/matches/", None, &http::HeaderMap::new()),
            None
        );
        assert_eq!(extract(&r, "/other", None, &http::HeaderMap::new()), None);
    }

    #[test]
    fn suffix_must_follow() {
        let r = vec![MatchRule::Path {
            prefix: "/m/".into(),
            suffix: "/ws".into(),
        }];
        let h = http::HeaderMap::new();
        assert_eq!(extract(&r, "/m/5/ws", None, &h).as_deref(), Some("5"));
        assert_eq!(extract(&r, "/m/5/http", None, &h), None);
        let long = format!("/m/{}/ws", "x".repeat(200));
        assert_eq!(extract(&r, &long, None, &h), None);
    }
}
