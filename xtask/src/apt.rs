//! apt with a private configuration: its own sources list, package lists and cache
//! under a directory of ours, for fetching Debian packages of another suite (guest
//! kernels for vm-test, the bench's peers). The system's sources are never touched.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::command::{exec, output};

pub const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

/// apt with its own sources, lists and cache under `dir`.
pub struct PrivateApt {
    options: Vec<String>,
}

impl PrivateApt {
    /// A stable suite (bullseye, bookworm, trixie): the suite, its updates and security.
    pub fn new(dir: &Path, suite: &str) -> anyhow::Result<Self> {
        let security = format!("{suite}-security");
        Self::with_dists(
            dir,
            &[
                ("http://deb.debian.org/debian", suite),
                ("http://deb.debian.org/debian", &format!("{suite}-updates")),
                ("http://security.debian.org/debian-security", &security),
            ],
        )
    }

    /// Exactly these (archive, distribution) pairs: `sid` alone, or `experimental`
    /// alone (its packages then are the only candidates).
    pub fn with_dists(dir: &Path, dists: &[(&str, &str)]) -> anyhow::Result<Self> {
        if !Path::new(KEYRING).exists() {
            bail!("{KEYRING} is missing (Debian package debian-archive-keyring)");
        }
        let lists = dir.join("apt/lists");
        let cache = dir.join("apt/cache");
        fs::create_dir_all(lists.join("partial"))?;
        fs::create_dir_all(cache.join("archives/partial"))?;
        let sources = dir.join("apt/sources.list");
        let line = |url: &str, dist: &str| format!("deb [signed-by={KEYRING}] {url} {dist} main\n");
        fs::write(&sources, dists.iter().map(|(url, dist)| line(url, dist)).collect::<String>())?;
        let options = [
            format!("Dir::Etc::SourceList={}", sources.display()),
            "Dir::Etc::SourceParts=/dev/null".to_string(),
            format!("Dir::State::Lists={}", lists.display()),
            format!("Dir::Cache={}", cache.display()),
            // Downloads land in our own directory, which the _apt user cannot enter.
            "APT::Sandbox::User=root".to_string(),
        ]
        .into_iter()
        .flat_map(|option| ["-o".to_string(), option])
        .collect();
        Ok(Self { options })
    }

    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new(program);
        command.args(&self.options);
        command
    }

    pub fn apt_get(&self, args: &[&str]) -> anyhow::Result<()> {
        exec(self.command("apt-get").args(args))
    }

    pub fn apt_cache(&self, args: &[&str]) -> anyhow::Result<String> {
        output(self.command("apt-cache").args(args))
            .with_context(|| format!("apt-cache {} failed", args.join(" ")))
    }

    /// `apt-get download package` into `dir`; returns the .deb.
    pub fn download(&self, package: &str, dir: &Path) -> anyhow::Result<PathBuf> {
        fs::create_dir_all(dir)?;
        exec(self.command("apt-get").args(["download", "-qq", package]).current_dir(dir))?;
        fs::read_dir(dir)?
            .filter_map(Result::ok)
            .map(|entry| entry.path())
            .find(|path| {
                path.file_name().is_some_and(|name| {
                    name.to_string_lossy().starts_with(&format!("{package}_"))
                        && path.extension().is_some_and(|ext| ext == "deb")
                })
            })
            .with_context(|| format!("apt-get download left no {package} .deb"))
    }
}
