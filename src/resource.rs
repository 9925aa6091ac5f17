//! Desired and live resources: the provider-neutral vocabulary the planner diffs.
//!
//! A provider turns the resolved [`crate::stack::Stack`] into [`Desired`]
//! resources (pure), reads [`Live`] resources by their ownership marks
//! (I/O), and carries out changes. The planner only ever compares these two
//! shapes, so it works the same for every provider.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

/// Where a resource lives in the stack, e.g. `service.customer-features` or
/// `network.main.subnet.public-a`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Address(String);

impl Address {
    pub fn new(s: impl Into<String>) -> Self {
        Address(s.into())
    }
    /// `Address::of("service", "x")` → `service.x`.
    pub fn of(kind: &str, name: &str) -> Self {
        Address(format!("{kind}.{name}"))
    }
    /// `network.main` + `subnet`, `a` → `network.main.subnet.a`.
    pub fn child(&self, kind: &str, name: &str) -> Self {
        Address(format!("{}.{kind}.{name}", self.0))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Which provider owns a resource.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderId {
    Local,
    Aws,
    Kubernetes,
}

impl fmt::Display for ProviderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ProviderId::Local => "local",
            ProviderId::Aws => "aws",
            ProviderId::Kubernetes => "kubernetes",
        })
    }
}

/// An attribute value.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t", content = "v", rename_all = "snake_case")]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    List(Vec<Value>),
    Map(BTreeMap<String, Value>),
    /// A secret. Only a digest is kept, so a change is detected without the
    /// value ever being stored, printed or written to a saved plan.
    Sensitive {
        digest: String,
    },
    /// An output of another resource (`address`, `output`), resolved against
    /// live state before diffing.
    Ref {
        address: Address,
        output: String,
    },
    /// Known only after apply (e.g. the id of a VPC not created yet).
    Unknown,
}

impl Value {
    pub fn str(s: impl Into<String>) -> Value {
        Value::Str(s.into())
    }
    pub fn list_of_str<I, S>(items: I) -> Value
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Value::List(items.into_iter().map(|s| Value::Str(s.into())).collect())
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            _ => None,
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }
    /// Replaces every `Ref` by what `lookup` says the referenced output is,
    /// or `Unknown` when it is not known (yet).
    pub fn resolve_refs(&self, lookup: &dyn Fn(&Address, &str) -> Option<Value>) -> Value {
        match self {
            Value::Ref { address, output } => lookup(address, output).unwrap_or(Value::Unknown),
            Value::List(items) => {
                Value::List(items.iter().map(|i| i.resolve_refs(lookup)).collect())
            }
            Value::Map(m) => Value::Map(
                m.iter()
                    .map(|(k, i)| (k.clone(), i.resolve_refs(lookup)))
                    .collect(),
            ),
            other => other.clone(),
        }
    }

    /// True if the value (or anything inside it) is only known after apply.
    pub fn is_unknown(&self) -> bool {
        match self {
            Value::Unknown | Value::Ref { .. } => true,
            Value::List(items) => items.iter().any(Value::is_unknown),
            Value::Map(m) => m.values().any(Value::is_unknown),
            _ => false,
        }
    }
}

impl From<&str> for Value {
    fn from(s: &str) -> Self {
        Value::Str(s.to_owned())
    }
}
impl From<String> for Value {
    fn from(s: String) -> Self {
        Value::Str(s)
    }
}
impl From<bool> for Value {
    fn from(b: bool) -> Self {
        Value::Bool(b)
    }
}
impl From<i64> for Value {
    fn from(i: i64) -> Self {
        Value::Int(i)
    }
}
impl From<u32> for Value {
    fn from(i: u32) -> Self {
        Value::Int(i64::from(i))
    }
}
impl From<u16> for Value {
    fn from(i: u16) -> Self {
        Value::Int(i64::from(i))
    }
}

/// A desired attribute and how the planner must treat a change to it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Attr {
    pub value: Value,
    /// A change cannot be made in place: the resource is replaced.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub force_new: bool,
}

impl Attr {
    pub fn new(value: impl Into<Value>) -> Self {
        Attr {
            value: value.into(),
            force_new: false,
        }
    }
    pub fn force_new(value: impl Into<Value>) -> Self {
        Attr {
            value: value.into(),
            force_new: true,
        }
    }
}

/// What the stack says a resource should be.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Desired {
    pub address: Address,
    /// Provider-specific kind, e.g. `aws_vpc`, `local_service`, `k8s_deployment`.
    pub kind: String,
    pub provider: ProviderId,
    pub attrs: BTreeMap<String, Attr>,
    pub depends_on: BTreeSet<Address>,
}

impl Desired {
    pub fn new(address: Address, kind: &str, provider: ProviderId) -> Self {
        Desired {
            address,
            kind: kind.to_owned(),
            provider,
            attrs: BTreeMap::new(),
            depends_on: BTreeSet::new(),
        }
    }
    pub fn attr(mut self, name: &str, value: impl Into<Value>) -> Self {
        self.attrs.insert(name.to_owned(), Attr::new(value));
        self
    }
    pub fn attr_force_new(mut self, name: &str, value: impl Into<Value>) -> Self {
        self.attrs.insert(name.to_owned(), Attr::force_new(value));
        self
    }
    pub fn depends(mut self, on: Address) -> Self {
        self.depends_on.insert(on);
        self
    }
}

/// What a provider found running, identified by its ownership marks.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Live {
    pub address: Address,
    pub kind: String,
    pub provider: ProviderId,
    /// The provider's own identifier (VPC id, process id, object uid...).
    pub id: String,
    /// Observed values of the attributes mesh manages (same names as `Desired::attrs`).
    pub attrs: BTreeMap<String, Value>,
    /// Values other resources may reference (`id`, `url`, `arn`...).
    pub outputs: BTreeMap<String, Value>,
}

impl Live {
    pub fn new(address: Address, kind: &str, provider: ProviderId, id: impl Into<String>) -> Self {
        Live {
            address,
            kind: kind.to_owned(),
            provider,
            id: id.into(),
            attrs: BTreeMap::new(),
            outputs: BTreeMap::new(),
        }
    }
    pub fn attr(mut self, name: &str, value: impl Into<Value>) -> Self {
        self.attrs.insert(name.to_owned(), value.into());
        self
    }
    pub fn output(mut self, name: &str, value: impl Into<Value>) -> Self {
        self.outputs.insert(name.to_owned(), value.into());
        self
    }
}

/// Whose resources a provider reads: everything it marked for this stack and environment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scope {
    pub stack: String,
    pub env: String,
    /// The stack folder (local state lives in `<root>/.mesh/<env>/`).
    pub root: std::path::PathBuf,
}
