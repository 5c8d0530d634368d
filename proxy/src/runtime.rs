//! The runtime snapshot a request uses from start to end: routes, pools with
//! their selectors, and the servers each pool may use (bound to their live
//! state). Built fully off the hot path, then swapped in whole.

use crate::balance::{Load, Select, Selector};
use crate::config::{Config, Pool};
use crate::state::{Live, ServerState};
use kp5_shared::wire::ServerRecord;
use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

/// A server as one pool sees it.
#[derive(Debug)]
pub struct Upstream {
    pub state: Arc<ServerState>,
    pub address: http::uri::Authority,
    pub weight: u32,
    pub max_connections: u64,
    pub max_matches: u64,
    /// Registered by an agent rather than listed in the config.
    pub discovered: bool,
}

impl Load for Upstream {
    #[inline]
    fn connections(&self) -> u64 {
        self.state.cluster_connections()
    }
    #[inline]
    fn matches(&self) -> u64 {
        self.state.cluster_matches()
    }
    #[inline]
    fn weight(&self) -> u32 {
        self.weight
    }
    fn capacity_permille(&self) -> u32 {
        let c = self.connections().min(self.max_connections);
        (((self.max_connections - c) * 1000) / self.max_connections) as u32
    }
}

/// A pool ready to choose servers.
#[derive(Debug)]
pub struct PoolRuntime {
    pub cfg: Arc<Pool>,
    pub name: Arc<str>,
    pub servers: Vec<Upstream>,
    pub selector: Selector,
    by_id: HashMap<Arc<str>, usize>,
}

impl PoolRuntime {
    pub fn find(&self, id: &str) -> Option<&Upstream> {
        self.by_id.get(id).map(|&i| &self.servers[i])
    }

    /// May `u` take one more connection?
    #[inline]
    pub fn has_room(&self, u: &Upstream) -> bool {
        u.connections() < u.max_connections
    }

    /// May `u` take a new match (besides room for the connection)?
    #[inline]
    pub fn takes_new_match(&self, u: &Upstream) -> bool {
        u.matches() < u.max_matches
    }

    /// The servers that may take a new connection (and match) now.
    pub fn eligible(&self, u: &Upstream, now: u64, new_match: bool) -> bool {
        u.state.available(now, &self.cfg.passive)
            && self.has_room(u)
            && (!new_match || self.takes_new_match(u))
    }

    /// Chooses a server for a new connection (or a new match).
    pub fn pick(&self, now: u64, new_match: bool) -> Option<&Upstream> {
        let servers = &self.servers;
        let i = self
            .selector
            .select(servers, &mut |i| self.eligible(&servers[i], now, new_match))?;
        let u = &servers[i];
        u.state.selections.fetch_add(1, Relaxed);
        Some(u)
    }
}

/// One complete, swappable runtime.
#[derive(Debug)]
pub struct Runtime {
    pub config: Arc<Config>,
    pub pools: Vec<PoolRuntime>,
    /// (host, prefix, pool index), most specific first.
    routes: Vec<(Option<String>, String, usize)>,
}

impl Runtime {
    /// Builds the runtime of `config`, adding to each pool with
    /// `discover = true` the servers agents registered for it (a static
    /// backend of the same id wins).
    pub fn build(config: Arc<Config>, live: &Live, discovered: &[ServerRecord]) -> Runtime {
        let pools: Vec<PoolRuntime> = config
            .pools
            .iter()
            .map(|p| {
                let mut servers: Vec<Upstream> = p
                    .backends
                    .iter()
                    .map(|b| Upstream {
                        state: live.get_or_create(&b.id),
                        address: b.address.clone(),
                        weight: b.weight,
                        max_connections: p.max_connections_per_server,
                        max_matches: p.max_matches_per_server,
                        discovered: false,
                    })
                    .collect();
                if p.discover {
                    for r in discovered.iter().filter(|r| r.pool == p.name) {
                        if p.backends.iter().any(|b| b.id == r.id) {
                            continue;
                        }
                        let Ok(address) = r.address.parse::<http::uri::Authority>() else {
                            tracing::warn!(server = %r.id, address = %r.address, "registered address is not host:port; ignored");
                            continue;
                        };
                        servers.push(Upstream {
                            state: live.get_or_create(&r.id),
                            address,
                            weight: r.weight.max(1),
                            max_connections: r
                                .max_connections
                                .map_or(p.max_connections_per_server, |m| {
                                    m.min(p.max_connections_per_server)
                                }),
                            max_matches: r.max_matches.map_or(p.max_matches_per_server, |m| {
                                m.min(p.max_matches_per_server)
                            }),
                            discovered: true,
                        });
                    }
                }
                let by_id = servers
                    .iter()
                    .enumerate()
                    .map(|(i, u)| (u.state.id.clone(), i))
                    .collect();
                PoolRuntime {
                    cfg: p.clone(),
                    name: Arc::from(p.name.as_str()),
                    selector: Selector::new(p.strategy),
                    servers,
                    by_id,
                }
            })
            .collect();
        let routes = config
            .routes
            .iter()
            .filter_map(|r| {
                let i = pools.iter().position(|p| *p.name == r.pool)?;
                Some((r.host.clone(), r.path_prefix.clone(), i))
            })
            .collect();
        Runtime {
            config,
            pools,
            routes,
        }
    }

    /// The pool for a request: longest matching prefix, host-specific first.
    pub fn route(&self, host: Option<&str>, path: &str) -> Option<&PoolRuntime> {
        self.routes
            .iter()
            .find(|(h, prefix, _)| {
                path.starts_with(prefix.as_str())
                    && h.as_deref()
                        .is_none_or(|h| host.is_some_and(|x| x.eq_ignore_ascii_case(h)))
            })
            .map(|&(_, _, i)| &self.pools[i])
    }

    /// Every server id this runtime uses.
    pub fn server_ids(&self) -> impl Iterator<Item = &str> {
        self.pools
            .iter()
            .flat_map(|p| p.servers.iter().map(|u| &*u.state.id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kp5_shared::MapEnv;

    #[test]
    fn routes_by_host_and_longest_prefix() {
        let cfg = Config::from_toml(
            r#"
[proxy]
listen = ["127.0.0.1:0"]
[[routes]]
path_prefix = "/"
pool = "a"
[[routes]]
path_prefix = "/api/"
pool = "b"
[[routes]]
path_prefix = "/"
host = "play.example"
pool = "b"
[pools.a]
backends = [{ id = "a1", address = "127.0.0.1:1" }]
[pools.b]
backends = [{ id = "b1", address = "127.0.0.1:2" }]
"#,
            &MapEnv::new(),
        )
        .unwrap();
        let rt = Runtime::build(Arc::new(cfg), &Live::default(), &[]);
        assert_eq!(&*rt.route(None, "/x").unwrap().name, "a");
        assert_eq!(&*rt.route(None, "/api/x").unwrap().name, "b");
        assert_eq!(&*rt.route(Some("PLAY.example"), "/x").unwrap().name, "b");
        assert!(rt.pools[0].find("a1").is_some());
        assert!(rt.pools[0].find("b1").is_none());
    }
}
