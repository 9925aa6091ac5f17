//! `TreeEnsembleClassifier` and `TreeEnsembleRegressor`.
//!
//! All trees of an ensemble live in one set of flat arrays (struct of arrays,
//! indexed by a global node number). For a leaf, `hi`/`lo` hold the range of
//! its weights in `weight_target` / `weight_value`, so a leaf's contribution
//! is one contiguous slice.

use std::collections::HashMap;

use super::ml::Labels;
use super::{NodeCtx, Op, PostTransform, arg, argmax, as_matrix, sigmoid};
use crate::model::ModelError;
use crate::model::tensor::Tensor;

const LEAF: u8 = 0;
const LEQ: u8 = 1;
const LT: u8 = 2;
const GTE: u8 = 3;
const GT: u8 = 4;
const EQ: u8 = 5;
const NEQ: u8 = 6;
/// Set on a branch whose NaN input goes to the true child.
const MISSING_TRUE: u8 = 0x80;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Aggregate {
    Sum,
    Average,
    Min,
    Max,
}

#[derive(Debug)]
enum Kind {
    Classifier {
        labels: Labels,
        /// Two classes but weights for only one class id: the summed weight
        /// scores the second class (skl2onnx's binary convention).
        binary: bool,
        weights_all_positive: bool,
    },
    Regressor {
        aggregate: Aggregate,
    },
}

#[derive(Debug)]
pub struct TreeEnsemble {
    mode: Vec<u8>,
    feature: Vec<u32>,
    threshold: Vec<f32>,
    /// True child for a branch; start of the weight range for a leaf.
    lo: Vec<u32>,
    /// False child for a branch; end of the weight range for a leaf.
    hi: Vec<u32>,
    roots: Vec<u32>,
    weight_target: Vec<u32>,
    weight_value: Vec<f32>,
    base: Vec<f32>,
    targets: usize,
    /// Smallest row width the trees can read.
    min_features: usize,
    post: PostTransform,
    kind: Kind,
}

impl TreeEnsemble {
    pub fn classifier(ctx: &NodeCtx<'_>) -> Result<Self, ModelError> {
        let labels = Labels::parse(ctx, "classlabels_int64s")?;
        let targets = labels.len();
        let mut t = Self::build(ctx, "class", targets)?;
        let mut ids: Vec<u32> = t.weight_target.clone();
        ids.sort_unstable();
        ids.dedup();
        let binary = targets == 2 && ids.len() == 1;
        let weights_all_positive = t.weight_value.iter().all(|&w| w >= 0.0);
        if !(t.base.is_empty() || t.base.len() == targets || (binary && t.base.len() == 1)) {
            return Err(ctx.invalid(
                "base_values",
                format!("{} base values for {targets} classes", t.base.len()),
            ));
        }
        if binary {
            // The single score accumulates in slot 0 whatever its class id.
            t.weight_target.iter_mut().for_each(|c| *c = 0);
        }
        t.kind = Kind::Classifier {
            labels,
            binary,
            weights_all_positive,
        };
        Ok(t)
    }

