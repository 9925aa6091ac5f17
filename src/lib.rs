//! mesh: declarative provisioning of ML data-mesh services.
//!
//! The flow is `stack` (parse and resolve TOML) → `graph` (resources and
//! their dependencies) → providers observe live state → `plan` (a pure diff)
//! → `render` (human or JSON) → `apply` (walk the graph, call providers).
//! Only `provider` modules do I/O against the outside world.

pub mod apply;
pub mod bundle;
pub mod engine;
pub mod graph;
#[cfg(feature = "kubernetes")]
pub mod image;
pub mod lock;
pub mod output;
pub mod plan;
pub mod provider;
pub mod render;
pub mod resource;
pub mod stack;
pub mod testing;
