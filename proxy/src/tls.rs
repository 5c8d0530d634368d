//! TLS with rustls: the certificates of `[proxy.tls]` chosen by SNI and
//! swapped when their files change (new handshakes see the new pair at once,
//! open connections keep theirs), the acceptor of the TLS listeners, and the
//! clients of pools whose servers speak TLS (`backend_tls`).

use crate::config::{BackendTls, CertFiles, Config, TlsSettings};
use crate::forward::body::UpstreamBody;
use arc_swap::{ArcSwap, ArcSwapOption};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

/// ALPN ids.
pub const H2: &[u8] = b"h2";
pub const HTTP11: &[u8] = b"http/1.1";

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// One loaded certificate/key pair.
struct Pair {
    key: Arc<CertifiedKey>,
    /// Configured names; empty: the certificate's own (checked by webpki).
    names: Vec<String>,
}

impl Pair {
    fn serves(&self, name: &str) -> bool {
        if !self.names.is_empty() {
            return self.names.iter().any(|n| match n.strip_prefix("*.") {
                Some(domain) => name
                    .split_once('.')
                    .is_some_and(|(label, rest)| !label.is_empty() && rest == domain),
                None => n == name,
            });
        }
        let (Some(leaf), Ok(sni)) = (self.key.cert.first(), ServerName::try_from(name)) else {
            return false;
        };
        webpki::EndEntityCert::try_from(leaf)
            .is_ok_and(|c| c.verify_is_valid_for_subject_name(&sni).is_ok())
    }
}

/// The pairs in effect; the first is the default.
pub struct CertSet {
    pairs: Vec<Pair>,
}

impl CertSet {
    /// Reads and checks every pair: each file parses, and each key belongs
    /// to its certificate. The error names the entry and the file.
    pub fn load(settings: &TlsSettings) -> Result<CertSet, String> {
        let provider = provider();
        let mut pairs = Vec::with_capacity(settings.certs.len());
        for (i, c) in settings.certs.iter().enumerate() {
            let key = load_pair(c, &provider).map_err(|e| format!("proxy.tls.certs[{i}]: {e}"))?;
            pairs.push(Pair {
                key,
                names: c.names.clone(),
            });
        }
        Ok(CertSet { pairs })
    }

    fn choose(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        if let Some(name) = sni {
            let name = name.to_ascii_lowercase();
            if let Some(p) = self.pairs.iter().find(|p| p.serves(&name)) {
                return Some(p.key.clone());
            }
        }
        self.pairs.first().map(|p| p.key.clone())
    }
}

fn load_pair(
    c: &CertFiles,
    provider: &rustls::crypto::CryptoProvider,
) -> Result<Arc<CertifiedKey>, String> {
    let chain = CertificateDer::pem_file_iter(&c.cert)
        .map_err(|e| format!("{}: {e}", c.cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", c.cert.display()))?;
    if chain.is_empty() {
        return Err(format!("{}: no PEM certificate in it", c.cert.display()));
    }
    let key = PrivateKeyDer::from_pem_file(&c.key).map_err(|e| {
        format!(
            "{}: {e} (expected a PEM private key: PKCS#8, PKCS#1 or SEC1)",
            c.key.display()
        )
    })?;
    let signer = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| format!("{}: {e}", c.key.display()))?;
    let ck = CertifiedKey::new(chain, signer);
    ck.keys_match().map_err(|e| {
        format!(
            "{} does not belong to {}: {e}",
            c.key.display(),
            c.cert.display()
        )
    })?;
    Ok(Arc::new(ck))
}

/// Chooses the pair for each handshake from the set in effect.
#[derive(Debug)]
struct SniResolver {
    set: ArcSwapOption<CertSet>,
}

impl std::fmt::Debug for CertSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CertSet({} pairs)", self.pairs.len())
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.set.load().as_ref()?.choose(hello.server_name())
    }
}

/// A pool's TLS client: the keep-alive client for requests and the
/// connector for upgrades (each upgrade has a connection of its own).
pub struct BackendClient {
    pub http: Client<hyper_rustls::HttpsConnector<HttpConnector>, UpstreamBody>,
    pub connector: tokio_rustls::TlsConnector,
    pub server_name: Option<ServerName<'static>>,
    /// What it was built from, so a reload that changes nothing keeps its pool.
    built_from: (BackendTls, Vec<u8>),
}