    pub fn regressor(ctx: &NodeCtx<'_>) -> Result<Self, ModelError> {
        let targets = usize::try_from(ctx.int("n_targets", 1)?)
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| ctx.invalid("n_targets", "must be positive"))?;
        let aggregate = match ctx.string("aggregate_function", "SUM")?.as_str() {
            "SUM" => Aggregate::Sum,
            "AVERAGE" => Aggregate::Average,
            "MIN" => Aggregate::Min,
            "MAX" => Aggregate::Max,
            other => {
                return Err(ctx.invalid("aggregate_function", format!("unknown value {other:?}")));
            }
        };
        let mut t = Self::build(ctx, "target", targets)?;
        if !(t.base.is_empty() || t.base.len() == targets) {
            return Err(ctx.invalid(
                "base_values",
                format!("{} base values for {targets} targets", t.base.len()),
            ));
        }
        t.kind = Kind::Regressor { aggregate };
        Ok(t)
    }

    /// Reads the node and weight attributes (`{prefix}_ids`, ...), checks
    /// every reference and that each tree is acyclic.
    fn build(ctx: &NodeCtx<'_>, prefix: &str, targets: usize) -> Result<Self, ModelError> {
        let tree_ids = ctx.ints("nodes_treeids")?;
        let node_ids = ctx.ints("nodes_nodeids")?;
        let n = tree_ids.len();
        if n == 0 {
            return Err(ctx.missing("nodes_treeids"));
        }
        let same = |name: &str, len: usize| {
            if len == n {
                Ok(())
            } else {
                Err(ctx.invalid(name, format!("{len} values for {n} nodes")))
            }
        };
        same("nodes_nodeids", node_ids.len())?;
        let features = ctx.ints("nodes_featureids")?;
        same("nodes_featureids", features.len())?;
        let values = ctx.floats_or_tensor("nodes_values")?.unwrap_or_default();
        same("nodes_values", values.len())?;
        let modes = ctx.opt_strings("nodes_modes")?.unwrap_or_default();
        same("nodes_modes", modes.len())?;
        let trues = ctx.ints("nodes_truenodeids")?;
        same("nodes_truenodeids", trues.len())?;
        let falses = ctx.ints("nodes_falsenodeids")?;
        same("nodes_falsenodeids", falses.len())?;
        let missing = ctx.ints("nodes_missing_value_tracks_true")?;
        if !missing.is_empty() {
            same("nodes_missing_value_tracks_true", missing.len())?;
        }

        let mut index: HashMap<(i64, i64), u32> = HashMap::with_capacity(n);
        let mut roots: Vec<u32> = Vec::new();
        let mut seen_trees: HashMap<i64, ()> = HashMap::new();
        for i in 0..n {
            let key = (tree_ids[i], node_ids[i]);
            let gi =
                u32::try_from(i).map_err(|_| ctx.invalid("nodes_nodeids", "too many nodes"))?;
            if index.insert(key, gi).is_some() {
                return Err(ctx.invalid(
                    "nodes_nodeids",
                    format!("node {} of tree {} is defined twice", key.1, key.0),
                ));
            }
            // A tree's root is its first node listed (node id 0 in practice).
            if seen_trees.insert(tree_ids[i], ()).is_none() {
                roots.push(gi);
            }
        }

        let mut mode = Vec::with_capacity(n);
        let mut feature = Vec::with_capacity(n);
        let mut lo = vec![0u32; n];
        let mut hi = vec![0u32; n];
        let mut min_features = 0usize;
        for i in 0..n {
            let m = match modes[i].as_str() {
                "LEAF" => LEAF,
                "BRANCH_LEQ" => LEQ,
                "BRANCH_LT" => LT,
                "BRANCH_GTE" => GTE,
                "BRANCH_GT" => GT,
                "BRANCH_EQ" => EQ,
                "BRANCH_NEQ" => NEQ,
                other => return Err(ctx.invalid("nodes_modes", format!("unknown mode {other:?}"))),
            };
            let track = missing.get(i).copied().unwrap_or(0) != 0;
            mode.push(if m != LEAF && track {
                m | MISSING_TRUE
            } else {
                m
            });
            let f = u32::try_from(features[i]).map_err(|_| {
                ctx.invalid(
                    "nodes_featureids",
                    format!("invalid feature {}", features[i]),
                )
            })?;
            feature.push(f);
            if m != LEAF {
                min_features = min_features.max(f as usize + 1);
                let child = |id: i64, name: &str| {
                    index.get(&(tree_ids[i], id)).copied().ok_or_else(|| {
                        ctx.invalid(
                            name,
                            format!(
                                "node {} of tree {} points to missing node {id}",
                                node_ids[i], tree_ids[i]
                            ),
                        )
                    })
                };
                lo[i] = child(trues[i], "nodes_truenodeids")?;
                hi[i] = child(falses[i], "nodes_falsenodeids")?;
            }
        }

        // Weights, grouped by leaf.
        let w_trees = ctx.ints(&format!("{prefix}_treeids"))?;
        let w_nodes = ctx.ints(&format!("{prefix}_nodeids"))?;
        let w_ids = ctx.ints(&format!("{prefix}_ids"))?;
        let w_vals = ctx
            .floats_or_tensor(&format!("{prefix}_weights"))?
            .unwrap_or_default();
        let m = w_trees.len();
        if w_nodes.len() != m || w_ids.len() != m || w_vals.len() != m {
            return Err(ctx.invalid(
                &format!("{prefix}_weights"),
                format!(
                    "{prefix}_treeids, _nodeids, _ids and _weights have {m}, {}, {} and {} values",
                    w_nodes.len(),
                    w_ids.len(),
                    w_vals.len()
                ),
            ));
        }
        let mut entries: Vec<(u32, u32, f32)> = Vec::with_capacity(m);
        for j in 0..m {
            let node = index
                .get(&(w_trees[j], w_nodes[j]))
                .copied()
                .ok_or_else(|| {
                    ctx.invalid(
                        &format!("{prefix}_nodeids"),
                        format!(
                            "weight for missing node {} of tree {}",
                            w_nodes[j], w_trees[j]
                        ),
                    )
                })?;
            let target = usize::try_from(w_ids[j])
                .ok()
                .filter(|&t| t < targets)
                .ok_or_else(|| {
                    ctx.invalid(
                        &format!("{prefix}_ids"),
                        format!("id {} out of range for {targets} outputs", w_ids[j]),
                    )
                })?;
            entries.push((node, target as u32, w_vals[j]));
        }
        entries.sort_by_key(|e| e.0);
        let mut weight_target = Vec::with_capacity(m);
        let mut weight_value = Vec::with_capacity(m);
        let mut k = 0;
        for i in 0..n {
            let start = weight_target.len() as u32;
            while k < entries.len() && entries[k].0 as usize == i {
                weight_target.push(entries[k].1);
                weight_value.push(entries[k].2);
                k += 1;
            }
            if mode[i] == LEAF {
                lo[i] = start;
                hi[i] = weight_target.len() as u32;
            }
        }

        let ensemble = TreeEnsemble {
            mode,
            feature,
            threshold: values,
            lo,
            hi,
            roots,
            weight_target,
            weight_value,
            base: ctx.floats_or_tensor("base_values")?.unwrap_or_default(),
            targets,
            min_features,
            post: PostTransform::parse(ctx)?,
            kind: Kind::Regressor {
                aggregate: Aggregate::Sum,
            },
        };
        ensemble
            .check_acyclic()
            .map_err(|reason| ctx.invalid("nodes_truenodeids", reason))?;
        Ok(ensemble)
    }

    /// Every path from a root must end at a leaf: walk each tree once,
    /// refusing a node reached twice (a cycle or a shared subtree).
    fn check_acyclic(&self) -> Result<(), String> {
        let n = self.mode.len();
        let mut seen = vec![false; n];
        let mut stack = Vec::new();
        for &root in &self.roots {
            stack.push(root);
            while let Some(i) = stack.pop() {
                let i = i as usize;
                if seen[i] {
                    return Err(format!(
                        "node index {i} is reached twice (cycle or shared subtree)"
                    ));
                }
                seen[i] = true;
                if self.mode[i] != LEAF {
                    stack.push(self.lo[i]);
                    stack.push(self.hi[i]);
                }
            }
        }
        Ok(())
    }

    /// The leaf reached by `row` from `root`.
    #[inline]
    fn leaf(&self, row: &[f32], root: u32) -> usize {
        let mut i = root as usize;
        loop {
            let m = self.mode[i];
            if m == LEAF {
                return i;
            }
            let x = row[self.feature[i] as usize];
            let t = self.threshold[i];
            let go_true = match m & !MISSING_TRUE {
                LEQ => x <= t,
                LT => x < t,
                GTE => x >= t,
                GT => x > t,
                EQ => x == t,
                _ => x != t,
            } || (m & MISSING_TRUE != 0 && x.is_nan());
            i = if go_true { self.lo[i] } else { self.hi[i] } as usize;
        }
    }

    #[inline]
    fn leaf_weights(&self, leaf: usize) -> (&[u32], &[f32]) {
        let (a, b) = (self.lo[leaf] as usize, self.hi[leaf] as usize);
        (&self.weight_target[a..b], &self.weight_value[a..b])
    }

    /// Raw aggregated scores, row-major `[rows, targets]`. Sums walk tree by
    /// tree over all rows, so a tree's nodes stay in cache across the batch.
    fn scores(&self, v: &[f32], rows: usize, cols: usize, aggregate: Aggregate) -> Vec<f64> {
        let k = self.targets;
        let mut acc = vec![0f64; rows * k];
        match aggregate {
            Aggregate::Sum | Aggregate::Average => {
                for &root in &self.roots {
                    for (r, row) in v.chunks_exact(cols).take(rows).enumerate() {
                        let (ids, ws) = self.leaf_weights(self.leaf(row, root));
                        let out = &mut acc[r * k..(r + 1) * k];
                        for (&c, &w) in ids.iter().zip(ws) {
                            out[c as usize] += f64::from(w);
                        }
                    }
                }
                if aggregate == Aggregate::Average && !self.roots.is_empty() {
                    let n = self.roots.len() as f64;
                    acc.iter_mut().for_each(|a| *a /= n);
                }
            }
            Aggregate::Min | Aggregate::Max => {
                let mut seen = vec![false; k];
                for (r, row) in v.chunks_exact(cols).take(rows).enumerate() {
                    seen.iter_mut().for_each(|s| *s = false);
                    let out = &mut acc[r * k..(r + 1) * k];
                    for &root in &self.roots {
                        let (ids, ws) = self.leaf_weights(self.leaf(row, root));
                        for (&c, &w) in ids.iter().zip(ws) {
                            let (c, w) = (c as usize, f64::from(w));
                            if !seen[c] || (aggregate == Aggregate::Min) == (w < out[c]) {
                                out[c] = w;
                                seen[c] = true;
                            }
                        }
                    }
                }
            }
        }
        acc
    }
}

