//! The runtime snapshot a request uses from start to end: routes, pools with
//! their selectors, and the servers each pool may use (bound to their live
//! state). Built fully off the hot path, then swapped in whole.

use crate::balance::{Load, Select, Selector};
use crate::config::{Config, Pool};
use crate::state::{Live, ServerState};
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
}

impl Load for Upstream {
    #[inline]
    fn connections(&self) -> u64 {
        self.state.connections.load(Relaxed)
    }
    #[inline]
    fn matches(&self) -> u64 {
        self.state.matches.load(Relaxed)
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
        u.state.connections.load(Relaxed) < self.cfg.max_connections_per_server
    }

    /// Chooses a server for a new connection (or a new match).
    pub fn pick(&self, now: u64, new_match: bool) -> Option<&Upstream> {
        let cfg = &*self.cfg;
        let servers = &self.servers;
        let i = self.selector.select(servers, &mut |i| {
            let u = &servers[i];
            u.state.available(now, &cfg.passive)
                && self.has_room(u)
                && (!new_match || u.state.matches.load(Relaxed) < cfg.max_matches_per_server)
        })?;
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
    pub fn build(config: Arc<Config>, live: &Live) -> Runtime {
        let pools: Vec<PoolRuntime> = config
            .pools
            .iter()
            .map(|p| {
                let servers: Vec<Upstream> = p
                    .backends
                    .iter()
                    .map(|b| Upstream {
                        state: live.get_or_create(&b.id),
                        address: b.address.clone(),
                        weight: b.weight,
                        max_connections: p.max_connections_per_server,
                    })
                    .collect();
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
        let rt = Runtime::build(Arc::new(cfg), &Live::default());
        assert_eq!(&*rt.route(None, "/x").unwrap().name, "a");
        assert_eq!(&*rt.route(None, "/api/x").unwrap().name, "b");
        assert_eq!(&*rt.route(Some("PLAY.example"), "/x").unwrap().name, "b");
        assert!(rt.pools[0].find("a1").is_some());
        assert!(rt.pools[0].find("b1").is_none());
    }
}
