//! The stack language: TOML files → a resolved, validated [`Stack`].

mod model;

pub use model::*;
