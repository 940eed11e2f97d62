//! Checks of the deployment artifacts under deploy/, run by `cargo xtask test`:
//!
//! * alerting rules: `promtool check rules` and their unit tests (`promtool test rules`);
//! * scrape configurations: `promtool check config` (the kubernetes_sd example through
//!   deploy_check.py first: Debian's promtool is built without Kubernetes discovery);
//! * the systemd unit: `systemd-analyze verify` (any warning fails), then the release
//!   daemon started the way the unit starts it: an unprivileged user holding only the
//!   unit's capabilities, with no-new-privileges;
//! * the unit's `systemd-analyze security` exposure score, pinned ([`EXPOSURE`]);
//! * the Kubernetes manifests: kubernetes-validate --strict against pinned Kubernetes
//!   versions, the ServiceMonitor against prometheus-operator's CRD schema, the
//!   kustomization listing every manifest, and the DaemonSet's promises (deploy_check.py
//!   pod-policy: TLS and auth, probes, capabilities, read-only mounts);
//! * the image, built with podman and run as the DaemonSet runs it ([`crate::deployed`]).
//!
//! The dashboard's queries are checked by the integration test `dashboard`, against a
//! live Prometheus scraping a live daemon.

use std::{
    fs,
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};

use crate::{
    bootstrap,
    command::{cargo, exec, target_dir, workspace_root},
};

/// The oldest Kubernetes release the manifests are meant for, and the newest that
/// kubernetes-validate knows.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.29.0", "1.37.0"];

/// Where the systemd unit lives, in the repository and in the package.
pub const UNIT: &str = "deploy/systemd/observer.service";

/// Installs what the checks need, builds the release daemon and checks deploy/.
pub fn run(bpf_toolchain: &str) -> anyhow::Result<()> {
    println!("xtask: deployment artifacts (deploy/)");
    let venv = bootstrap::deploy_check_tools()?;
    exec(
        cargo()
            .args(["build", "--release", "--package", "observer"])
            .env("OBSERVER_BPF_TOOLCHAIN", bpf_toolchain),
    )?;
    check(&venv, &target_dir().join("release/observer"), bpf_toolchain)
}

fn check(venv: &Path, binary: &Path, bpf_toolchain: &str) -> anyhow::Result<()> {
    let root = workspace_root();
    let scratch = target_dir().join("deploy-check");
    if scratch.exists() {
        fs::remove_dir_all(&scratch)?;
    }
    fs::create_dir_all(&scratch)?;

    println!("xtask: deploy/prometheus: promtool check rules, test rules, check config");
    let prometheus = root.join("deploy/prometheus");
    exec(Command::new("promtool").args(["check", "rules"]).arg(prometheus.join("rules.yml")))?;
    exec(Command::new("promtool").args(["test", "rules"]).arg(prometheus.join("rules_test.yml")))?;
    exec(
        Command::new("promtool").args(["check", "config"]).arg(prometheus.join("prometheus.yml")),
    )?;
    let kubernetes = root.join("deploy/kubernetes");
    let converted = scratch.join("prometheus-scrape-config.yml");
    exec(
        python(venv)
            .arg("scrape-config")
            .arg(kubernetes.join("prometheus-scrape-config.yml"))
            .arg(&converted),
    )?;
    exec(Command::new("promtool").args(["check", "config"]).arg(&converted))?;

    println!("xtask: deploy/systemd: systemd-analyze verify");
    let unit_root = scratch.join("root");
    fs::create_dir_all(unit_root.join("etc/systemd/system"))?;
    fs::create_dir_all(unit_root.join("usr/bin"))?;
    fs::copy(root.join(UNIT), unit_root.join("etc/systemd/system/observer.service"))?;
    fs::copy(binary, unit_root.join("usr/bin/observer"))?;
    verify_unit(&unit_root, "/etc/systemd/system/observer.service")?;
    exposure(&unit_root)?;

    println!(
        "xtask: deploy/systemd: the daemon as the unit runs it (unprivileged user, its capabilities only)"
    );
    run_with_unit_capabilities(&root.join(UNIT), binary)?;

    println!("xtask: deploy/kubernetes: kubernetes-validate, prometheus-operator CRD schema");
    validate_manifests(venv, &kubernetes)?;
    exec(
        python(venv)
            .arg("pod-policy")
            .arg(kubernetes.join("daemonset.yaml"))
            .arg(kubernetes.join("servicemonitor.yaml"))
            .arg(kubernetes.join("prometheus-scrape-config.yml")),
    )?;

    println!("xtask: deploy/container: the image, run as the DaemonSet runs it (podman)");
    bootstrap::container_tools()?;
    let pod_run = python(venv)
        .arg("pod-run")
        .arg(kubernetes.join("daemonset.yaml"))
        .output()
        .context("deploy_check.py pod-run")?;
    ensure!(pod_run.status.success(), "deploy_check.py pod-run failed");
    crate::deployed::check(
        &String::from_utf8_lossy(&pod_run.stdout),
        bpf_toolchain,
        bounding_set()?,
    )?;

    fs::remove_dir_all(&scratch)?;
    Ok(())
}

