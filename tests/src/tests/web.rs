//! `--web.config.file`: TLS and basic auth (exporter-toolkit format), checked with a real
//! client (curl) against a real daemon; bad config files give one line and exit 3.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    time::{Duration, Instant},
};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

use super::cli::stderr_line;
use crate::daemon::{Daemon, binary, free_port, latency_budget, wait_until};

const CONFIG_ERROR: i32 = 3;

/// A scratch directory with a CA, a server certificate for 127.0.0.1 and a client
/// certificate, all PEM.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn new(name: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("observer-tests-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        ca_params.distinguished_name.push(DnType::CommonName, "observer test CA");
        let ca =
            CertifiedIssuer::self_signed(ca_params.clone(), KeyPair::generate().unwrap()).unwrap();
        std::fs::write(dir.join("ca.crt"), ca.pem()).unwrap();
        // A CA that did not sign the server's certificate.
        let mut other_params = ca_params;
        other_params.distinguished_name = rcgen::DistinguishedName::new();
        other_params.distinguished_name.push(DnType::CommonName, "another CA");
        let other =
            CertifiedIssuer::self_signed(other_params, KeyPair::generate().unwrap()).unwrap();
        std::fs::write(dir.join("other-ca.crt"), other.pem()).unwrap();
        for (name, san, usage) in [
            ("server", "127.0.0.1", ExtendedKeyUsagePurpose::ServerAuth),
            ("client", "prometheus", ExtendedKeyUsagePurpose::ClientAuth),
        ] {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(vec![san.to_string()]).unwrap();
            params.extended_key_usages = vec![usage];
            // Not rcgen's default name, which is the CA's too: curl would take the
            // leaf for self-signed.
            params.distinguished_name.push(DnType::CommonName, san);
            let cert = params.signed_by(&key, &ca).unwrap();
            std::fs::write(dir.join(format!("{name}.crt")), cert.pem()).unwrap();
            std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
        }
        Self { dir }
    }

    fn path(&self, file: &str) -> String {
        self.dir.join(file).display().to_string()
    }

    fn write_config(&self, text: &str) -> PathBuf {
        let path = self.dir.join("web.yml");
        std::fs::write(&path, text).unwrap();
        path
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `curl` against the daemon; returns (HTTP status, or curl's exit code as a negative
/// number when there was no HTTP response, and the body).
fn curl(args: &[&str], url: &str) -> (i32, String) {
    let output: Output = Command::new("curl")
        .args(["--silent", "--max-time", "10", "--write-out", "\n%{http_code}"])
        .args(args)
        .arg(url)
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "000"));
    match code.parse::<i32>() {
        Ok(0) | Err(_) => (-output.status.code().unwrap_or(-1), body.to_string()),
        Ok(code) => (code, body.to_string()),
    }
}

fn start_with_config(name: &str, config: &Path) -> (Daemon, String) {
    let daemon = Daemon::spawn(
        &binary(),
        name,
        &["--web.config.file".to_string(), config.display().to_string()],
    );
    let url = daemon.base_url.replace("http://", "https://");
    (daemon, url)
}

