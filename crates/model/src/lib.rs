//! Waystone's model: the resources users write (parsed strictly), and the one pure function
//! that turns a set of them into the [`snapshot::Snapshot`] the data plane runs.
//! See ARCHITECTURE.md.

mod kinds;
mod object;
pub mod resources;
pub mod snapshot;
pub mod translate;
mod validate;

pub use kinds::{KindInfo, all_kinds, lookup_kind};
pub use object::{ObjectParseError, ParseError, Resource, parse_manifests};
pub use translate::{ObjectError, TranslateOptions, Translation, translate};
pub use validate::{FieldIssue, ValidationError};