impl Op for TreeEnsemble {
    fn run<'a>(
        &self,
        inputs: &[Option<&Tensor<'a>>],
        out: &mut Vec<Tensor<'a>>,
    ) -> Result<(), String> {
        let x = arg(inputs, 0)?;
        let (rows, cols) = as_matrix(x);
        if cols < self.min_features {
            return Err(format!(
                "input has {cols} features, the trees read feature {}",
                self.min_features - 1
            ));
        }
        let v = x.to_f32().ok_or("string input")?;
        if rows > 0 && cols == 0 {
            return Err("input has no features".into());
        }
        let aggregate = match self.kind {
            Kind::Regressor { aggregate } => aggregate,
            Kind::Classifier { .. } => Aggregate::Sum,
        };
        let acc = self.scores(&v, rows, cols, aggregate);
        let k = self.targets;
        let base = |t: usize| self.base.get(t).copied().map_or(0.0, f64::from);
        match &self.kind {
            Kind::Regressor { .. } => {
                let mut y: Vec<f32> = Vec::with_capacity(rows * k);
                for row in acc.chunks_exact(k) {
                    let start = y.len();
                    y.extend(row.iter().enumerate().map(|(t, a)| (a + base(t)) as f32));
                    self.post.apply(&mut y[start..]);
                }
                out.push(Tensor::f32(vec![rows, k], y));
            }
            Kind::Classifier {
                labels,
                binary,
                weights_all_positive,
            } => {
                let classes = labels.len();
                let mut y = Vec::with_capacity(rows * classes);
                let mut picks = Vec::with_capacity(rows);
                for row in acc.chunks_exact(k) {
                    if *binary {
                        let s = (row[0] + base(0)) as f32;
                        let positive = if *weights_all_positive {
                            s > 0.5
                        } else {
                            s > 0.0
                        };
                        picks.push(usize::from(positive));
                        match self.post {
                            PostTransform::Logistic => {
                                let p = sigmoid(s);
                                y.extend([1.0 - p, p]);
                            }
                            PostTransform::None if *weights_all_positive => y.extend([1.0 - s, s]),
                            PostTransform::None => y.extend([-s, s]),
                            other => {
                                let mut pair = [-s, s];
                                other.apply(&mut pair);
                                y.extend(pair);
                            }
                        }
                    } else {
                        let start = y.len();
                        y.extend(row.iter().enumerate().map(|(c, a)| (a + base(c)) as f32));
                        picks.push(argmax(&y[start..]));
                        self.post.apply(&mut y[start..]);
                    }
                }
                out.push(labels.tensor(&picks));
                out.push(Tensor::f32(vec![rows, classes], y));
            }
        }
        Ok(())
    }
}
