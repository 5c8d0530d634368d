//! Opening Redis the same way in both binaries: a lazy connection manager
//! (so a process starts while Redis is down), RESP3 (so pub/sub shares the
//! connection and is resubscribed after every reconnect), bounded timeouts
//! (so a hung Redis never holds traffic), and reconnects with back-off.

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{IntoConnectionInfo, ProtocolVersion, PushInfo};
use std::time::Duration;

/// Where and how to reach Redis.
#[derive(Debug, Clone)]
pub struct RedisTarget {
    pub url: String,
    pub password: Option<String>,
    pub db: Option<u32>,
    /// Per-command response timeout.
    pub timeout: Duration,
}

impl RedisTarget {
    /// The URL without any password, for logs and status pages.
    pub fn redacted_url(&self) -> String {
        redact(&self.url)
    }
}

/// Checks a Redis URL's scheme (the client checks the rest on connect).
pub fn check_url(url: &str) -> Result<(), String> {
    const SCHEMES: [&str; 4] = ["redis://", "rediss://", "redis+unix://", "unix://"];
    if SCHEMES.iter().any(|s| url.starts_with(s)) {
        Ok(())
    } else {
        Err("must start with redis://, rediss:// or unix://".into())
    }
}

/// Checks a key prefix: braces would break the Cluster hash tags.
pub fn check_key_prefix(prefix: &str) -> Result<(), String> {
    if prefix.is_empty() || prefix.contains(['{', '}', ' ']) {
        Err(format!(
            "{prefix:?} must be non-empty, without braces or spaces"
        ))
    } else {
        Ok(())
    }
}

/// `redis://user:secret@host` → `redis://user:***@host`.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.split_once('@') {
        Some((cred, host)) => match cred.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
            None => format!("{scheme}://***@{host}"),
        },
        None => url.to_owned(),
    }
}

/// A client for `target` (RESP3, password and db applied), for callers that
/// need connections of their own (blocking stream reads).
pub fn client(target: &RedisTarget) -> redis::RedisResult<redis::Client> {
    let mut info = target.url.as_str().into_connection_info()?;
    let mut settings = info.redis_settings().clone();
    if let Some(pw) = &target.password {
        settings = settings.set_password(pw);
    }
    if let Some(db) = target.db {
        settings = settings.set_db(db as i64);
    }
    settings = settings.set_protocol(ProtocolVersion::RESP3);
    info = info.set_redis_settings(settings);
    redis::Client::open(info)
}

/// Opens a lazy connection manager. `push` receives pub/sub messages and
/// disconnect notices when given.
pub fn connect(
    target: &RedisTarget,
    push: Option<tokio::sync::mpsc::UnboundedSender<PushInfo>>,
) -> redis::RedisResult<ConnectionManager> {
    let client = client(target)?;
    let mut cfg = ConnectionManagerConfig::new()
        .set_min_delay(Duration::from_millis(50))
        .set_max_delay(Duration::from_secs(2))
        .set_number_of_retries(3)
        .set_response_timeout(Some(target.timeout))
        .set_connection_timeout(Some(target.timeout));
    if let Some(tx) = push {
        cfg = cfg.set_push_sender(tx).set_automatic_resubscription();
    }
    ConnectionManager::new_lazy_with_config(client, cfg)
}

#[cfg(test)]
mod tests {
    #[test]
    fn redacts_passwords() {
        assert_eq!(super::redact("redis://:pw@h:1/0"), "redis://:***@h:1/0");
        assert_eq!(super::redact("redis://u:pw@h"), "redis://u:***@h");
        assert_eq!(super::redact("redis://h:6379"), "redis://h:6379");
    }
}
