//! Choosing the compute backend at run time: burn's wgpu backend when an adapter is found,
//! otherwise its pure-Rust CPU backend (flex).
//!
//! The wgpu backend is a cargo feature (`wgpu`, off by default): it doubles the build, and
//! a machine without a GPU runs the CPU backend faster than a software GPU. A build without
//! it still knows the backend's name and says how to get it.

use std::fmt;
use std::str::FromStr;

use burn::tensor::Device;
use serde::{Deserialize, Serialize};

use crate::ModelError;

/// The backends Veil can run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// burn's wgpu backend (Vulkan, Metal, DX12 or a software Vulkan device).
    Wgpu,
    /// burn's flex backend: pure Rust on the CPU.
    Cpu,
}

impl BackendKind {
    pub const ALL: [BackendKind; 2] = [BackendKind::Wgpu, BackendKind::Cpu];

    pub fn as_str(&self) -> &'static str {
        match self {
            BackendKind::Wgpu => "wgpu",
            BackendKind::Cpu => "cpu",
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for BackendKind {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "wgpu" | "gpu" => Ok(BackendKind::Wgpu),
            "cpu" | "flex" => Ok(BackendKind::Cpu),
            other => Err(ModelError::Backend(format!(
                "unknown backend `{other}` (choose wgpu or cpu)"
            ))),
        }
    }
}

/// A device ready for tensors, with what it is.
#[derive(Debug, Clone)]
pub struct Compute {
    pub device: Device,
    pub kind: BackendKind,
    /// Human-readable adapter, e.g. `llvmpipe (LLVM 15.0.6, 256 bits) via Vulkan`.
    pub adapter: String,
    /// Whether the adapter is a software rasteriser running on the CPU (Mesa's llvmpipe).
    pub software: bool,
}

impl Compute {
    /// The CPU backend; always available.
    pub fn cpu() -> Self {
        Compute {
            device: Device::flex(),
            kind: BackendKind::Cpu,
            adapter: format!("flex (pure-Rust CPU, {} threads)", cpu_threads()),
            software: false,
        }
    }

    /// Whether this build has the wgpu backend (the `wgpu` cargo feature).
    pub const WGPU_BUILT: bool = cfg!(feature = "wgpu");

    /// The wgpu backend on the default adapter. The adapter is acquired once per process;
    /// later calls return the same device (or the same error).
    #[cfg(not(feature = "wgpu"))]
    pub fn wgpu() -> Result<Self, ModelError> {
        Err(ModelError::Backend(
            "this build has no wgpu backend: build with `cargo build --release --workspace \
             --features wgpu` (see the README)"
                .into(),
        ))
    }

    /// The wgpu backend on the default adapter. The adapter is acquired once per process;
    /// later calls return the same device (or the same error).
    #[cfg(feature = "wgpu")]
    pub fn wgpu() -> Result<Self, ModelError> {
        use burn::tensor::wgpu::wgpu;
        use std::sync::OnceLock;
        static WGPU: OnceLock<Result<Compute, String>> = OnceLock::new();
        WGPU.get_or_init(|| {
            let (device, setup) = Device::wgpu_options()
                .init_with_setup()
                .map_err(|e| format!("no wgpu adapter: {e}"))?;
            let info = setup.adapter.get_info();
            Ok(Compute {
                device,
                kind: BackendKind::Wgpu,
                adapter: format!("{} via {:?}", info.name, info.backend),
                software: info.device_type == wgpu::DeviceType::Cpu,
            })
        })
        .clone()
        .map_err(ModelError::Backend)
    }

    /// The requested backend, or by default wgpu if a hardware adapter is found and the CPU
    /// otherwise. A software adapter (Mesa's llvmpipe) runs these models far slower than
    /// the CPU backend, so the default skips it; `Some(Wgpu)` still uses it. The second
    /// value is a notice to show the user when falling back. A build without the wgpu
    /// backend uses the CPU by default, without a notice.
    pub fn select(requested: Option<BackendKind>) -> Result<(Self, Option<String>), ModelError> {
        match requested {
            Some(BackendKind::Cpu) => Ok((Self::cpu(), None)),
            Some(BackendKind::Wgpu) => Ok((Self::wgpu()?, None)),
            None if !Self::WGPU_BUILT => Ok((Self::cpu(), None)),
            None => match Self::wgpu() {
                Ok(c) if c.software => Ok((
                    Self::cpu(),
                    Some(format!(
                        "the wgpu adapter is a software renderer ({}); using the CPU \
                         backend, which is faster here (--backend wgpu forces it)",
                        c.adapter
                    )),
                )),
                Ok(c) => Ok((c, None)),
                Err(e) => Ok((Self::cpu(), Some(format!("{e}; using the CPU backend")))),
            },
        }
    }
}

fn cpu_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
