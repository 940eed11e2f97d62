//! The image run as the DaemonSet runs it, checked from outside as Prometheus and an SRE
//! would see it (part of `cargo xtask test`'s deploy/ checks).
//!
//! The pod spec is read from deploy/kubernetes/daemonset.yaml (deploy_check.py pod-run)
//! and translated into `podman run` flags: host PID and network namespaces, the
//! capabilities it drops and adds, no privilege escalation, a read-only root, each host
//! path at its mount point, and the Secret `observer-web` made the way docs/operations.md
//! tells an operator to make it. Then:
//!
//! * `/healthz` answers over HTTPS without credentials (the kubelet's probes);
//! * `/metrics` refuses a missing or wrong password and plain HTTP, and serves the right
//!   one, verifying the certificate under the name Prometheus is configured to expect;
//! * a connection made from another container is reported with a verdict and an owner
//!   whose cgroup and container id are that container's.

use std::{
    fs,
    io::{Read as _, Write as _},
    net::TcpListener,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use serde::Deserialize;

use crate::{command::target_dir, image::podman};

const IMAGE: &str = "localhost/observer:as-deployed";
const CLIENT_IMAGE: &str = "localhost/observer-test-busybox:latest";
const DAEMON_CONTAINER: &str = "observer-as-deployed";
/// The name the scrape configurations verify the certificate against (`server_name`).
const SERVER_NAME: &str = "observer";
const USER: &str = "prometheus";
const PASSWORD: &str = "scrape-secret-for-the-test";

/// deploy_check.py pod-run's description of the DaemonSet's container.
#[derive(Deserialize)]
struct PodRun {
    host_pid: bool,
    host_network: bool,
    args: Vec<String>,
    env: Vec<String>,
    run_as_user: Option<u32>,
    read_only_root: bool,
    no_new_privileges: bool,
    cap_drop: Vec<String>,
    cap_add: Vec<String>,
    mounts: Vec<Mount>,
}

#[derive(Deserialize)]
struct Mount {
    host_path: Option<String>,
    secret: Option<String>,
    target: String,
    read_only: bool,
}

pub fn check(pod_run: &str, bpf_toolchain: &str, bounding_set: u64) -> anyhow::Result<()> {
    let pod: PodRun = serde_json::from_str(pod_run).context("deploy_check.py pod-run's JSON")?;
    ensure!(
        pod.env == ["NODE_IP"],
        "the DaemonSet's env changed ({:?}): update this check",
        pod.env
    );
    crate::image::build(bpf_toolchain, IMAGE)?;
    let scratch = target_dir().join("deploy-check/as-deployed");
    fs::create_dir_all(&scratch)?;
    let secret = scratch.join("observer-web");
    write_web_secret(&secret)?;
    client_image(&scratch)?;

    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let run = daemon_command(&pod, &secret, port, bounding_set)?;
    let _ = podman().args(["rm", "--force", "--ignore", DAEMON_CONTAINER]).output();
    let started = Instant::now();
    let output = podman().args(&run).output().context("podman run")?;
    ensure!(output.status.success(), "podman run: {}", String::from_utf8_lossy(&output.stderr));
    let daemon = Running(DAEMON_CONTAINER);

    let https = Https { port, ca: secret.join("tls.crt") };
    let healthy = poll(Duration::from_secs(60), || https.get("/healthz", None).0 == 200);
    let log = || output_of(podman().args(["logs", DAEMON_CONTAINER]));
    ensure!(healthy, "the container never answered /healthz over HTTPS:\n{}", log());
    println!("xtask: as deployed: healthy over HTTPS in {:.1} s", started.elapsed().as_secs_f64());

    ensure!(https.get("/healthz", None).1.trim() == "ok", "/healthz says more than ok");
    for (credentials, expected) in
        [(None, 401), (Some((USER, "wrong")), 401), (Some(("nobody", PASSWORD)), 401)]
    {
        let (status, _) = https.get("/metrics", credentials);
        ensure!(status == expected, "/metrics with {credentials:?}: {status}, expected {expected}");
    }
    let (status, _) = https.get("/metrics", Some((USER, PASSWORD)));
    ensure!(status == 200, "/metrics with the right password: {status}");
    let plain = curl(&["--silent", "--output", "/dev/null", "--write-out", "%{http_code}"])
        .arg(format!("http://127.0.0.1:{port}/metrics"))
        .output()?;
    ensure!(
        String::from_utf8_lossy(&plain.stdout).trim() != "200",
        "plain HTTP was served next to HTTPS"
    );
    println!("xtask: as deployed: /healthz open, /metrics needs the password, no plain HTTP");

    let (client_id, client_port) = connect_from_a_container(&scratch)?;
    let query = format!("/connections?status=closed&port={client_port}");
    let mut last = String::new();
    let found = poll(Duration::from_secs(20), || {
        last = https.get(&query, Some((USER, PASSWORD))).1;
        client_record(&last, &client_id).is_some()
    });
    ensure!(
        found,
        "no closed connection owned by container {client_id} in {query}:\n{last}\n{}",
        log()
    );
    let record = client_record(&last, &client_id).unwrap_or_default();
    let cgroup = record["owner"]["cgroup"].as_str().unwrap_or_default();
    ensure!(
        cgroup.contains(&client_id) && record["class"] == "fin",
        "the client container's connection: {record}"
    );
    println!(
        "xtask: as deployed: the client container's connection: {} / {}, owner {} in {cgroup}",
        record["class"].as_str().unwrap_or("?"),
        record["cause"].as_str().unwrap_or("?"),
        record["owner"]["comm"].as_str().unwrap_or("?"),
    );
    let logs = log();
    ensure!(!logs.contains("panicked"), "the daemon panicked:\n{logs}");
    drop(daemon);
    fs::remove_dir_all(&scratch)?;
    Ok(())
}

/// The `podman run` arguments for the DaemonSet's container, serving on `port`.
fn daemon_command(
    pod: &PodRun,
    secret: &Path,
    port: u16,
    bounding_set: u64,
) -> anyhow::Result<Vec<String>> {
    ensure!(
        pod.host_pid && pod.host_network,
        "the DaemonSet no longer uses the host's PID and network namespaces"
    );
    let mut run: Vec<String> =
        ["run", "--detach", "--name", DAEMON_CONTAINER, "--pid=host", "--network=host"]
            .map(String::from)
            .into();
    if let Some(user) = pod.run_as_user {
        run.push(format!("--user={user}"));
    }
    if pod.read_only_root {
        run.push("--read-only".into());
    }
    if pod.no_new_privileges {
        run.push("--security-opt=no-new-privileges".into());
    }
    for cap in &pod.cap_drop {
        run.push(format!("--cap-drop={cap}"));
    }
    for cap in &pod.cap_add {
        let number = crate::deploy::capability_number(&format!("CAP_{cap}"))?;
        if bounding_set & (1 << number) == 0 {
            println!(
                "xtask: as deployed: CAP_{cap} is not in this machine's bounding set; running without it"
            );
        } else {
            run.push(format!("--cap-add={cap}"));
        }
    }
    run.extend(ulimits());
    for mount in &pod.mounts {
        let source = match (&mount.host_path, &mount.secret) {
            (Some(path), _) => {
                // hostPath type DirectoryOrCreate (named network namespaces).
                if !Path::new(path).exists() {
                    fs::create_dir_all(path)?;
                }
                path.clone()
            }
            (None, Some(name)) if name == "observer-web" => secret.display().to_string(),
            (None, Some(name)) => {
                bail!("the DaemonSet mounts a Secret {name} this check does not make")
            }
            (None, None) => bail!("a mount of {} has no source", mount.target),
        };
        let mode = if mount.read_only { "ro" } else { "rw" };
        run.push(format!("--volume={source}:{}:{mode}", mount.target));
    }
    run.push(IMAGE.into());
    for arg in &pod.args {
        // $(NODE_IP) is the kubelet's expansion of status.hostIP; the node here is loopback.
        let arg = arg.replace("$(NODE_IP)", "127.0.0.1");
        let arg = match arg.strip_prefix("--web.listen-address=") {
            Some(_) => format!("--web.listen-address=127.0.0.1:{port}"),
            None => arg,
        };
        run.push(arg);
    }
    Ok(run)
}

/// `podman run`'s limits. runc sets a container's limits itself, and root here may not
/// raise any (no CAP_SYS_RESOURCE in the bounding set) while podman's defaults are
/// higher: ask for the open-file limit we have and a modest process limit.
fn ulimits() -> [String; 2] {
    let mut files = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the struct we pass.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut files) };
    [
        format!("--ulimit=nofile={}:{}", files.rlim_cur, files.rlim_max),
        "--ulimit=nproc=4096:4096".into(),
    ]
}