/// TLS with basic auth: the right user gets every endpoint over HTTPS; a wrong password,
/// an unknown user or no credentials get 401 — and an unknown user is refused no faster
/// than a wrong password (the daemon checks a dummy hash of the same cost).
#[test]
fn tls_and_basic_auth_with_curl() {
    let pki = Pki::new("web-tls");
    let hash = bcrypt::hash("s3cret", 10).unwrap();
    let config = pki.write_config(&format!(
        "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n\
         basic_auth_users:\n  prometheus: '{hash}'\n"
    ));
    let (daemon, url) = start_with_config("web-tls", &config);
    let ca = pki.path("ca.crt");
    let tls = ["--cacert", ca.as_str()];
    fn as_user<'a>(tls: &[&'a str], user: &'a str) -> Vec<&'a str> {
        let mut args = tls.to_vec();
        args.extend(["--user", user]);
        args
    }
    let mut last = (0, String::new());
    let ready = wait_until(Duration::from_secs(30), || {
        last = curl(&as_user(&tls, "prometheus:s3cret"), &format!("{url}/healthz"));
        last.0 == 200
    });
    assert!(ready, "no HTTPS service ({last:?}):\n{}", daemon.log_tail());

    let (status, body) = curl(&as_user(&tls, "prometheus:s3cret"), &format!("{url}/metrics"));
    assert_eq!(status, 200);
    assert!(body.contains("observer_events_total"), "{body}");
    assert_eq!(curl(&as_user(&tls, "prometheus:s3cret"), &format!("{url}/connections")).0, 200);
    // /healthz only says whether the daemon runs, for probes that cannot authenticate.
    assert_eq!(curl(&tls, &format!("{url}/healthz")).0, 200, "/healthz without credentials");
    for path in ["/metrics", "/connections", "/"] {
        assert_eq!(curl(&tls, &format!("{url}{path}")).0, 401, "{path} without credentials");
        assert_eq!(
            curl(&as_user(&tls, "prometheus:wrong"), &format!("{url}{path}")).0,
            401,
            "{path}"
        );
        assert_eq!(curl(&as_user(&tls, "nobody:s3cret"), &format!("{url}{path}")).0, 401, "{path}");
    }
    // Plain HTTP to the TLS port gets no answer it could read, and the certificate is
    // checked (trusting another CA, curl refuses it: exit 60).
    assert!(curl(&[], &daemon.base_url).0 != 200);
    let other_ca = pki.path("other-ca.crt");
    assert_eq!(curl(&["--cacert", &other_ca], &format!("{url}/healthz")).0, -60);

    // Timing: median of a few tries each; without the dummy hash an unknown user would
    // be refused in well under a millisecond, a wrong password takes bcrypt's time (and
    // with a dummy of another cost, 4x faster or slower per step of cost).
    // Each try with a password of its own: verdicts are remembered, so a repeated one
    // would be answered at once.
    let median = |user: &str| {
        let mut times: Vec<Duration> = (0..5)
            .map(|attempt| {
                let credentials = format!("{user}{attempt}");
                let started = Instant::now();
                assert_eq!(curl(&as_user(&tls, &credentials), &format!("{url}/")).0, 401);
                started.elapsed()
            })
            .collect();
        times.sort();
        times[2]
    };
    let (wrong_password, unknown_user) = (median("prometheus:wrong"), median("nobody:wrong"));
    eprintln!("401 after: wrong password {wrong_password:?}, unknown user {unknown_user:?}");
    assert!(
        unknown_user * 2 > wrong_password && wrong_password * 2 > unknown_user,
        "an unknown user ({unknown_user:?}) is told apart from a wrong password \
         ({wrong_password:?}) by time"
    );
    daemon.stop();
    assert!(daemon.wait_exit(Duration::from_secs(10)).is_some_and(|s| s.success()));
}

/// Mutual TLS: RequireAndVerifyClientCert refuses a client without a certificate.
#[test]
fn client_certificates_are_required_when_configured() {
    let pki = Pki::new("web-mtls");
    let config = pki.write_config(
        "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n  \
         client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: ca.crt\n  \
         min_version: TLS13\n",
    );
    let (daemon, url) = start_with_config("web-mtls", &config);
    let (ca, cert, key) = (pki.path("ca.crt"), pki.path("client.crt"), pki.path("client.key"));
    let with_cert = ["--cacert", &ca, "--cert", &cert, "--key", &key];
    let ready = wait_until(Duration::from_secs(30), || {
        curl(&with_cert, &format!("{url}/healthz")).0 == 200
    });
    assert!(ready, "no HTTPS service:\n{}", daemon.log_tail());
    let (status, _) = curl(&["--cacert", &ca], &format!("{url}/metrics"));
    assert!(status < 0, "served without a client certificate: {status}");
    // TLS 1.2 is below min_version.
    let (status, _) =
        curl(&[&with_cert[..], &["--tls-max", "1.2"]].concat(), &format!("{url}/metrics"));
    assert!(status < 0, "served over TLS 1.2: {status}");
    daemon.stop();
    assert!(daemon.wait_exit(Duration::from_secs(10)).is_some());
}