/// `/proc/<pid>/task/<tid>/status` of the thread named `name` (empty if none).
fn thread_status(pid: u32, name: &str) -> String {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else { return String::new() };
    tasks
        .flatten()
        .find(|task| {
            fs::read_to_string(task.path().join("comm")).is_ok_and(|comm| comm.trim() == name)
        })
        .and_then(|task| fs::read_to_string(task.path().join("status")).ok())
        .unwrap_or_default()
}

fn python(venv: &Path) -> Command {
    let mut command = Command::new(venv.join("bin/python"));
    command.arg(workspace_root().join("xtask/src/deploy_check.py"));
    command
}

/// `systemd-analyze verify` of `unit` (a path inside `root`, where the unit's binary is
/// too), with the host's own units copied in for its dependencies. Warnings fail.
pub fn verify_unit(root: &Path, unit: &str) -> anyhow::Result<()> {
    // Debian keeps its units in /lib/systemd/system (a symlink into /usr on merged-/usr).
    fs::create_dir_all(root.join("lib/systemd"))?;
    exec(
        Command::new("cp").args(["-a", "-n", "/lib/systemd/system"]).arg(root.join("lib/systemd")),
    )?;
    let output = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(format!("--root={}", root.display()))
        .arg(unit)
        .output()
        .context("running systemd-analyze (Debian package systemd)")?;
    let complaints = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    ensure!(
        output.status.success() && complaints.trim().is_empty(),
        "systemd-analyze verify {unit}: {}",
        complaints.trim()
    );
    Ok(())
}

/// The unit's `systemd-analyze security` overall exposure (0 safest … 10), pinned: a
/// change to the sandbox that moves it, either way, must update this on purpose.
const EXPOSURE: &str = "3.0";

/// Checks the exposure score of the unit installed below `root` against [`EXPOSURE`].
fn exposure(root: &Path) -> anyhow::Result<()> {
    let output = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(format!("--root={}", root.display()))
        .arg("observer.service")
        .output()
        .context("running systemd-analyze security")?;
    let report = String::from_utf8_lossy(&output.stdout);
    let score = report
        .lines()
        .find_map(|line| line.split_once("Overall exposure level for observer.service: "))
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .with_context(|| {
            format!("no exposure level in systemd-analyze security's report:\n{report}")
        })?;
    ensure!(
        score == EXPOSURE,
        "systemd-analyze security: exposure {score}, pinned at {EXPOSURE}; if the unit's \
         sandbox changed on purpose, update deploy.rs's EXPOSURE (and docs/security.md)"
    );
    println!("xtask: systemd-analyze security: exposure {score} (pinned)");
    Ok(())
}

