//! Match affinity: the first connection of a match is placed by the pool's
//! strategy, and every later one goes to the same server. A match ends when
//! its last connection closed and the pool's grace period passed; a match
//! whose server died is moved, once, on its next connection.

use crate::clock::Clock;
use crate::state::ServerState;
use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};

/// What the caller thinks of a match's current server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existing {
    /// Send the connection there.
    Use,
    /// Alive but at its connection limit: refuse, do not move the match.
    Full,
    /// Dead or gone from the config: move the match.
    Gone,
}

/// The result of placing one connection of a match.
#[derive(Debug)]
pub enum Placement {
    Placed(MatchLease),
    /// The match's server is full.
    Full,
    /// No server can take a new match.
    NoServer,
}

/// A match this proxy holds, as [`Affinity::held`] lists it.
#[derive(Debug, Clone)]
pub struct Held {
    pub pool: Arc<str>,
    pub id: Box<str>,
    pub server: Arc<str>,
    /// 0: placed without Redis, not written there yet.
    pub token: u64,
}

/// What a lookup found for one connection of a match (cluster mode).
#[derive(Debug)]
pub enum Hold {
    /// The known owner takes it: the lease is counted.
    Use(MatchLease),
    /// The owner is alive but at its connection limit.
    Full,
    /// This proxy knows no owner.
    Missing,
    /// The owner known here (with this fencing token) is dead or gone.
    Gone { token: u64 },
}

#[derive(Debug)]
struct Entry {
    server: Arc<ServerState>,
    active: u32,
    idle_since: u64,
    grace_ms: u64,
    /// Fencing token of the Redis claim; 0 when placed without Redis.
    token: u64,
}

impl Entry {
    /// A new match with its first connection, counted on its server.
    fn first(server: &Arc<ServerState>, grace_ms: u64, token: u64) -> Entry {
        server.matches.fetch_add(1, Relaxed);
        Entry {
            server: server.clone(),
            active: 1,
            idle_since: 0,
            grace_ms,
            token,
        }
    }

    /// Points the entry at another server, moving the match count.
    fn move_to(&mut self, next: &Arc<ServerState>) {
        if !Arc::ptr_eq(&self.server, next) {
            self.server.matches.fetch_sub(1, Relaxed);
            next.matches.fetch_add(1, Relaxed);
            self.server = next.clone();
        }
    }
}

type Table = HashMap<Arc<str>, HashMap<Box<str>, Entry>>;

/// Match id → server, per pool.
#[derive(Debug, Default)]
pub struct Affinity {
    clock: Clock,
    table: Mutex<Table>,
}

