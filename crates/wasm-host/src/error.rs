use std::time::Duration;

/// Everything that can go wrong between the data plane and a plugin. Messages name the plugin
/// (its `<ns>.<name>`) and the callback or export concerned.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// The wasmtime engine could not be configured.
    #[error("cannot create the Wasm engine: {reason}")]
    Engine { reason: String },

    /// The bytes are not a valid Wasm module, or compiling them failed.
    #[error("cannot compile the Wasm module: {reason}")]
    Compile { reason: String },

    /// The module announces no Proxy-Wasm ABI version this host knows.
    #[error(
        "the module exports no supported Proxy-Wasm ABI marker (proxy_abi_version_0_2_1, \
         proxy_abi_version_0_2_0 or proxy_abi_version_0_1_0); its exports are: [{}]",
        exports.join(", ")
    )]
    UnknownAbi { exports: Vec<String> },

    /// The module imports a host function its announced ABI version does not have.
    #[error(
        "the module announces Proxy-Wasm ABI {abi} but imports `env::{name}`, which ABI {abi} does not define"
    )]
    ImportNotInAbi {
        name: String,
        abi: crate::types::AbiVersion,
    },

    /// An export the host needs to drive the plugin is absent.
    #[error(
        "the module does not export `{export}`, which the host needs: {why}; its exports are: [{}]",
        exports.join(", ")
    )]
    MissingExport {
        export: String,
        why: &'static str,
        exports: Vec<String>,
    },

    /// A known callback is exported with a signature the ABI does not define.
    #[error(
        "the module exports `{export}` with type {found}, but the Proxy-Wasm ABI defines {expected}"
    )]
    ExportSignature {
        export: String,
        found: String,
        expected: String,
    },

    /// The module imports something this host does not provide.
    #[error("the module imports `{module}::{name}`, which this host does not provide")]
    UnknownImport { module: String, name: String },

    /// The module imports a known function with an unexpected type.
    #[error("the module's import `{module}::{name}` does not match the host function: {reason}")]
    ImportMismatch {
        module: String,
        name: String,
        reason: String,
    },

    /// Linking failed for a reason the import checks did not foresee.
    #[error("cannot link the module's imports: {reason}")]
    Link { reason: String },

    /// Creating the instance (or running its start function) failed.
    #[error("plugin {plugin}: cannot instantiate the module: {reason}")]
    Instantiate { plugin: String, reason: String },

    /// `proxy_on_vm_start` returned false.
    #[error(
        "plugin {plugin}: proxy_on_vm_start returned false (the VM configuration was rejected)"
    )]
    VmStartRejected { plugin: String },

    /// `proxy_on_configure` returned false.
    #[error(
        "plugin {plugin}: proxy_on_configure returned false (the plugin configuration was rejected)"
    )]
    ConfigureRejected { plugin: String },

    /// The guest trapped (panic, unreachable, proc_exit, out-of-bounds access...).
    #[error("plugin {plugin}: {callback} trapped: {reason}")]
    Trap {
        plugin: String,
        callback: &'static str,
        reason: String,
    },

    /// The guest ran longer than the per-call deadline.
    #[error("plugin {plugin}: {callback} exceeded its deadline of {deadline:?}")]
    DeadlineExceeded {
        plugin: String,
        callback: &'static str,
        deadline: Duration,
    },

    /// The guest tried to grow its memory beyond the per-instance cap.
    #[error(
        "plugin {plugin}: {callback} tried to grow memory beyond the limit of {limit_bytes} bytes"
    )]
    MemoryLimit {
        plugin: String,
        callback: &'static str,
        limit_bytes: usize,
    },

    /// An earlier fault left the instance unusable; it must be dropped and replaced.
    #[error(
        "plugin {plugin}: the instance was poisoned by an earlier fault and must be replaced; refusing {callback}"
    )]
    Poisoned {
        plugin: String,
        callback: &'static str,
    },

    /// The data plane passed a context id this instance never created (or already deleted).
    #[error("plugin {plugin}: {callback} was given unknown context id {context}")]
    UnknownContext {
        plugin: String,
        callback: &'static str,
        context: u32,
    },
}
