//! mesh-runtime: one binary serves one mesh service.
//!
//! A service is described by a *bundle* (a folder holding `service.json`, the
//! ONNX models and the datasets). See `config` for the bundle schema.

pub mod access_log;
pub mod auth;
pub mod backend;
pub mod cache;
pub mod config;
pub mod dataset;
pub mod docs;
pub mod error;
pub mod freeze;
pub mod freshness;
pub mod generations;
pub mod h1;
pub mod http;
pub mod input;
pub mod lines;
pub mod log;
pub mod lookup;
pub mod metrics;
pub mod model;
pub mod oip;
pub mod openapi;
pub mod predict;
pub mod query_log;
pub mod remote;
pub mod scoring;
pub mod service;
pub mod snowflake;
pub mod sql;
pub mod tls;

pub use http::{AppState, app};
