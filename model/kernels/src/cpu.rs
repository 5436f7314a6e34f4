//! Which SIMD instruction sets the kernels may use, decided once at run time.
//!
//! The best set the CPU has is used unless `VEIL_KERNELS` names another (`portable`,
//! `avx2`, `avx512vnni`, `neon`): benchmarks compare them in one run and tests check each
//! against the portable reference.

use std::sync::OnceLock;

/// A family of kernels, from the portable reference up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Isa {
    /// Plain Rust, any CPU: the reference every other path is tested against.
    Portable,
    /// x86-64 AVX2 with FMA and F16C.
    Avx2,
    /// x86-64 AVX-512 with VNNI (8-bit dot products), on 256-bit registers.
    Avx512Vnni,
    /// aarch64 NEON with the dot-product extension.
    Neon,
}

impl Isa {
    pub fn name(&self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2",
            Isa::Avx512Vnni => "avx512vnni",
            Isa::Neon => "neon",
        }
    }

    pub fn parse(s: &str) -> Option<Isa> {
        Some(match s {
            "portable" => Isa::Portable,
            "avx2" => Isa::Avx2,
            "avx512vnni" | "vnni" => Isa::Avx512Vnni,
            "neon" => Isa::Neon,
            _ => return None,
        })
    }

    /// Every kernel family this CPU can run, best last.
    pub fn available() -> Vec<Isa> {
        let mut out = vec![Isa::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
                && std::arch::is_x86_feature_detected!("f16c")
            {
                out.push(Isa::Avx2);
                if std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                    && std::arch::is_x86_feature_detected!("avx512vnni")
                {
                    out.push(Isa::Avx512Vnni);
                }
            }
        }
        #[cfg(target_arch = "aarch64")]
        {
            if std::arch::is_aarch64_feature_detected!("neon")
                && std::arch::is_aarch64_feature_detected!("dotprod")
            {
                out.push(Isa::Neon);
            }
        }
        out
    }

    /// The kernels in use: `VEIL_KERNELS` if it names one this CPU has, else the best.
    pub fn current() -> Isa {
        static CURRENT: OnceLock<Isa> = OnceLock::new();
        *CURRENT.get_or_init(|| {
            let available = Isa::available();
            let best = *available.last().unwrap_or(&Isa::Portable);
            match std::env::var("VEIL_KERNELS")
                .ok()
                .as_deref()
                .map(Isa::parse)
            {
                Some(Some(asked)) if available.contains(&asked) => asked,
                _ => best,
            }
        })
    }
}

/// Whether this CPU can run `isa`'s kernels (detected once; a cheap check for hot paths).
pub fn has(isa: Isa) -> bool {
    static AVAILABLE: OnceLock<Vec<Isa>> = OnceLock::new();
    AVAILABLE.get_or_init(Isa::available).contains(&isa)
}

impl std::fmt::Display for Isa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