/// The Secret `observer-web` as docs/operations.md makes it: a self-signed certificate
/// for the name the scrape configs verify, and a web config with one bcrypt user.
fn write_web_secret(dir: &Path) -> anyhow::Result<()> {
    if dir.exists() {
        fs::remove_dir_all(dir)?;
    }
    fs::create_dir_all(dir)?;
    let output = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"])
        .args(["-nodes", "-days", "2", "-subj", &format!("/CN={SERVER_NAME}")])
        .args(["-addext", &format!("subjectAltName=DNS:{SERVER_NAME}")])
        .arg("-keyout")
        .arg(dir.join("tls.key"))
        .arg("-out")
        .arg(dir.join("tls.crt"))
        .output()
        .context("running openssl")?;
    ensure!(output.status.success(), "openssl req: {}", String::from_utf8_lossy(&output.stderr));
    let hash = bcrypt::hash(PASSWORD, 10)?;
    fs::write(
        dir.join("web-config.yml"),
        format!(
            "tls_server_config:\n  cert_file: /etc/observer/web/tls.crt\n  key_file: /etc/observer/web/tls.key\n\
             basic_auth_users:\n  {USER}: {hash}\n"
        ),
    )?;
    Ok(())
}

/// A one-binary image (Debian's static busybox) for the client container.
fn client_image(scratch: &Path) -> anyhow::Result<()> {
    let root = scratch.join("busybox-root");
    fs::create_dir_all(root.join("bin"))?;
    fs::copy("/bin/busybox", root.join("bin/busybox"))
        .context("copying /bin/busybox (busybox-static)")?;
    let tarball = scratch.join("busybox.tar");
    crate::command::exec(
        Command::new("tar").arg("-C").arg(&root).arg("-cf").arg(&tarball).arg("."),
    )?;
    let output = podman().arg("import").arg(&tarball).arg(CLIENT_IMAGE).output()?;
    ensure!(output.status.success(), "podman import: {}", String::from_utf8_lossy(&output.stderr));
    Ok(())
}

