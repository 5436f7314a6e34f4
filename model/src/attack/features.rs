//! What a node observes that the key does not hide, position by position: the norms of the
//! residual-stream vectors it adds to and reads, every head's attention scores (the key
//! permutes heads but keeps each head's scores), and the MLP gate pre-activations (the key
//! permutes units, so their sorted values are kept). The node computes them on its own
//! shard; an attacker computes the same quantities with a public model on a guessed text and
//! compares ([`Features::distance`]).

use std::collections::BTreeMap;

use burn::tensor::Tensor;

use crate::nn::{tensor_to_vec, Probe, Site};

/// Residual-stream sites whose row norms the key keeps.
const NORM_SITES: [Site; 5] = [
    Site::BlockInput,
    Site::AttnOut,
    Site::AfterAttn,
    Site::MlpOut,
    Site::BlockOutput,
];

/// One layer's observables at one position.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerFeatures {
    /// Norms at [`NORM_SITES`].
    pub norms: [f32; 5],
    /// Per head (in the node's head order), the scores of this position's query against the
    /// keys of positions `0..=i`.
    pub heads: Vec<Vec<f32>>,
    /// Gate pre-activations, sorted.
    pub gate: Vec<f32>,
}

/// Observables of one position over the layers probed.
#[derive(Debug, Clone, PartialEq)]
pub struct Features {
    pub layers: Vec<LayerFeatures>,
}

impl Features {
    /// How badly `self` (a guess) explains `observed`: a sum of squared relative errors,
    /// one term per norm, one for the sorted gate values and one per head (heads matched
    /// greedily, since the key permutes them), per layer.
    pub fn distance(&self, observed: &Features) -> f64 {
        self.layers
            .iter()
            .zip(&observed.layers)
            .map(|(g, o)| {
                let norms: f64 = g
                    .norms
                    .iter()
                    .zip(&o.norms)
                    .map(|(a, b)| rel2(&[*a], &[*b]))
                    .sum();
                norms + rel2(&g.gate, &o.gate) + heads_cost(&g.heads, &o.heads)
            })
            .sum()
    }
}

/// `|a - b|² / |b|²` (with a floor on `|b|²`).
fn rel2(a: &[f32], b: &[f32]) -> f64 {
    let mut num = 0.0;
    let mut den = 0.0;
    for (x, y) in a.iter().zip(b) {
        num += (f64::from(*x) - f64::from(*y)).powi(2);
        den += f64::from(*y).powi(2);
    }
    num / den.max(1e-6 * b.len().max(1) as f64)
}

/// Sum over heads of the relative error between matched heads, matched greedily (cheapest
/// pair first).
fn heads_cost(guess: &[Vec<f32>], observed: &[Vec<f32>]) -> f64 {
    let n = guess.len().min(observed.len());
    let mut pairs: Vec<(f64, usize, usize)> = Vec::with_capacity(n * n);
    for (i, g) in guess.iter().enumerate().take(n) {
        for (j, o) in observed.iter().enumerate().take(n) {
            pairs.push((rel2(g, o), i, j));
        }
    }
    pairs.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (mut used_g, mut used_o) = (vec![false; n], vec![false; n]);
    let mut total = 0.0;
    for (c, i, j) in pairs {
        if !used_g[i] && !used_o[j] {
            used_g[i] = true;
            used_o[j] = true;
            total += c;
        }
    }
    total
}

/// Recorded `(cols, data)` per call, by layer and site.
type Recorded = BTreeMap<(usize, Site), Vec<(usize, Vec<f32>)>>;

/// A probe that keeps, for layers `first..first + layers`, the tensors the features are
/// made of, as host rows in call order.
pub struct FeatureProbe {
    first: usize,
    layers: usize,
    seen: Recorded,
    error: Option<String>,
}

impl FeatureProbe {
    pub fn new(first: usize, layers: usize) -> Self {
        FeatureProbe {
            first,
            layers,
            seen: BTreeMap::new(),
            error: None,
        }
    }

    fn wanted(site: Site) -> bool {
        NORM_SITES.contains(&site) || matches!(site, Site::Scores | Site::Gate)
    }

