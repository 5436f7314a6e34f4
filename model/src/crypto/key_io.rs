//! Storing a [`ModelKey`] inside a Veil container (the client bundle).

use nalgebra::DMatrix;
use serde::{Deserialize, Serialize};

use super::key::{HeadKey, KeyOptions, KeyShape, LayerKey, ModelKey, KEY_VERSION};
use crate::container::{Container, ContainerWriter};
use crate::ModelError;

/// What the container header records about the key (no secret material).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyMeta {
    pub version: u32,
    pub shape: KeyShape,
    pub options: KeyOptions,
    pub fingerprint: String,
}

fn rows(m: &DMatrix<f64>) -> Vec<f64> {
    m.transpose().iter().copied().collect()
}

/// Add the key's tensors under `key.` and return its header record.
pub fn write_key(key: &ModelKey, w: &mut ContainerWriter) -> KeyMeta {
    let s = key.shape;
    let (h, d) = (s.head_dim, s.d_model);
    w.add_f64("key.q", &[d, d], &rows(&key.q));
    for (l, lk) in key.layers.iter().enumerate() {
        for (g, hk) in lk.heads.iter().enumerate() {
            let p = format!("key.blk.{l}.head.{g}");
            w.add_f64(&format!("{p}.rope_scale"), &[h / 2], &hk.rope_scale);
            w.add_f64(&format!("{p}.rope_angle"), &[h / 2], &hk.rope_angle);
            w.add_f64(&format!("{p}.c_u"), &[h, h], &rows(&hk.c_u));
            w.add_f64(&format!("{p}.c_sigma"), &[h], &hk.c_sigma);
            w.add_f64(&format!("{p}.c_v"), &[h, h], &rows(&hk.c_v));
            if s.qk_norm {
                w.add_f64(&format!("{p}.q_norm_angle"), &[h / 2], &hk.q_norm_angle);
                w.add_f64(&format!("{p}.k_norm_angle"), &[h / 2], &hk.k_norm_angle);
            }
        }
        w.add_u32(&format!("key.blk.{l}.mlp_perm"), &[s.d_ff], &lk.mlp_perm);
        w.add_f64(&format!("key.blk.{l}.mlp_scale"), &[s.d_ff], &lk.mlp_scale);
        w.add_u32(
            &format!("key.blk.{l}.head_perm"),
            &[s.n_kv_heads],
            &lk.head_perm,
        );
    }
    KeyMeta {
        version: key.version,
        shape: s,
        options: key.options,
        fingerprint: key.fingerprint(),
    }
}

fn f64s(c: &Container, name: &str, n: usize) -> Result<Vec<f64>, ModelError> {
    let (shape, v) = c.f64(name)?;
    if shape.iter().product::<usize>() != n {
        return Err(ModelError::Key(format!(
            "key tensor `{name}` has shape {shape:?}"
        )));
    }
    Ok(v)
}

fn matrix(c: &Container, name: &str, n: usize) -> Result<DMatrix<f64>, ModelError> {
    Ok(DMatrix::from_row_slice(n, n, &f64s(c, name, n * n)?))
}

fn perm(c: &Container, name: &str, n: usize) -> Result<Vec<u32>, ModelError> {
    let (_, v) = c.u32(name)?;
    let mut seen = vec![false; n];
    for &p in &v {
        match seen.get_mut(p as usize) {
            Some(s) if !*s => *s = true,
            _ => {
                return Err(ModelError::Key(format!(
                    "`{name}` is not a permutation of {n}"
                )))
            }
        }
    }
    if v.len() != n {
        return Err(ModelError::Key(format!(
            "`{name}` is not a permutation of {n}"
        )));
    }
    Ok(v)
}

/// A head's pre-norm rotation angles: stored only for models with per-head norms.
fn norm_angle(c: &Container, name: &str, s: KeyShape) -> Result<Vec<f64>, ModelError> {
    if s.qk_norm {
        f64s(c, name, s.head_dim / 2)
    } else {
        Ok(Vec::new())
    }
}

/// Read the key back and check it against its recorded fingerprint.
pub fn read_key(c: &Container, meta: &KeyMeta) -> Result<ModelKey, ModelError> {
    if meta.version != KEY_VERSION {
        return Err(ModelError::Key(format!(
            "key version {} is not supported (this build reads {KEY_VERSION})",
            meta.version
        )));
    }
    let s = meta.shape;
    let h = s.head_dim;
    let mut layers = Vec::with_capacity(s.n_layers);
    for l in 0..s.n_layers {
        let mut heads = Vec::with_capacity(s.n_kv_heads);
        for g in 0..s.n_kv_heads {
            let p = format!("key.blk.{l}.head.{g}");
            heads.push(HeadKey {
                rope_scale: f64s(c, &format!("{p}.rope_scale"), h / 2)?,
                rope_angle: f64s(c, &format!("{p}.rope_angle"), h / 2)?,
                c_u: matrix(c, &format!("{p}.c_u"), h)?,
                c_sigma: f64s(c, &format!("{p}.c_sigma"), h)?,
                c_v: matrix(c, &format!("{p}.c_v"), h)?,
                q_norm_angle: norm_angle(c, &format!("{p}.q_norm_angle"), s)?,
                k_norm_angle: norm_angle(c, &format!("{p}.k_norm_angle"), s)?,
            });
        }
        layers.push(LayerKey {
            heads,
            mlp_perm: perm(c, &format!("key.blk.{l}.mlp_perm"), s.d_ff)?,
            mlp_scale: f64s(c, &format!("key.blk.{l}.mlp_scale"), s.d_ff)?,
            head_perm: perm(c, &format!("key.blk.{l}.head_perm"), s.n_kv_heads)?,
        });
    }
    let key = ModelKey {
        version: meta.version,
        shape: s,
        options: meta.options,
        q: matrix(c, "key.q", s.d_model)?,
        layers,
    };
    if key.fingerprint() != meta.fingerprint {
        return Err(ModelError::Key(
            "the stored key does not match its fingerprint".into(),
        ));
    }
    Ok(key)
}
