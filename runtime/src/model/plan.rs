//! Compiling a graph into a flat execution plan, and running it.
//!
//! At load time nodes are sorted topologically, every value name is resolved
//! to a slot index (or a constant), nodes whose inputs are all constant are
//! evaluated once, and each slot gets a step after which it is dropped. A
//! call then walks `steps` in order with no name lookups.

use std::collections::{HashMap, HashSet};

use super::ops::{self, NodeCtx, Op, Opsets};
use super::proto::{DimensionValue, GraphProto, ModelProto, ValueInfoProto};
use super::tensor::{DType, Tensor, from_proto};
use super::{ClassLabels, InputKind, InputSpec, ModelError};

/// Where a step reads a value from.
#[derive(Debug, Clone, Copy)]
enum Ref {
    Slot(usize),
    Const(usize),
}

#[derive(Debug)]
struct Step {
    op: Box<dyn Op>,
    args: Vec<Option<Ref>>,
    outs: Vec<Option<usize>>,
    /// Slots no later step reads.
    free: Vec<usize>,
    node: String,
    op_type: String,
}

/// One graph input: its slot and the shape after the batch dimension.
#[derive(Debug)]
pub struct PlanInput {
    pub slot: usize,
    pub tail: Vec<usize>,
}

#[derive(Debug)]
pub struct Plan {
    slots: usize,
    pub inputs: Vec<PlanInput>,
    consts: Vec<Tensor<'static>>,
    steps: Vec<Step>,
    label: Ref,
    probabilities: Ref,
}

/// What loading a model yields.
pub struct Compiled {
    pub plan: Plan,
    pub specs: Vec<InputSpec>,
    pub classes: ClassLabels,
}

fn node_name(graph: &GraphProto, i: usize) -> String {
    let n = &graph.node[i];
    if n.name.is_empty() {
        format!("#{i} {}", n.op_type)
    } else {
        n.name.clone()
    }
}

fn input_spec(vi: &ValueInfoProto) -> Result<(InputSpec, Vec<usize>), ModelError> {
    let unsupported = |reason: String| ModelError::UnsupportedInput {
        name: vi.name.clone(),
        reason,
    };
    let tensor = vi
        .r#type
        .as_ref()
        .and_then(|t| t.tensor_type.as_ref())
        .ok_or_else(|| unsupported("only tensor inputs are supported".into()))?;
    let kind = match DType::from_onnx(tensor.elem_type) {
        Some(DType::F32) => InputKind::F32,
        Some(DType::F64) => InputKind::F64,
        Some(DType::I64) => InputKind::I64,
        Some(DType::Str) => InputKind::Str,
        None => {
            return Err(unsupported(format!(
                "element type {} is not supported",
                tensor.elem_type
            )));
        }
    };
    let tail = match &tensor.shape {
        // No shape declared: one value per row.
        None => vec![1],
        Some(shape) if shape.dim.is_empty() => {
            return Err(unsupported("scalar inputs are not supported".into()));
        }
        Some(shape) => shape.dim[1..]
            .iter()
            .map(|d| match d.value {
                Some(DimensionValue::DimValue(v)) if v >= 0 => Ok(v as usize),
                Some(DimensionValue::DimValue(v)) => {
                    Err(unsupported(format!("negative dimension {v}")))
                }
                // A symbolic trailing dimension: taken as 1 (one value per row).
                _ => Ok(1),
            })
            .collect::<Result<Vec<_>, _>>()?,
    };
    let width = tail.iter().product();
    Ok((
        InputSpec {
            name: vi.name.clone(),
            kind,
            width,
        },
        tail,
    ))
}

fn declared_dtype(vi: &ValueInfoProto) -> Option<DType> {
    vi.r#type
        .as_ref()
        .and_then(|t| t.tensor_type.as_ref())
        .and_then(|t| DType::from_onnx(t.elem_type))
}