/// This process's capability bounding set (a container running the tests may lack some).
pub fn bounding_set() -> anyhow::Result<u64> {
    fs::read_to_string("/proc/self/status")?
        .lines()
        .find_map(|line| line.strip_prefix("CapBnd:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .context("CapBnd in /proc/self/status")
}

/// The number (linux/capability.h) of a capability the daemon may use.
pub fn capability_number(name: &str) -> anyhow::Result<u32> {
    CAPABILITIES
        .iter()
        .find(|(known, _)| *known == name)
        .map(|(_, number)| *number)
        .with_context(|| format!("{name} is not in xtask's capability table"))
}

/// Capability numbers (linux/capability.h) of the names the unit may use.
const CAPABILITIES: [(&str, u32); 6] = [
    ("CAP_DAC_READ_SEARCH", 2),
    ("CAP_SYS_PTRACE", 19),
    ("CAP_SYS_ADMIN", 21),
    ("CAP_SYS_RESOURCE", 24),
    ("CAP_PERFMON", 38),
    ("CAP_BPF", 39),
];

/// What the daemon keeps once its programs are attached.
const KEPT_AFTER_ATTACH: [&str; 2] = ["CAP_SYS_ADMIN", "CAP_SYS_PTRACE"];

/// The capabilities a `Key=` line of the unit lists.
fn unit_capabilities(unit: &str, key: &str) -> anyhow::Result<Vec<String>> {
    let prefix = format!("{key}=");
    let line = unit
        .lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .with_context(|| format!("the unit has no {key}="))?;
    Ok(line.split_whitespace().map(str::to_string).collect())
}

/// Starts the daemon as user nobody with only the unit's ambient capabilities and
/// no-new-privileges, and waits until it is healthy.
fn run_with_unit_capabilities(unit_path: &Path, binary: &Path) -> anyhow::Result<()> {
    let unit = fs::read_to_string(unit_path)?;
    let ambient = unit_capabilities(&unit, "AmbientCapabilities")?;
    let bounding = unit_capabilities(&unit, "CapabilityBoundingSet")?;
    ensure!(ambient == bounding, "the unit's bounding set differs from its ambient set");
    ensure!(unit.lines().any(|l| l == "NoNewPrivileges=yes"), "the unit lacks NoNewPrivileges=yes");

    // A capability this (container's) bounding set lacks cannot be handed on: say so.
    let our_bounding = bounding_set()?;
    let mut granted = Vec::new();
    for name in &ambient {
        let number = capability_number(name)?;
        if our_bounding & (1 << number) == 0 {
            println!("xtask: {name} is not in this machine's bounding set; testing without it");
        } else {
            granted.push((name.as_str(), number));
        }
    }
    let setpriv_list = granted
        .iter()
        .map(|(name, _)| format!("+{}", name.trim_start_matches("CAP_").to_lowercase()))
        .collect::<Vec<_>>()
        .join(",");
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let log = target_dir().join("deploy-check/unit-daemon.log");
    let mut child = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--no-new-privs"])
        .arg(format!("--inh-caps=-all,{setpriv_list}"))
        .arg(format!("--ambient-caps=-all,{setpriv_list}"))
        .arg(format!("--bounding-set=-all,{setpriv_list}"))
        .arg(binary)
        .args(["--web.listen-address", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log)?)
        .spawn()
        .context("running setpriv (Debian package util-linux)")?;
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(30);
    let healthy = loop {
        if healthz(port) {
            break true;
        }
        if Instant::now() > deadline || child.try_wait()?.is_some() {
            break false;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // The main thread (HTTP) holds no capability; the scan thread keeps what the socket
    // inventory needs (observer/src/kernel/privileges.rs).
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let scan_status = thread_status(pid, "observer-scan");
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let exit = child.wait()?;
    let log_text = fs::read_to_string(&log).unwrap_or_default();
    ensure!(healthy, "the daemon under the unit's capabilities never became healthy:\n{log_text}");
    let field = |name: &str| {
        status.lines().find_map(|line| line.strip_prefix(name)).unwrap_or("").trim().to_string()
    };
    // Once attached, the daemon drops all but what its socket inventory needs
    // (observer/src/kernel/privileges.rs, docs/security.md).
    let expected: u64 = granted
        .iter()
        .filter(|(name, _)| KEPT_AFTER_ATTACH.contains(name))
        .map(|(_, number)| 1u64 << number)
        .sum();
    let effective = u64::from_str_radix(&field("CapEff:"), 16).unwrap_or(u64::MAX);
    let scan_effective = scan_status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(u64::MAX);
    ensure!(
        field("Uid:").starts_with("65534") && effective == 0 && scan_effective == expected,
        "the daemon ran as Uid {:?} with CapEff {effective:#x} (scan thread {scan_effective:#x}), \
         expected 65534, 0 and {expected:#x}",
        field("Uid:")
    );
    ensure!(exit.success(), "the daemon did not stop cleanly on SIGTERM ({exit}):\n{log_text}");
    println!(
        "xtask: healthy as uid 65534, started with {}, kept {}",
        granted.iter().map(|(name, _)| *name).collect::<Vec<_>>().join(" "),
        KEPT_AFTER_ATTACH.join(" ")
    );
    Ok(())
}

/// Whether `GET /healthz` on loopback answers 200.
fn healthz(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else { return false };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let request = format!("GET /healthz HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n");
    let mut response = String::new();
    stream.write_all(request.as_bytes()).is_ok()
        && stream.read_to_string(&mut response).is_ok()
        && response.lines().next().is_some_and(|status| status.split(' ').nth(1) == Some("200"))
}

/// Every manifest is in the kustomization, valid for each Kubernetes version, and the
/// prometheus-operator resources valid for the operator's CRD schema.
fn validate_manifests(venv: &Path, dir: &Path) -> anyhow::Result<()> {
    let mut manifests: Vec<PathBuf> = fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
        .filter(|path| path.file_name().is_some_and(|name| name != "kustomization.yaml"))
        .collect();
    manifests.sort();
    let kustomization = fs::read_to_string(dir.join("kustomization.yaml"))?;
    let listed: Vec<&str> = kustomization
        .lines()
        .skip_while(|line| line.trim() != "resources:")
        .skip(1)
        .map_while(|line| line.strip_prefix("  - "))
        .collect();
    for manifest in &manifests {
        let name = manifest.file_name().unwrap_or_default().to_string_lossy();
        ensure!(listed.contains(&name.as_ref()), "kustomization.yaml does not list {name}");
    }
    ensure!(listed.len() == manifests.len(), "kustomization.yaml lists files that do not exist");

    for version in KUBERNETES_VERSIONS {
        let output = Command::new(venv.join("bin/kubernetes-validate"))
            .args(["--strict", "--kubernetes-version", version])
            .args(&manifests)
            .output()
            .context("running kubernetes-validate")?;
        let report = String::from_utf8_lossy(&output.stdout);
        print!("{report}");
        if !output.status.success() {
            bail!("kubernetes-validate (Kubernetes {version}) failed");
        }
        // It only warns about kinds it has no schema for; those must be the operator's.
        for line in report.lines().filter(|line| !line.starts_with("INFO ")) {
            ensure!(
                line.contains("monitoring.coreos.com/"),
                "kubernetes-validate (Kubernetes {version}): {line}"
            );
        }
    }
    exec(python(venv).arg("operator-resources").args(&manifests))
}
