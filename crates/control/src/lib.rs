//! The embedded control plane: store, local API, reconciliation. See ARCHITECTURE.md.

pub mod api;
mod objects;
pub mod paths;
mod reconcile;
mod server;
mod status;
mod store;
mod up;

pub use up::{DEFAULT_CACHE_MAX_UNUSED, DEFAULT_CACHE_PRUNE_INTERVAL, UpOptions, run_up};