impl BackendClient {
    /// The name to verify `address` (host:port) against.
    pub fn name_for(&self, address: &http::uri::Authority) -> Result<ServerName<'static>, String> {
        if let Some(n) = &self.server_name {
            return Ok(n.clone());
        }
        let host = address.host().trim_start_matches('[').trim_end_matches(']');
        ServerName::try_from(host.to_owned()).map_err(|e| format!("{host:?}: {e}"))
    }
}

/// Everything a config's TLS needs, read from disk before it is applied.
pub struct Prepared {
    certs: Option<CertSet>,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    backends: HashMap<String, Arc<BackendClient>>,
    files: BTreeSet<PathBuf>,
}

/// The TLS state of a running proxy.
pub struct TlsState {
    resolver: Arc<SniResolver>,
    acceptor: ArcSwapOption<tokio_rustls::TlsAcceptor>,
    backends: ArcSwap<HashMap<String, Arc<BackendClient>>>,
    watcher: Mutex<Option<(BTreeSet<PathBuf>, notify::RecommendedWatcher)>>,
    pub handshakes_ok: AtomicU64,
    pub handshakes_failed: AtomicU64,
    pub cert_reloads_ok: AtomicU64,
    pub cert_reloads_failed: AtomicU64,
}

impl Default for TlsState {
    fn default() -> Self {
        TlsState {
            resolver: Arc::new(SniResolver {
                set: ArcSwapOption::empty(),
            }),
            acceptor: ArcSwapOption::empty(),
            backends: ArcSwap::default(),
            watcher: Mutex::new(None),
            handshakes_ok: AtomicU64::new(0),
            handshakes_failed: AtomicU64::new(0),
            cert_reloads_ok: AtomicU64::new(0),
            cert_reloads_failed: AtomicU64::new(0),
        }
    }
}

impl TlsState {
    /// Reads the certificates and CAs `config` names (blocking file reads:
    /// call it off the runtime's threads). Unchanged backend clients are kept.
    pub fn prepare(&self, config: &Config) -> Result<Prepared, String> {
        let mut files = BTreeSet::new();
        let (certs, acceptor) = match &config.proxy.tls {
            Some(t) => {
                let set = CertSet::load(t)?;
                for c in &t.certs {
                    files.insert(c.cert.clone());
                    files.insert(c.key.clone());
                }
                (Some(set), Some(self.acceptor_for(t)?))
            }
            None => (None, None),
        };
        let current = self.backends.load();
        let mut backends = HashMap::new();
        for pool in &config.pools {
            let Some(bt) = &pool.backend_tls else {
                continue;
            };
            let ca_pem = match &bt.ca {
                Some(p) => std::fs::read(p).map_err(|e| {
                    format!("pools.{}.backend_tls.ca: {}: {e}", pool.name, p.display())
                })?,
                None => Vec::new(),
            };
            let key = (bt.clone(), ca_pem);
            let client = match current.get(&pool.name).filter(|c| c.built_from == key) {
                Some(c) => c.clone(),
                None => Arc::new(
                    backend_client(&config.proxy, key)
                        .map_err(|e| format!("pools.{}.backend_tls: {e}", pool.name))?,
                ),
            };
            backends.insert(pool.name.clone(), client);
        }
        Ok(Prepared {
            certs,
            acceptor,
            backends,
            files,
        })
    }

    fn acceptor_for(&self, t: &TlsSettings) -> Result<tokio_rustls::TlsAcceptor, String> {
        let versions: &[&rustls::SupportedProtocolVersion] = if t.tls13_only {
            &[&rustls::version::TLS13]
        } else {
            &[&rustls::version::TLS12, &rustls::version::TLS13]
        };
        let mut sc = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(versions)
            .map_err(|e| format!("proxy.tls: {e}"))?
            .with_no_client_auth()
            .with_cert_resolver(self.resolver.clone());
        sc.alpn_protocols = if t.http2 {
            vec![H2.to_vec(), HTTP11.to_vec()]
        } else {
            vec![HTTP11.to_vec()]
        };
        Ok(tokio_rustls::TlsAcceptor::from(Arc::new(sc)))
    }

    /// Puts a prepared config in effect. Returns the certificate and key
    /// files to watch when they differ from those watched now.
    pub fn commit(&self, p: Prepared) -> Option<BTreeSet<PathBuf>> {
        self.resolver.set.store(p.certs.map(Arc::new));
        self.acceptor.store(p.acceptor.map(Arc::new));
        self.backends.store(Arc::new(p.backends));
        let watching = self.watcher.lock().unwrap_or_else(|e| e.into_inner());
        let same = watching.as_ref().map(|(f, _)| f) == Some(&p.files)
            || (watching.is_none() && p.files.is_empty());
        (!same).then_some(p.files)
    }

