//! The atomic match claim: one Lua script on the match's own key, so it
//! works unchanged on Redis Cluster. It either returns the current owner or
//! installs the caller's candidate with a new fencing token, never both
//! for two callers.
//!
//! Tokens are `max(previous + 1, Redis time in ms)`: they only grow, even
//! when an expired or lost key starts the match again, so a match server
//! can refuse anything older than the newest token it has seen.

use kp5_shared::Keys;
use redis::aio::ConnectionManager;
use std::collections::HashMap;
use std::time::Duration;

/// The shortest TTL of an assignment key (held ones are renewed every second).
pub const MIN_TTL: Duration = Duration::from_secs(5);

/// TTL of an assignment: the pool's match grace, at least [`MIN_TTL`].
pub fn ttl(grace: Duration) -> Duration {
    grace.max(MIN_TTL)
}

const SCRIPT: &str = r#"
-- KEYS[1] match owner hash
-- ARGV: candidate ('' = only look), token to replace ('' = none),
--       ttl ms, channel, pool, match id, proxy id
local cur = redis.call('HMGET', KEYS[1], 'server', 'token')
local owner, token = cur[1], cur[2]
if owner and (ARGV[2] == '' or ARGV[2] ~= token) then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return {0, owner, token, ''}
end
if ARGV[1] == '' then
  return {0, '', '0', ''}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local next = math.max((tonumber(token) or 0) + 1, now)
local nexts = string.format('%.0f', next)
local previous = owner or ''
redis.call('HSET', KEYS[1], 'server', ARGV[1], 'token', nexts, 'previous', previous,
  'claimedAt', string.format('%.0f', now), 'proxy', ARGV[7])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PUBLISH', ARGV[4], cjson.encode({kind = 'assign', pool = ARGV[5],
  matchId = ARGV[6], server = ARGV[1], previous = previous, token = next, proxy = ARGV[7]}))
return {1, ARGV[1], nexts, previous}
"#;

/// What a claim settled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claimed {
    /// This caller's candidate was installed.
    pub won: bool,
    /// The owner now ('' when nobody owns it and no candidate was given).
    pub server: String,
    pub token: u64,
    /// The owner the win replaced ('' for a new match).
    pub previous: String,
}

/// A match's owner hash as stored in Redis.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Owner {
    pub server: String,
    pub token: u64,
    pub previous: String,
    pub claimed_at: u64,
    pub proxy: String,
}

impl Owner {
    pub fn from_hash(mut h: HashMap<String, String>) -> Option<Owner> {
        let num = |h: &HashMap<String, String>, k: &str| {
            h.get(k).and_then(|v| v.parse().ok()).unwrap_or(0)
        };
        Some(Owner {
            token: num(&h, "token"),
            claimed_at: num(&h, "claimedAt"),
            previous: h.remove("previous").unwrap_or_default(),
            proxy: h.remove("proxy").unwrap_or_default(),
            server: h.remove("server")?,
        })
    }
}

pub struct ClaimScript {
    script: redis::Script,
}

impl Default for ClaimScript {
    fn default() -> Self {
        Self::new()
    }
}

impl ClaimScript {
    pub fn new() -> Self {
        ClaimScript {
            script: redis::Script::new(SCRIPT),
        }
    }

    /// Claims match `id`: with `replace: None`, installs `candidate` only if
    /// nobody owns the match; with `replace: Some(t)`, also replaces an
    /// owner whose token is still `t` (the caller saw it dead). Otherwise
    /// returns the current owner.
    #[allow(clippy::too_many_arguments)]
    pub async fn run(
        &self,
        conn: &mut ConnectionManager,
        keys: &Keys,
        proxy: &str,
        pool: &str,
        id: &str,
        candidate: Option<&str>,
        replace: Option<u64>,
        ttl: Duration,
    ) -> redis::RedisResult<Claimed> {
        let (won, server, token, previous): (i64, String, String, String) = self
            .script
            .key(keys.match_owner(pool, id))
            .arg(candidate.unwrap_or(""))
            .arg(replace.map(|t| t.to_string()).unwrap_or_default())
            .arg(ttl.as_millis() as u64)
            .arg(keys.registry_channel())
            .arg(pool)
            .arg(id)
            .arg(proxy)
            .invoke_async(conn)
            .await?;
        Ok(Claimed {
            won: won == 1,
            server,
            token: token.parse().unwrap_or(0),
            previous,
        })
    }
}