pub fn compile(model: &ModelProto) -> Result<Compiled, ModelError> {
    let graph = model.graph.as_ref().ok_or(ModelError::MissingGraph)?;
    let mut opsets = Opsets { onnx: 13, ml: 1 };
    for o in &model.opset_import {
        match o.domain.as_str() {
            "" | "ai.onnx" => opsets.onnx = o.version,
            ops::ML => opsets.ml = o.version,
            _ => {}
        }
    }

    let mut names: HashMap<&str, Ref> = HashMap::new();
    let mut consts: Vec<Tensor<'static>> = Vec::with_capacity(graph.initializer.len());
    for t in &graph.initializer {
        let tensor = from_proto(t).map_err(|reason| ModelError::InvalidTensor {
            name: t.name.clone(),
            reason,
        })?;
        if names.insert(&t.name, Ref::Const(consts.len())).is_some() {
            return Err(ModelError::DuplicateValue {
                value: t.name.clone(),
            });
        }
        consts.push(tensor);
    }

    let mut slots = 0usize;
    let mut specs = Vec::new();
    let mut inputs = Vec::new();
    for vi in &graph.input {
        // Older IR versions list initializers among the inputs as well.
        if names.contains_key(vi.name.as_str()) {
            continue;
        }
        let (spec, tail) = input_spec(vi)?;
        names.insert(&vi.name, Ref::Slot(slots));
        inputs.push(PlanInput { slot: slots, tail });
        specs.push(spec);
        slots += 1;
    }

    let order = topological_order(graph, &names)?;

    let mut steps: Vec<Step> = Vec::new();
    let mut classes = None;
    let mut out = Vec::new();
    for &i in &order {
        let node = &graph.node[i];
        let ctx = NodeCtx {
            node,
            name: node_name(graph, i),
            opsets,
        };
        let op = ops::build(&ctx)?;
        if let Some(labels) = ops::classifier_labels(&ctx)? {
            classes = Some(labels);
        }
        let args = node
            .input
            .iter()
            .map(|name| {
                if name.is_empty() {
                    Ok(None)
                } else {
                    names.get(name.as_str()).copied().map(Some).ok_or_else(|| {
                        ModelError::UndefinedValue {
                            node: ctx.name.clone(),
                            value: name.clone(),
                        }
                    })
                }
            })
            .collect::<Result<Vec<_>, _>>()?;

        let constant = args.iter().all(|a| !matches!(a, Some(Ref::Slot(_))));
        let eval_error = |reason: String| ModelError::Eval {
            node: ctx.name.clone(),
            op: node.op_type.clone(),
            reason,
        };
        if constant {
            // Fold: evaluate once now, keep the results as constants.
            out.clear();
            {
                let refs: Vec<Option<&Tensor<'_>>> = args
                    .iter()
                    .map(|a| match a {
                        Some(Ref::Const(c)) => consts.get(*c),
                        _ => None,
                    })
                    .collect();
                op.run(&refs, &mut out).map_err(eval_error)?;
            }
            let produced: Vec<Tensor<'static>> = out.drain(..).map(into_owned).collect();
            for (name, t) in node.output.iter().zip(produced) {
                if name.is_empty() {
                    continue;
                }
                if names.insert(name, Ref::Const(consts.len())).is_some() {
                    return Err(ModelError::DuplicateValue {
                        value: name.clone(),
                    });
                }
                consts.push(t);
            }
            continue;
        }

        let mut outs = Vec::with_capacity(node.output.len());
        for name in &node.output {
            if name.is_empty() {
                outs.push(None);
                continue;
            }
            if names.insert(name, Ref::Slot(slots)).is_some() {
                return Err(ModelError::DuplicateValue {
                    value: name.clone(),
                });
            }
            outs.push(Some(slots));
            slots += 1;
        }
        steps.push(Step {
            op,
            args,
            outs,
            free: Vec::new(),
            node: ctx.name,
            op_type: node.op_type.clone(),
        });
    }

    let classes = classes.ok_or_else(|| ModelError::NotAClassifier {
        reason: "no LinearClassifier or TreeEnsembleClassifier node".into(),
    })?;
    if graph.output.len() < 2 {
        return Err(ModelError::NotAClassifier {
            reason: format!(
                "expected label and probability outputs, found {}",
                graph.output.len()
            ),
        });
    }
    let (mut label_vi, mut proba_vi) = (&graph.output[0], &graph.output[1]);
    if matches!(declared_dtype(label_vi), Some(DType::F32 | DType::F64))
        && matches!(declared_dtype(proba_vi), Some(DType::I64 | DType::Str))
    {
        std::mem::swap(&mut label_vi, &mut proba_vi);
    }
    let resolve = |vi: &ValueInfoProto| {
        names
            .get(vi.name.as_str())
            .copied()
            .ok_or_else(|| ModelError::UndefinedValue {
                node: "graph output".into(),
                value: vi.name.clone(),
            })
    };
    let label = resolve(label_vi)?;
    let probabilities = resolve(proba_vi)?;

    // Drop each slot after its last reader (never the outputs).
    let keep: HashSet<usize> = [label, probabilities]
        .iter()
        .filter_map(|r| match r {
            Ref::Slot(s) => Some(*s),
            Ref::Const(_) => None,
        })
        .collect();
    let mut last: Vec<Option<usize>> = vec![None; slots];
    for (k, step) in steps.iter().enumerate() {
        for s in step.outs.iter().flatten() {
            last[*s] = Some(k);
        }
        for a in step.args.iter().flatten() {
            if let Ref::Slot(s) = a {
                last[*s] = Some(k);
            }
        }
    }
    let input_slots: HashSet<usize> = inputs.iter().map(|i| i.slot).collect();
    for (s, k) in last.iter().enumerate() {
        if let Some(k) = k
            && !keep.contains(&s)
            && !input_slots.contains(&s)
        {
            steps[*k].free.push(s);
        }
    }

    Ok(Compiled {
        plan: Plan {
            slots,
            inputs,
            consts,
            steps,
            label,
            probabilities,
        },
        specs,
        classes,
    })
}

