//! The local target.