/// A connection from a container (on the host's network, as a hostNetwork pod's) to a
/// listener here, which reads its line and closes. Returns the container's id and the
/// listener's port.
fn connect_from_a_container(scratch: &Path) -> anyhow::Result<(String, u16)> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    // Accepting with a deadline: a client container that never starts must fail the
    // check, not hang it.
    listener.set_nonblocking(true)?;
    let server = std::thread::spawn(move || -> std::io::Result<String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut stream = loop {
            match listener.accept() {
                Ok((stream, _)) => break stream,
                Err(error)
                    if error.kind() == std::io::ErrorKind::WouldBlock
                        && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(error) => return Err(error),
            }
        };
        stream.set_nonblocking(false)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut line = [0u8; 6];
        stream.read_exact(&mut line)?;
        stream.write_all(b"bye\n")?;
        Ok(String::from_utf8_lossy(&line).into_owned())
    });
    let cidfile = scratch.join("client.cid");
    let _ = fs::remove_file(&cidfile);
    let output = podman()
        .args(["run", "--rm", "--network=host"])
        .args(ulimits())
        .arg("--cidfile")
        .arg(&cidfile)
        .args([CLIENT_IMAGE, "/bin/busybox", "sh", "-c"])
        // Staying a moment after the close: the verdict names the cgroup as it is when
        // the connection ends, and a container gone by then has no name left.
        .arg(format!("echo hello | /bin/busybox nc 127.0.0.1 {port} && /bin/busybox sleep 1"))
        .output()
        .context("podman run (client)")?;
    let greeting = server.join().map_err(|_| anyhow::anyhow!("the listener thread panicked"))?;
    ensure!(
        output.status.success() && greeting.as_ref().is_ok_and(|line| line == "hello\n"),
        "the client container: {} (listener read {greeting:?})",
        String::from_utf8_lossy(&output.stderr)
    );
    let id = fs::read_to_string(&cidfile).context("podman's --cidfile")?.trim().to_string();
    Ok((id, port))
}

/// The record in a /connections answer whose owner is the container `id`.
fn client_record(answer: &str, id: &str) -> Option<serde_json::Value> {
    let records: Vec<serde_json::Value> = serde_json::from_str(answer).ok()?;
    records.into_iter().find(|record| record["owner"]["container_id"] == id)
}

struct Https {
    port: u16,
    ca: std::path::PathBuf,
}

impl Https {
    /// GET `path`, verifying the certificate as Prometheus would; (status, body).
    fn get(&self, path: &str, credentials: Option<(&str, &str)>) -> (u16, String) {
        let mut command = curl(&["--silent", "--max-time", "5", "--write-out", "\n%{http_code}"]);
        command
            .arg("--cacert")
            .arg(&self.ca)
            .arg("--resolve")
            .arg(format!("{SERVER_NAME}:{}:127.0.0.1", self.port))
            .arg(format!("https://{SERVER_NAME}:{}{path}", self.port));
        if let Some((user, password)) = credentials {
            command.arg("--user").arg(format!("{user}:{password}"));
        }
        let Ok(output) = command.output() else { return (0, String::new()) };
        let text = String::from_utf8_lossy(&output.stdout);
        let (body, status) = text.rsplit_once('\n').unwrap_or(("", &text));
        (status.trim().parse().unwrap_or(0), body.to_string())
    }
}

fn curl(args: &[&str]) -> Command {
    let mut command = Command::new("curl");
    command.args(args).stderr(Stdio::null());
    command
}

fn poll(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn output_of(command: &mut Command) -> String {
    command
        .output()
        .map(|o| {
            format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
        })
        .unwrap_or_default()
}

/// A running container, removed when dropped (the check's early returns included).
struct Running(&'static str);

impl Drop for Running {
    fn drop(&mut self) {
        let _ =
            podman().args(["rm", "--force", "--time", "10", self.0]).stdout(Stdio::null()).status();
    }
}