/// A config file that is missing, unreadable YAML, has an unknown key, a bad hash or
/// names a missing certificate: one line, exit 3, before anything is loaded.
#[test]
fn bad_config_files_exit_3() {
    let pki = Pki::new("web-bad");
    let client_key = pki.path("client.key");
    let cases: Vec<(Option<String>, &str)> = vec![
        (None, "No such file"),
        (Some("basic_auth_users: [\n".into()), "invalid web config"),
        (Some("basic_auth_user:\n  a: b\n".into()), "unknown field"),
        (Some("basic_auth_users:\n  a: not-a-hash\n".into()), "not a bcrypt hash"),
        (
            Some("tls_server_config:\n  cert_file: nope.crt\n  key_file: nope.key\n".into()),
            "nope.crt",
        ),
        (
            Some(format!(
                "tls_server_config:\n  cert_file: server.crt\n  key_file: {client_key}\n"
            )),
            "certificate and key",
        ),
    ];
    for (content, expected) in cases {
        let path = match content {
            Some(text) => pki.write_config(&text),
            None => pki.dir.join("missing.yml"),
        };
        let listen = format!("127.0.0.1:{}", free_port());
        let output = Command::new(binary())
            .args(["--web.listen-address", &listen, "--web.config.file"])
            .arg(&path)
            .output()
            .unwrap();
        let message = stderr_line(&output);
        assert_eq!(output.status.code(), Some(CONFIG_ERROR), "{message}");
        assert!(message.contains(expected), "expected {expected:?} in: {message}");
    }
}