fn into_owned(t: Tensor<'_>) -> Tensor<'static> {
    use super::tensor::Data;
    use std::borrow::Cow;
    let data = match t.data {
        Data::F32(v) => Data::F32(Cow::Owned(v.into_owned())),
        Data::F64(v) => Data::F64(Cow::Owned(v.into_owned())),
        Data::I64(v) => Data::I64(Cow::Owned(v.into_owned())),
        Data::Str(v) => Data::Str(Cow::Owned(v.into_owned())),
    };
    Tensor {
        shape: t.shape,
        data,
    }
}

/// Kahn's algorithm over value names; reports a value nothing defines or a
/// cycle, naming a node involved.
fn topological_order(
    graph: &GraphProto,
    known: &HashMap<&str, Ref>,
) -> Result<Vec<usize>, ModelError> {
    let n = graph.node.len();
    let mut producer: HashMap<&str, usize> = HashMap::new();
    for (i, node) in graph.node.iter().enumerate() {
        for o in node.output.iter().filter(|o| !o.is_empty()) {
            if known.contains_key(o.as_str()) || producer.insert(o, i).is_some() {
                return Err(ModelError::DuplicateValue { value: o.clone() });
            }
        }
    }
    let mut pending = vec![0usize; n];
    let mut readers: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (i, node) in graph.node.iter().enumerate() {
        for name in node.input.iter().filter(|x| !x.is_empty()) {
            if known.contains_key(name.as_str()) {
                continue;
            }
            match producer.get(name.as_str()) {
                Some(&p) => {
                    pending[i] += 1;
                    readers[p].push(i);
                }
                None => {
                    return Err(ModelError::UndefinedValue {
                        node: node_name(graph, i),
                        value: name.clone(),
                    });
                }
            }
        }
    }
    // Ready nodes in file order, so an already sorted graph keeps its order.
    let mut ready: std::collections::BTreeSet<usize> =
        (0..n).filter(|&i| pending[i] == 0).collect();
    let mut order = Vec::with_capacity(n);
    while let Some(i) = ready.pop_first() {
        order.push(i);
        for &r in &readers[i] {
            pending[r] -= 1;
            if pending[r] == 0 {
                ready.insert(r);
            }
        }
    }
    if order.len() < n {
        let stuck = (0..n).find(|&i| pending[i] > 0).unwrap_or(0);
        return Err(ModelError::Cycle {
            node: node_name(graph, stuck),
        });
    }
    Ok(order)
}

impl Plan {
    /// Runs the plan on the graph inputs (in `inputs` order), returning the
    /// label and probability tensors.
    pub fn run<'a>(
        &'a self,
        feeds: Vec<Tensor<'a>>,
    ) -> Result<(Tensor<'a>, Tensor<'a>), ModelError> {
        let mut slots: Vec<Option<Tensor<'a>>> = (0..self.slots).map(|_| None).collect();
        for (input, t) in self.inputs.iter().zip(feeds) {
            slots[input.slot] = Some(t);
        }
        let mut out: Vec<Tensor<'a>> = Vec::with_capacity(2);
        for step in &self.steps {
            {
                let args: Vec<Option<&Tensor<'a>>> = step
                    .args
                    .iter()
                    .map(|a| match a {
                        Some(Ref::Slot(s)) => slots[*s].as_ref(),
                        Some(Ref::Const(c)) => self.consts.get(*c),
                        None => None,
                    })
                    .collect();
                step.op
                    .run(&args, &mut out)
                    .map_err(|reason| ModelError::Eval {
                        node: step.node.clone(),
                        op: step.op_type.clone(),
                        reason,
                    })?;
            }
            for (slot, t) in step.outs.iter().zip(out.drain(..)) {
                if let Some(s) = slot {
                    slots[*s] = Some(t);
                }
            }
            for &s in &step.free {
                slots[s] = None;
            }
        }
        let mut take = |r: Ref, what: &str| match r {
            Ref::Slot(s) => slots[s].take().ok_or_else(|| ModelError::Output {
                reason: format!("the {what} output was not produced"),
            }),
            Ref::Const(c) => self
                .consts
                .get(c)
                .cloned()
                .ok_or_else(|| ModelError::Output {
                    reason: format!("the {what} output is missing"),
                }),
        };
        let label = take(self.label, "label")?;
        let probabilities = take(self.probabilities, "probability")?;
        Ok((label, probabilities))
    }
}