    /// Replaces the certificates only (their files changed).
    pub fn swap_certs(&self, set: CertSet) {
        self.resolver.set.store(Some(Arc::new(set)));
    }

    pub fn set_watcher(&self, w: Option<(BTreeSet<PathBuf>, notify::RecommendedWatcher)>) {
        *self.watcher.lock().unwrap_or_else(|e| e.into_inner()) = w;
    }

    pub fn acceptor(&self) -> Option<Arc<tokio_rustls::TlsAcceptor>> {
        self.acceptor.load_full()
    }

    /// The TLS client of `pool`, when its servers speak TLS.
    pub fn backend(&self, pool: &str) -> Option<Arc<BackendClient>> {
        self.backends.load().get(pool).cloned()
    }
}

fn backend_client(
    p: &crate::config::ProxySettings,
    built_from: (BackendTls, Vec<u8>),
) -> Result<BackendClient, String> {
    let (bt, ca_pem) = &built_from;
    let mut roots = rustls::RootCertStore::empty();
    if bt.ca.is_some() {
        let certs = CertificateDer::pem_slice_iter(ca_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("ca: {e}"))?;
        let (added, _) = roots.add_parsable_certificates(certs);
        if added == 0 {
            return Err("ca: no usable PEM certificate in the file".into());
        }
    } else {
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    }
    let mut cc = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    // backends always speak HTTP/1.1 (an upgrade needs it)
    cc.alpn_protocols = vec![HTTP11.to_vec()];
    let cc = Arc::new(cc);
    let server_name = bt
        .server_name
        .as_ref()
        .map(|n| ServerName::try_from(n.clone()).map_err(|e| format!("server_name: {e}")))
        .transpose()?;
    let mut http = crate::app::http_connector(p);
    http.enforce_http(false);
    // hyper-rustls sets ALPN itself (http/1.1 only, as enabled below)
    let mut for_http = (*cc).clone();
    for_http.alpn_protocols.clear();
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(for_http)
        .https_only();
    let https = match &server_name {
        Some(n) => builder
            .with_server_name_resolver(hyper_rustls::FixedServerNameResolver::new(n.clone()))
            .enable_http1()
            .wrap_connector(http),
        None => builder.enable_http1().wrap_connector(http),
    };
    Ok(BackendClient {
        http: crate::app::pooled_client(p, https),
        connector: tokio_rustls::TlsConnector::from(cc),
        server_name,
        built_from,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(names: &[&str], san: &[&str]) -> Pair {
        let ck = rcgen::generate_simple_self_signed(
            san.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        )
        .unwrap();
        let key = PrivateKeyDer::from_pem_slice(ck.key_pair.serialize_pem().as_bytes()).unwrap();
        let key = CertifiedKey::from_der(vec![ck.cert.der().clone()], key, &provider()).unwrap();
        Pair {
            key: Arc::new(key),
            names: names.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn configured_names_match_exactly_or_by_one_wildcard_label() {
        let p = pair(&["play.example", "*.eu.example"], &["unrelated.example"]);
        assert!(p.serves("play.example"));
        assert!(p.serves("a.eu.example"));
        assert!(!p.serves("eu.example"));
        assert!(!p.serves("a.b.eu.example"));
        assert!(
            !p.serves("unrelated.example"),
            "configured names replace the certificate's"
        );
    }

    #[test]
    fn without_names_the_certificate_decides_and_the_first_pair_is_the_default() {
        let set = CertSet {
            pairs: vec![
                pair(&[], &["a.example"]),
                pair(&[], &["b.example", "*.c.example"]),
            ],
        };
        let key = |sni| set.choose(sni).unwrap();
        let first = set.pairs[0].key.clone();
        let second = set.pairs[1].key.clone();
        assert!(Arc::ptr_eq(&key(Some("B.example")), &second));
        assert!(Arc::ptr_eq(&key(Some("x.c.example")), &second));
        assert!(Arc::ptr_eq(&key(Some("a.example")), &first));
        assert!(Arc::ptr_eq(&key(Some("nobody.example")), &first));
        assert!(Arc::ptr_eq(&key(None), &first));
    }
}