    /// Features of each of `segments` sequences (lengths `t_i`, starting at position
    /// `start_i`) run through one forward call with `heads` query heads. Returns, per
    /// segment, one [`Features`] per new row.
    pub fn features(
        &self,
        segments: &[(usize, usize)],
        heads: usize,
    ) -> Result<Vec<Vec<Features>>, String> {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        let mut out: Vec<Vec<Features>> = segments
            .iter()
            .map(|&(t, _)| {
                (0..t)
                    .map(|_| Features {
                        layers: Vec::with_capacity(self.layers),
                    })
                    .collect()
            })
            .collect();
        for layer in self.first..self.first + self.layers {
            let get = |site: Site| {
                self.seen
                    .get(&(layer, site))
                    .ok_or_else(|| format!("layer {layer}: nothing recorded at {site:?}"))
            };
            let norm_tables: Vec<&(usize, Vec<f32>)> = NORM_SITES
                .iter()
                .map(|s| get(*s).and_then(|v| v.first().ok_or_else(|| "empty".to_string())))
                .collect::<Result<_, _>>()?;
            let gate = get(Site::Gate)?
                .first()
                .ok_or_else(|| "no gate".to_string())?;
            let scores = get(Site::Scores)?;
            if scores.len() != segments.len() {
                return Err(format!(
                    "layer {layer}: {} score tables for {} sequences",
                    scores.len(),
                    segments.len()
                ));
            }
            let mut row = 0;
            for ((&(t, start), (s_cols, s_data)), rows) in
                segments.iter().zip(scores).zip(out.iter_mut())
            {
                for (i, features) in rows.iter_mut().enumerate() {
                    let r = row + i;
                    let mut norms = [0f32; 5];
                    for (n, (cols, data)) in norms.iter_mut().zip(&norm_tables) {
                        let v = &data[r * cols..(r + 1) * cols];
                        *n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
                    }
                    let (g_cols, g_data) = gate;
                    let mut g = g_data[r * g_cols..(r + 1) * g_cols].to_vec();
                    g.sort_by(f32::total_cmp);
                    let seen = start + i + 1;
                    let heads = (0..heads)
                        .map(|h| {
                            let at = (h * t + i) * s_cols;
                            s_data[at..at + seen].to_vec()
                        })
                        .collect();
                    features.layers.push(LayerFeatures {
                        norms,
                        heads,
                        gate: g,
                    });
                }
                row += t;
            }
        }
        Ok(out)
    }
}

impl Probe for FeatureProbe {
    fn active(&self) -> bool {
        true
    }

    fn record(&mut self, layer: usize, site: Site, value: Tensor<2>) {
        if layer < self.first || layer >= self.first + self.layers || !Self::wanted(site) {
            return;
        }
        let [_, cols] = value.dims();
        match tensor_to_vec(value) {
            Ok(data) => self
                .seen
                .entry((layer, site))
                .or_default()
                .push((cols, data)),
            Err(e) => self.error = Some(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(norm: f32, heads: Vec<Vec<f32>>, gate: Vec<f32>) -> Features {
        Features {
            layers: vec![LayerFeatures {
                norms: [norm; 5],
                heads,
                gate,
            }],
        }
    }

    #[test]
    fn distance_is_zero_for_the_same_features_whatever_the_head_order() {
        let a = layer(2.0, vec![vec![1.0, 2.0], vec![5.0, -1.0]], vec![0.0, 1.0]);
        let b = layer(2.0, vec![vec![5.0, -1.0], vec![1.0, 2.0]], vec![0.0, 1.0]);
        assert_eq!(a.distance(&b), 0.0);
        let c = layer(2.2, vec![vec![5.0, -1.0], vec![1.0, 2.5]], vec![0.0, 1.0]);
        assert!(c.distance(&a) > 0.0);
        let far = layer(4.0, vec![vec![0.0, 0.0], vec![0.0, 0.0]], vec![3.0, 3.0]);
        assert!(far.distance(&a) > c.distance(&a));
    }
}