/// 200 clients at once sending wrong passwords (bcrypt cost 10, a password of their own
/// each time): a scraper that authenticated before still gets every scrape within 2 s —
/// its verdict is remembered, and the wrong ones wait their turn for one core — and the
/// daemon's CPU time grows by at most about one core.
#[test]
fn a_wrong_password_flood_does_not_lock_the_scraper_out() {
    use std::sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    };
    let pki = Pki::new("web-flood");
    let hash = bcrypt::hash("s3cret", 10).unwrap();
    let config = pki.write_config(&format!("basic_auth_users:\n  prometheus: '{hash}'\n"));
    let daemon = Daemon::start_binary(
        &binary(),
        "web-flood",
        &["--web.config.file".to_string(), config.display().to_string()],
    );
    let budget = latency_budget(Duration::from_secs(2)).as_secs().to_string();
    let scrape = || {
        let started = Instant::now();
        let (code, _) = curl(
            &["--max-time", &budget, "--user", "prometheus:s3cret"],
            &format!("{}/metrics", daemon.base_url),
        );
        (code, started.elapsed())
    };
    assert_eq!(scrape().0, 200, "{}", daemon.log_tail());
    let cpu_seconds = || {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", daemon.pid)).unwrap();
        let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
        let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        ticks as f64 / 100.0
    };
    let stop = Arc::new(AtomicBool::new(false));
    let attempts = Arc::new(AtomicU64::new(0));
    let flood: Vec<_> = (0..200)
        .map(|client| {
            let (stop, attempts, url) =
                (Arc::clone(&stop), Arc::clone(&attempts), format!("{}/metrics", daemon.base_url));
            std::thread::spawn(move || {
                let agent: ureq::Agent =
                    ureq::Agent::config_builder().http_status_as_error(false).build().into();
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let credentials = base64_basic(&format!("prometheus:guess-{client}-{n}"));
                    let _ = agent.get(&url).header("Authorization", &credentials).call();
                    attempts.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let (cpu_before, started) = (cpu_seconds(), Instant::now());
    let mut slowest = Duration::ZERO;
    while started.elapsed() < Duration::from_secs(8) {
        let (code, took) = scrape();
        assert_eq!(code, 200, "a scrape failed during the flood (after {took:?})");
        slowest = slowest.max(took);
        std::thread::sleep(Duration::from_millis(500));
    }
    let cores = (cpu_seconds() - cpu_before) / started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    flood.into_iter().for_each(|client| client.join().unwrap());
    eprintln!(
        "200 clients, {} wrong-password attempts in {:?}: slowest scrape {slowest:?}, the \
         daemon used {cores:.2} cores",
        attempts.load(Ordering::Relaxed),
        started.elapsed()
    );
    assert!(cores < 1.3, "the flood cost {cores:.2} cores");
    let (_, metrics) =
        curl(&["--user", "prometheus:s3cret"], &format!("{}/metrics", daemon.base_url));
    let lost =
        observer_exposition::Exposition::parse(&metrics).sum("observer_events_lost_total", &[]);
    assert_eq!(lost, 0.0, "{metrics}");
    daemon.stop();
}

fn base64_basic(credentials: &str) -> String {
    use base64::Engine as _;
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(credentials))
}

/// SIGHUP reads the web config again: a changed user list applies to the next request,
/// a rotated certificate to the next handshake, and a broken file keeps what is in force.
#[test]
fn sighup_reads_the_web_config_again() {
    let (first, second) = (Pki::new("web-reload"), Pki::new("web-reload-rotated"));
    let config = |pki: &Pki, password: &str| {
        format!(
            "tls_server_config:\n  cert_file: {}\n  key_file: {}\n\
             basic_auth_users:\n  alice: '{}'\n",
            pki.path("server.crt"),
            pki.path("server.key"),
            bcrypt::hash(password, 4).unwrap()
        )
    };
    let path = first.write_config(&config(&first, "old"));
    let (daemon, url) = start_with_config("web-reload", &path);
    let status =
        |ca: &str, user: &str| curl(&["--cacert", ca, "--user", user], &format!("{url}/metrics")).0;
    let (first_ca, second_ca) = (first.path("ca.crt"), second.path("ca.crt"));
    let up = wait_until(Duration::from_secs(30), || status(&first_ca, "alice:old") == 200);
    assert!(up, "{}", daemon.log_tail());

    std::fs::write(&path, config(&first, "new")).unwrap();
    daemon.signal(nix::sys::signal::Signal::SIGHUP);
    let reloaded = wait_until(Duration::from_secs(10), || status(&first_ca, "alice:new") == 200);
    assert!(reloaded, "the new password was never accepted\n{}", daemon.log_tail());
    assert_eq!(status(&first_ca, "alice:old"), 401, "the old password still works");

    std::fs::write(&path, "basic_auth_users: [\n").unwrap();
    daemon.signal(nix::sys::signal::Signal::SIGHUP);
    let refused = wait_until(Duration::from_secs(10), || {
        std::fs::read_to_string(&daemon.log)
            .unwrap_or_default()
            .contains("keeping the configuration in force")
    });
    assert!(refused, "{}", daemon.log_tail());
    assert_eq!(status(&first_ca, "alice:new"), 200, "a broken file replaced the configuration");

    std::fs::write(&path, config(&second, "new")).unwrap();
    daemon.signal(nix::sys::signal::Signal::SIGHUP);
    let rotated = wait_until(Duration::from_secs(10), || status(&second_ca, "alice:new") == 200);
    assert!(rotated, "the rotated certificate was never served\n{}", daemon.log_tail());
    // curl refuses the certificate (60), or the handshake as a whole (35).
    let old_ca = status(&first_ca, "alice:new");
    assert!(old_ca == -60 || old_ca == -35, "the old certificate is still served ({old_ca})");
    daemon.stop();
}
