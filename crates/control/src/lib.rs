//! The embedded control plane: store, local API, reconciliation. See ARCHITECTURE.md.

pub mod admin;
pub mod api;
pub mod dump;
mod objects;
pub mod paths;
mod reconcile;
mod server;
mod status;
mod store;
mod up;

pub use up::{UpOptions, run_up};