impl Affinity {
    pub fn new(clock: Clock) -> Self {
        Affinity {
            clock,
            table: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Places one connection of match `id`. `check` judges the current owner;
    /// `pick` chooses a server for a new (or moved) match.
    pub fn place(
        self: &Arc<Self>,
        pool: &Arc<str>,
        id: &str,
        grace_ms: u64,
        check: impl Fn(&ServerState) -> Existing,
        pick: impl FnOnce() -> Option<Arc<ServerState>>,
    ) -> Placement {
        let mut table = self.lock();
        let matches = match table.get_mut(&**pool) {
            Some(m) => m,
            None => table.entry(pool.clone()).or_default(),
        };
        let server = match matches.get_mut(id) {
            Some(e) => match check(&e.server) {
                Existing::Use => {
                    e.active += 1;
                    e.server.clone()
                }
                Existing::Full => return Placement::Full,
                Existing::Gone => {
                    let Some(next) = pick() else {
                        return Placement::NoServer;
                    };
                    tracing::info!(match_id = id, from = %e.server.id, to = %next.id, "match moved");
                    e.move_to(&next);
                    e.active += 1;
                    e.grace_ms = grace_ms;
                    next
                }
            },
            None => {
                let Some(server) = pick() else {
                    return Placement::NoServer;
                };
                matches.insert(id.into(), Entry::first(&server, grace_ms, 0));
                server
            }
        };
        Placement::Placed(self.lease(pool, id, server, 0))
    }

    fn lease(
        self: &Arc<Self>,
        pool: &Arc<str>,
        id: &str,
        server: Arc<ServerState>,
        token: u64,
    ) -> MatchLease {
        MatchLease {
            affinity: self.clone(),
            pool: pool.clone(),
            id: id.into(),
            server,
            token,
        }
    }

    /// Cluster mode, step one: use the owner this proxy knows, if `check`
    /// accepts it; otherwise say what is missing.
    pub fn hold(
        self: &Arc<Self>,
        pool: &Arc<str>,
        id: &str,
        check: impl Fn(&ServerState) -> Existing,
    ) -> Hold {
        let mut table = self.lock();
        let Some(e) = table.get_mut(&**pool).and_then(|m| m.get_mut(id)) else {
            return Hold::Missing;
        };
        match check(&e.server) {
            Existing::Use => {
                e.active += 1;
                let (server, token) = (e.server.clone(), e.token);
                drop(table);
                Hold::Use(self.lease(pool, id, server, token))
            }
            Existing::Full => Hold::Full,
            Existing::Gone => Hold::Gone { token: e.token },
        }
    }

    /// Cluster mode, step two: record the owner Redis settled on (or the
    /// one rendezvous hashing chose, with token 0) and count the connection.
    /// A newer token already known here wins over an older one.
    pub fn adopt(
        self: &Arc<Self>,
        pool: &Arc<str>,
        id: &str,
        server: Arc<ServerState>,
        token: u64,
        grace_ms: u64,
    ) -> MatchLease {
        let mut table = self.lock();
        let matches = match table.get_mut(&**pool) {
            Some(m) => m,
            None => table.entry(pool.clone()).or_default(),
        };
        let (server, token) = match matches.get_mut(id) {
            Some(e) => {
                if token >= e.token {
                    if !Arc::ptr_eq(&e.server, &server) {
                        tracing::info!(match_id = id, from = %e.server.id, to = %server.id, token, "match moved");
                    }
                    e.move_to(&server);
                    e.token = token;
                }
                e.active += 1;
                e.grace_ms = grace_ms;
                (e.server.clone(), e.token)
            }
            None => {
                matches.insert(id.into(), Entry::first(&server, grace_ms, token));
                (server, token)
            }
        };
        drop(table);
        self.lease(pool, id, server, token)
    }

    /// Another proxy (or this one's refresher) settled the owner of a match
    /// with a newer token: later connections follow it. Unknown matches are
    /// not added.
    pub fn learn(&self, pool: &str, id: &str, server: &Arc<ServerState>, token: u64) {
        let mut table = self.lock();
        if let Some(e) = table.get_mut(pool).and_then(|m| m.get_mut(id)) {
            if token > e.token || (token == e.token && Arc::ptr_eq(&e.server, server)) {
                e.move_to(server);
                e.token = token;
            }
        }
    }

    /// The match ended (its agent released it): forget its owner unless
    /// this proxy still holds connections of it. True when forgotten.
    pub fn forget(&self, pool: &str, id: &str) -> bool {
        let mut table = self.lock();
        let Some(m) = table.get_mut(pool) else {
            return false;
        };
        if m.get(id).is_some_and(|e| e.active == 0) {
            if let Some(e) = m.remove(id) {
                e.server.matches.fetch_sub(1, Relaxed);
                return true;
            }
        }
        false
    }

    /// Matches whose Redis assignment this proxy must keep alive (open
    /// connections) or still has to write (placed while Redis was away).
    pub fn held(&self) -> Vec<Held> {
        let table = self.lock();
        table
            .iter()
            .flat_map(|(pool, m)| {
                m.iter()
                    .filter(|(_, e)| e.active > 0 || e.token == 0)
                    .map(|(id, e)| Held {
                        pool: pool.clone(),
                        id: id.clone(),
                        server: e.server.id.clone(),
                        token: e.token,
                    })
            })
            .collect()
    }

    fn release(&self, pool: &str, id: &str) {
        let now = self.clock.now_ms();
        let mut table = self.lock();
        let Some(matches) = table.get_mut(pool) else {
            return;
        };
        let Some(e) = matches.get_mut(id) else { return };
        e.active = e.active.saturating_sub(1);
        if e.active == 0 {
            if e.grace_ms == 0 {
                e.server.matches.fetch_sub(1, Relaxed);
                matches.remove(id);
            } else {
                e.idle_since = now;
            }
        }
    }

    /// Ends every match idle past its grace period; returns how many.
    pub fn sweep(&self, now: u64) -> usize {
        let mut ended = 0;
        let mut table = self.lock();
        for matches in table.values_mut() {
            matches.retain(|_, e| {
                let keep = e.active > 0 || now < e.idle_since + e.grace_ms;
                if !keep {
                    e.server.matches.fetch_sub(1, Relaxed);
                    ended += 1;
                }
                keep
            });
        }
        table.retain(|_, m| !m.is_empty());
        ended
    }

    /// The server that owns match `id` of `pool`, if any.
    pub fn owner(&self, pool: &str, id: &str) -> Option<Arc<ServerState>> {
        self.lock().get(pool)?.get(id).map(|e| e.server.clone())
    }

    /// Number of known matches in all pools.
    pub fn len(&self) -> usize {
        self.lock().values().map(HashMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One open connection of a match; dropping it releases the connection.
#[derive(Debug)]
pub struct MatchLease {
    affinity: Arc<Affinity>,
    pool: Arc<str>,
    id: Box<str>,
    server: Arc<ServerState>,
    token: u64,
}

impl MatchLease {
    pub fn server(&self) -> &Arc<ServerState> {
        &self.server
    }

    /// Fencing token of the match's claim (0: placed without Redis).
    pub fn token(&self) -> u64 {
        self.token
    }

    pub fn match_id(&self) -> &str {
        &self.id
    }
}

impl Drop for MatchLease {
    fn drop(&mut self) {
        self.affinity.release(&self.pool, &self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (Arc<Affinity>, Arc<str>, Arc<ServerState>, Arc<ServerState>) {
        (
            Arc::new(Affinity::new(Clock::new())),
            Arc::from("pool"),
            Arc::new(ServerState::new("a")),
            Arc::new(ServerState::new("b")),
        )
    }

    fn placed(p: Placement) -> MatchLease {
        match p {
            Placement::Placed(l) => l,
            other => panic!("not placed: {other:?}"),
        }
    }

    #[test]
    fn later_connections_follow_the_first() {
        let (aff, pool, a, b) = setup();
        let l1 = placed(aff.place(&pool, "42", 1000, |_| Existing::Use, || Some(a.clone())));
        let l2 = placed(aff.place(&pool, "42", 1000, |_| Existing::Use, || Some(b.clone())));
        assert_eq!(l2.server().id, a.id);
        assert_eq!(a.matches.load(Relaxed), 1);
        assert_eq!(b.matches.load(Relaxed), 0);
        drop((l1, l2));
        // within grace: still owned
        assert_eq!(aff.sweep(Clock::new().now_ms()), 0);
        assert_eq!(aff.owner("pool", "42").unwrap().id, a.id);
        // after grace: ended
        assert_eq!(aff.sweep(u64::MAX / 2), 1);
        assert_eq!(a.matches.load(Relaxed), 0);
        assert!(aff.is_empty());
    }

    #[test]
    fn dead_owner_moves_once_and_full_owner_refuses() {
        let (aff, pool, a, b) = setup();
        let _l = placed(aff.place(&pool, "7", 0, |_| Existing::Use, || Some(a.clone())));
        assert!(matches!(
            aff.place(&pool, "7", 0, |_| Existing::Full, || Some(b.clone())),
            Placement::Full
        ));
        let moved = placed(aff.place(
            &pool,
            "7",
            0,
            |s| {
                if s.id == a.id {
                    Existing::Gone
                } else {
                    Existing::Use
                }
            },
            || Some(b.clone()),
        ));
        assert_eq!(moved.server().id, b.id);
        assert_eq!((a.matches.load(Relaxed), b.matches.load(Relaxed)), (0, 1));
        assert!(matches!(
            aff.place(&pool, "8", 0, |_| Existing::Use, || None),
            Placement::NoServer
        ));
    }

    #[test]
    fn adopt_keeps_the_newest_token_and_learn_moves_known_matches() {
        let (aff, pool, a, b) = setup();
        let l1 = aff.adopt(&pool, "9", a.clone(), 5, 1000);
        // an older answer arriving late does not move the match back
        let l2 = aff.adopt(&pool, "9", b.clone(), 4, 1000);
        assert_eq!(
            (l1.server().id.clone(), l2.server().id.clone()),
            (a.id.clone(), a.id.clone())
        );
        assert_eq!(l2.token(), 5);
        assert!(matches!(
            aff.hold(&pool, "9", |_| Existing::Gone),
            Hold::Gone { token: 5 }
        ));
        aff.learn("pool", "9", &b, 6);
        let Hold::Use(l3) = aff.hold(&pool, "9", |_| Existing::Use) else {
            panic!()
        };
        assert_eq!((&*l3.server().id, l3.token()), ("b", 6));
        assert_eq!((a.matches.load(Relaxed), b.matches.load(Relaxed)), (0, 1));
        aff.learn("pool", "unknown", &b, 1);
        assert!(matches!(
            aff.hold(&pool, "unknown", |_| Existing::Use),
            Hold::Missing
        ));
        assert_eq!(aff.held().len(), 1);
    }

    #[test]
    fn zero_grace_ends_on_last_close() {
        let (aff, pool, a, _) = setup();
        let l = placed(aff.place(&pool, "1", 0, |_| Existing::Use, || Some(a.clone())));
        assert_eq!(a.matches.load(Relaxed), 1);
        drop(l);
        assert_eq!(a.matches.load(Relaxed), 0);
        assert!(aff.is_empty());
    }
}
