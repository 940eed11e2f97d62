//! `--web.config.file`: TLS and HTTP basic auth for every endpoint, in the format of the
//! Prometheus exporter-toolkit (node_exporter's `--web.config.file`), so operators reuse
//! their files:
//!
//! ```yaml
//! tls_server_config:
//!   cert_file: /etc/observer/tls.crt
//!   key_file: /etc/observer/tls.key
//!   client_auth_type: RequireAndVerifyClientCert   # optional
//!   client_ca_file: /etc/observer/clients-ca.crt
//!   min_version: TLS12                             # TLS12 (default) or TLS13
//! basic_auth_users:
//!   prometheus: $2y$10$...                         # bcrypt hash (htpasswd -nBC 10 "")
//! ```
//!
//! Everything the toolkit accepts is understood; what rustls cannot do (TLS 1.0/1.1,
//! client certificates accepted without verification) is refused at startup, and what
//! only tunes Go's TLS stack (`cipher_suites`, `curve_preferences`,
//! `prefer_server_cipher_suites`, `http_server_config`) is accepted and ignored with a
//! warning. Unknown keys are errors, as in the toolkit (a typo must not silently turn
//! protection off).

use std::{
    collections::HashMap,
    num::NonZeroUsize,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError, RwLock},
};

use axum::{
    Router,
    extract::{Request, State},
    http::{HeaderValue, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
};
use base64::Engine as _;
use lru::LruCache;
use rustls::{
    RootCertStore, ServerConfig, SupportedProtocolVersion,
    server::WebPkiClientVerifier,
    version::{TLS12, TLS13},
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use serde::Deserialize;

use crate::error::Error;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    tls_server_config: Option<TlsFile>,
    #[serde(default)]
    http_server_config: Option<serde_norway::Value>,
    #[serde(default)]
    basic_auth_users: Option<HashMap<String, String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsFile {
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    /// Inline PEM (exporter-toolkit 0.11+).
    cert: Option<String>,
    key: Option<String>,
    client_auth_type: Option<String>,
    client_ca_file: Option<PathBuf>,
    #[serde(default)]
    client_allowed_sans: Vec<String>,
    min_version: Option<String>,
    max_version: Option<String>,
    cipher_suites: Option<serde_norway::Value>,
    curve_preferences: Option<serde_norway::Value>,
    prefer_server_cipher_suites: Option<serde_norway::Value>,
}

/// What the web config file asks for.
#[derive(Default)]
pub struct WebConfig {
    /// Serve HTTPS with this configuration instead of HTTP.
    pub tls: Option<Arc<ServerConfig>>,
    /// Require one of these users on every request.
    pub auth: Option<Arc<BasicAuth>>,
}

impl WebConfig {
    /// Reads and checks the file; any problem is one [`Error::Config`] naming it.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let fail = |source: ConfigError| Error::Config { path: path.to_path_buf(), source };
        let text = std::fs::read_to_string(path).map_err(|error| fail(ConfigError::Read(error)))?;
        let file: File = if text.trim().is_empty() {
            File::default()
        } else {
            serde_norway::from_str(&text).map_err(|error| fail(ConfigError::Yaml(error)))?
        };
        if file.http_server_config.is_some() {
            log::warn!(
                "web config: http_server_config is ignored (HTTP/1.1 only, no extra headers)"
            );
        }
        // Relative file names are relative to the config file, as in the toolkit.
        let base = path.parent().unwrap_or(Path::new("."));
        let tls =
            file.tls_server_config.map(|tls| tls_config(&tls, base)).transpose().map_err(fail)?;
        let auth = match file.basic_auth_users {
            Some(users) if !users.is_empty() => {
                Some(Arc::new(BasicAuth::new(users).map_err(fail)?))
            }
            _ => None,
        };
        Ok(Self { tls, auth })
    }
}

/// The web configuration in force, replaced as a whole when the file is read again
/// (SIGHUP): each new TLS handshake and each request takes the current one, so a rotated
/// certificate or a changed user list needs no restart.
pub struct LiveConfig {
    path: Option<PathBuf>,
    current: RwLock<Arc<WebConfig>>,
}

impl LiveConfig {
    /// The configuration read from `path` (`None`: plain HTTP, no users, never reread).
    pub fn load(path: Option<&Path>) -> Result<Arc<Self>, Error> {
        let config = match path {
            Some(path) => WebConfig::load(path)?,
            None => WebConfig::default(),
        };
        Ok(Arc::new(Self {
            path: path.map(Path::to_path_buf),
            current: RwLock::new(Arc::new(config)),
        }))
    }

    pub fn current(&self) -> Arc<WebConfig> {
        Arc::clone(&self.current.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Reads the file again; a file that does not load, or that would switch TLS on or
    /// off (the listener's scheme is fixed at start), leaves the configuration in force.
    pub fn reload(&self) {
        let Some(path) = &self.path else { return };
        match WebConfig::load(path) {
            Ok(config) if config.tls.is_some() != self.current().tls.is_some() => log::warn!(
                "web config {}: TLS cannot be switched on or off without a restart; keeping \
                 the configuration in force",
                path.display()
            ),
            Ok(config) => {
                *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(config);
                log::info!("web config {} read again", path.display());
            }
            Err(error) => {
                log::warn!("{}; keeping the configuration in force", crate::error::one_line(&error))
            }
        }
    }

    /// Puts `router` behind the basic auth of the configuration in force at each request.
    pub fn protect(self: &Arc<Self>, router: Router) -> Router {
        router.layer(middleware::from_fn_with_state(Arc::clone(self), require_auth))
    }
}

/// What is wrong with a web config file: the part of it, and the cause where there is
/// one (the one-line rendering is [`crate::error::Error::one_line`]'s).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read it")]
    Read(#[source] std::io::Error),
    #[error("not a web config")]
    Yaml(#[source] serde_norway::Error),
    #[error("{part}")]
    Pem {
        part: String,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("{part}")]
    Tls {
        part: &'static str,
        #[source]
        source: rustls::Error,
    },
    #[error("client_ca_file")]
    ClientVerifier(#[source] rustls::server::VerifierBuilderError),
    #[error("cannot compute a bcrypt hash")]
    Bcrypt(#[source] bcrypt::BcryptError),
    #[error("basic_auth_users.{user}: not a bcrypt hash")]
    NotBcrypt {
        user: String,
        #[source]
        source: bcrypt::BcryptError,
    },
    /// A value the file may not have, said in full.
    #[error("{0}")]
    Invalid(String),
}

fn invalid(message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid(message.into())
}

fn pem(part: String) -> impl FnOnce(rustls_pki_types::pem::Error) -> ConfigError {
    move |source| ConfigError::Pem { part, source }
}

fn tls_config(tls: &TlsFile, base: &Path) -> Result<Arc<ServerConfig>, ConfigError> {
    for (name, value) in [
        ("cipher_suites", &tls.cipher_suites),
        ("curve_preferences", &tls.curve_preferences),
        ("prefer_server_cipher_suites", &tls.prefer_server_cipher_suites),
    ] {
        if value.is_some() {
            log::warn!("web config: tls_server_config.{name} is ignored (rustls chooses)");
        }
    }
    let resolve = |file: &PathBuf| base.join(file);
    let certs: Vec<CertificateDer<'static>> = match (&tls.cert_file, &tls.cert) {
        (Some(file), None) => CertificateDer::pem_file_iter(resolve(file))
            .and_then(Iterator::collect)
            .map_err(pem(format!("cert_file {}", resolve(file).display())))?,
        (None, Some(text)) => CertificateDer::pem_slice_iter(text.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(pem("cert".into()))?,
        (None, None) => return Err(invalid("tls_server_config needs cert_file (or cert)")),
        (Some(_), Some(_)) => return Err(invalid("give either cert_file or cert, not both")),
    };
    if certs.is_empty() {
        return Err(invalid("no certificate in cert_file"));
    }
    let key = match (&tls.key_file, &tls.key) {
        (Some(file), None) => PrivateKeyDer::from_pem_file(resolve(file))
            .map_err(pem(format!("key_file {}", resolve(file).display())))?,
        (None, Some(text)) => {
            PrivateKeyDer::from_pem_slice(text.as_bytes()).map_err(pem("key".into()))?
        }
        (None, None) => return Err(invalid("tls_server_config needs key_file (or key)")),
        (Some(_), Some(_)) => return Err(invalid("give either key_file or key, not both")),
    };
    let versions = protocol_versions(tls.min_version.as_deref(), tls.max_version.as_deref())?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&versions)
        .map_err(|source| ConfigError::Tls { part: "TLS versions", source })?;

    let client_auth = tls.client_auth_type.as_deref().unwrap_or("NoClientCert");
    let (verify, optional) = match client_auth {
        "NoClientCert" => (false, false),
        "VerifyClientCertIfGiven" => (true, true),
        "RequireAndVerifyClientCert" => (true, false),
        "RequestClientCert" | "RequireAnyClientCert" => {
            return Err(invalid(format!(
                "client_auth_type {client_auth} (client certificates without verification) is \
                 not supported; use VerifyClientCertIfGiven or RequireAndVerifyClientCert"
            )));
        }
        other => return Err(invalid(format!("invalid client_auth_type {other:?}"))),
    };
    if !tls.client_allowed_sans.is_empty() {
        return Err(invalid("client_allowed_sans is not supported"));
    }
    let builder = if verify {
        let Some(ca_file) = &tls.client_ca_file else {
            return Err(invalid(format!("client_auth_type {client_auth} needs client_ca_file")));
        };
        let mut roots = RootCertStore::empty();
        let part = format!("client_ca_file {}", resolve(ca_file).display());
        for cert in CertificateDer::pem_file_iter(resolve(ca_file)).map_err(pem(part.clone()))? {
            let cert = cert.map_err(pem(part.clone()))?;
            roots
                .add(cert)
                .map_err(|source| ConfigError::Tls { part: "client_ca_file", source })?;
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
        let verifier = if optional { verifier.allow_unauthenticated() } else { verifier };
        builder.with_client_cert_verifier(verifier.build().map_err(ConfigError::ClientVerifier)?)
    } else {
        if tls.client_ca_file.is_some() {
            log::warn!("web config: client_ca_file is unused with client_auth_type NoClientCert");
        }
        builder.with_no_client_auth()
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|source| ConfigError::Tls { part: "certificate and key", source })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn protocol_versions(
    min: Option<&str>,
    max: Option<&str>,
) -> Result<Vec<&'static SupportedProtocolVersion>, ConfigError> {
    let rank = |name: &str| match name {
        "TLS12" => Ok(0),
        "TLS13" => Ok(1),
        "TLS10" | "TLS11" => {
            Err(invalid(format!("{name} is not supported (TLS 1.2 is the oldest)")))
        }
        other => Err(invalid(format!("invalid TLS version {other:?} (TLS12 or TLS13)"))),
    };
    let low = min.map(rank).transpose()?.unwrap_or(0);
    let high = max.map(rank).transpose()?.unwrap_or(1);
    if low > high {
        return Err(invalid("min_version is above max_version"));
    }
    Ok([&TLS12, &TLS13][low..=high].to_vec())
}

/// The `basic_auth_users` of the file: user → bcrypt hash.
///
/// bcrypt is slow on purpose, so a flood of attempts must not cost every core: hashes
/// are computed one at a time (at most one core), verdicts are remembered (keyed by a
/// SHA-256 of user, hash and password, as exporter-toolkit does) so a client that
/// authenticated once is not held up by anyone else's attempts, and at most
/// [`WAITING_ATTEMPTS`] unremembered attempts wait for their turn; others are answered
/// 503 at once.
pub struct BasicAuth {
    users: HashMap<String, String>,
    /// Checked for unknown users, at the cost of the real hashes, so that an unknown
    /// user takes as long to refuse as a wrong password.
    dummy_hash: String,
    verdicts: Mutex<LruCache<[u8; 32], bool>>,
    /// One bcrypt at a time.
    hashing: Mutex<()>,
    waiting: Arc<tokio::sync::Semaphore>,
}

/// Verdicts remembered: far more than the attempts bcrypt lets through in a scrape
/// interval (one core does about 15 a second at cost 10).
const REMEMBERED_VERDICTS: usize = 4096;
/// Attempts whose verdict is not remembered that may wait for bcrypt.
pub const WAITING_ATTEMPTS: usize = 32;

/// What a request's `Authorization` header earned it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Allowed,
    Refused,
    /// Too many attempts waiting for bcrypt.
    Busy,
}

impl BasicAuth {
    fn new(users: HashMap<String, String>) -> Result<Self, ConfigError> {
        // The cost of the real hashes: an unknown user costs what a known one does.
        let mut cost = 4;
        for (user, hash) in &users {
            let parts: bcrypt::HashParts = hash
                .parse()
                .map_err(|source| ConfigError::NotBcrypt { user: user.clone(), source })?;
            cost = cost.max(parts.get_cost());
            if user.contains(':') {
                return Err(invalid(format!("basic_auth_users: user name {user:?} contains ':'")));
            }
        }
        let dummy_hash =
            bcrypt::hash("observer: no such user", cost).map_err(ConfigError::Bcrypt)?;
        Ok(Self {
            users,
            dummy_hash,
            verdicts: Mutex::new(LruCache::new(
                NonZeroUsize::new(REMEMBERED_VERDICTS).expect("non-zero"),
            )),
            hashing: Mutex::new(()),
            waiting: Arc::new(tokio::sync::Semaphore::new(WAITING_ATTEMPTS)),
        })
    }

    /// Whether an `Authorization` header names a user with the right password.
    pub async fn check(self: &Arc<Self>, authorization: Option<&HeaderValue>) -> Access {
        let Some((user, password)) = authorization.and_then(parse_basic) else {
            return Access::Refused;
        };
        let (hash, known) = match self.users.get(&user) {
            Some(hash) => (hash.clone(), true),
            None => (self.dummy_hash.clone(), false),
        };
        let key = verdict_key(&user, &hash, &password);
        if let Some(allowed) = self.remembered(&key) {
            return access(allowed && known);
        }
        let Ok(waiting) = Arc::clone(&self.waiting).try_acquire_owned() else {
            return Access::Busy;
        };
        // The turn is taken, and the verdict kept, on the blocking thread: a request
        // given up while it waits (its client gone) must neither let another bcrypt run
        // beside its own nor waste it.
        let auth = Arc::clone(self);
        let matches = tokio::task::spawn_blocking(move || {
            let _waiting = waiting;
            let _turn = auth.hashing.lock().unwrap_or_else(PoisonError::into_inner);
            // Another attempt with the same credentials may have been decided meanwhile.
            if let Some(allowed) = auth.remembered(&key) {
                return allowed;
            }
            let matches = bcrypt::verify(password.as_bytes(), &hash).unwrap_or(false);
            auth.verdicts.lock().unwrap_or_else(PoisonError::into_inner).put(key, matches);
            matches
        })
        .await
        .unwrap_or(false);
        access(matches && known)
    }

    fn remembered(&self, key: &[u8; 32]) -> Option<bool> {
        self.verdicts.lock().unwrap_or_else(PoisonError::into_inner).get(key).copied()
    }
}

fn access(allowed: bool) -> Access {
    if allowed { Access::Allowed } else { Access::Refused }
}

/// SHA-256 of user, hash and password, each length-prefixed (no two triples share it).
fn verdict_key(user: &str, hash: &str, password: &str) -> [u8; 32] {
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    for part in [user, hash, password] {
        context.update(&(part.len() as u64).to_le_bytes());
        context.update(part.as_bytes());
    }
    context.finish().as_ref().try_into().expect("SHA-256 is 32 bytes")
}

/// `Basic base64(user:password)` → (user, password).
fn parse_basic(value: &HeaderValue) -> Option<(String, String)> {
    let encoded = value.to_str().ok()?.strip_prefix("Basic ")?;
    let decoded = base64::engine::general_purpose::STANDARD.decode(encoded.trim()).ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, password) = text.split_once(':')?;
    Some((user.to_string(), password.to_string()))
}

/// Paths served without credentials: `/healthz` says only whether the daemon runs, and
/// probes (a kubelet's) cannot authenticate.
const OPEN_PATHS: [&str; 1] = ["/healthz"];

async fn require_auth(
    State(config): State<Arc<LiveConfig>>,
    request: Request,
    next: Next,
) -> Response {
    let Some(auth) = config.current().auth.clone() else {
        return next.run(request).await;
    };
    if OPEN_PATHS.contains(&request.uri().path()) {
        return next.run(request).await;
    }
    match auth.check(request.headers().get(header::AUTHORIZATION)).await {
        Access::Allowed => next.run(request).await,
        Access::Busy => {
            (StatusCode::SERVICE_UNAVAILABLE, "too many authentication attempts\n").into_response()
        }
        Access::Refused => (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Basic realm=\"observer\"")],
            "Unauthorized\n",
        )
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(name: &str, text: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!("observer-web-{}-{name}", std::process::id()));
        std::fs::write(&path, text).unwrap();
        path
    }

    fn header(user: &str, password: &str) -> HeaderValue {
        let encoded =
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        HeaderValue::from_str(&format!("Basic {encoded}")).unwrap()
    }

    #[tokio::test]
    async fn checks_basic_auth_users() {
        let hash = bcrypt::hash("secret", 4).unwrap();
        let path = write("auth.yml", &format!("basic_auth_users:\n  alice: {hash}\n"));
        let config = WebConfig::load(&path).unwrap();
        let auth = config.auth.expect("auth");
        assert!(config.tls.is_none());
        let check = async |value: Option<HeaderValue>| auth.check(value.as_ref()).await;
        assert_eq!(check(Some(header("alice", "secret"))).await, Access::Allowed);
        assert_eq!(check(Some(header("alice", "wrong"))).await, Access::Refused);
        assert_eq!(check(Some(header("bob", "secret"))).await, Access::Refused);
        assert_eq!(check(None).await, Access::Refused);
        assert_eq!(check(Some(HeaderValue::from_static("Basic !!!"))).await, Access::Refused);
        assert_eq!(check(Some(HeaderValue::from_static("Bearer x"))).await, Access::Refused);
        // The dummy hash costs what the real ones cost.
        let dummy: bcrypt::HashParts = auth.dummy_hash.parse().unwrap();
        assert_eq!(dummy.get_cost(), 4);
    }

    #[tokio::test]
    async fn a_remembered_verdict_waits_for_nobody_and_a_full_queue_sheds() {
        let hash = bcrypt::hash("secret", 4).unwrap();
        let path = write("queue.yml", &format!("basic_auth_users:\n  alice: {hash}\n"));
        let auth = WebConfig::load(&path).unwrap().auth.expect("auth");
        let alice = header("alice", "secret");
        assert_eq!(auth.check(Some(&alice)).await, Access::Allowed);
        // A flood of wrong passwords fills the queue:
        let _queue = auth.waiting.try_acquire_many(WAITING_ATTEMPTS as u32).unwrap();
        let remembered =
            tokio::time::timeout(std::time::Duration::from_secs(5), auth.check(Some(&alice)));
        assert_eq!(remembered.await, Ok(Access::Allowed));
        assert_eq!(auth.check(Some(&header("alice", "guess"))).await, Access::Busy);
        assert_ne!(
            verdict_key("alice", &hash, "secret"),
            verdict_key("alice", &hash, "secreT"),
            "the key depends on the password"
        );
    }

    #[test]
    fn refuses_what_it_cannot_honour() {
        for (text, expected) in [
            ("basic_auth_users:\n  alice: plain\n", "not a bcrypt hash"),
            ("basic_auth_user:\n  alice: x\n", "unknown field"),
            ("tls_server_config:\n  key_file: k\n", "needs cert_file"),
            ("tls_server_config: {cert_file: /nonexistent.crt, key_file: k}\n", "nonexistent"),
            ("tls_server_config: {cert_file: \"a\"\n", "line 1"),
        ] {
            let path = write("bad.yml", text);
            // As the daemon prints it: the error and its causes, on one line.
            let error = WebConfig::load(&path).err().expect(text).one_line();
            assert!(error.contains(expected), "{text:?}: {error}");
            assert_eq!(error.lines().count(), 1, "{error}");
        }
        assert_eq!(
            protocol_versions(Some("TLS10"), None).unwrap_err().to_string(),
            "TLS10 is not supported (TLS 1.2 is the oldest)"
        );
        assert_eq!(protocol_versions(Some("TLS13"), None).unwrap().len(), 1);
        assert!(protocol_versions(Some("TLS13"), Some("TLS12")).is_err());
    }

    #[test]
    fn empty_file_means_plain_http() {
        let config = WebConfig::load(&write("empty.yml", "")).unwrap();
        assert!(config.tls.is_none() && config.auth.is_none());
    }
}
