//! The embedded control plane: store, local API, reconciliation. See ARCHITECTURE.md.

pub mod admin;
pub mod api;
pub mod dump;
pub mod hbone;
mod memory;
mod objects;
pub mod paths;
pub mod pipeline;
mod reconcile;
mod server;
pub mod status;
mod store;
mod up;

pub use up::{DEFAULT_CACHE_MAX_UNUSED, DEFAULT_CACHE_PRUNE_INTERVAL, UpOptions, run_up};

pub use objects::now_rfc3339;
