//! Host functions linked into every module, and the guest-memory accessors they share.
//!
//! Every guest pointer and length is checked against the current size of guest memory before
//! use; a bad one yields `InvalidMemoryAccess` (or WASI `EFAULT`), never a panic.

mod maps;
mod properties;
mod proxy;
mod wasi;

use std::collections::HashSet;
use std::ops::Range;

use wasmtime::{Caller, IntoFunc, Linker};

use crate::state::HostState;
use crate::status::Status;

pub(crate) use maps::{deserialize_map, serialize_map};
use proxy::now_nanos as proxy_now_nanos;

pub(crate) type Ctx<'a> = Caller<'a, HostState>;

/// (module, name) of every import the linker defines.
pub(crate) type LinkedNames = HashSet<(String, String)>;

pub(crate) const LOG_TARGET: &str = "waystone::wasm";

/// Builds the linker shared by every module of an engine, and remembers which imports it
/// defines so that `compile` can name the ones it does not.
pub(crate) fn build_linker(
    engine: &wasmtime::Engine,
) -> wasmtime::Result<(Linker<HostState>, LinkedNames)> {
    let mut r = Registrar {
        linker: Linker::new(engine),
        names: HashSet::new(),
    };
    proxy::register(&mut r)?;
    wasi::register(&mut r, "wasi_snapshot_preview1")?;
    wasi::register(&mut r, "wasi_unstable")?;
    Ok((r.linker, r.names))
}

pub(crate) struct Registrar {
    linker: Linker<HostState>,
    names: HashSet<(String, String)>,
}

impl Registrar {
    pub(crate) fn wrap<Params, Args>(
        &mut self,
        module: &str,
        name: &str,
        func: impl IntoFunc<HostState, Params, Args>,
    ) -> wasmtime::Result<()> {
        self.linker.func_wrap(module, name, func)?;
        self.names.insert((module.to_owned(), name.to_owned()));
        Ok(())
    }
}

/// The byte range `[ptr, ptr+len)` if it lies inside a memory of `mem_len` bytes. Guest
/// pointers are unsigned 32-bit values passed as `i32`.
pub(crate) fn guest_range(ptr: i32, len: i32, mem_len: usize) -> Result<Range<usize>, Status> {
    let start = ptr as u32 as usize;
    let end = start
        .checked_add(len as u32 as usize)
        .ok_or(Status::InvalidMemoryAccess)?;
    if end > mem_len {
        return Err(Status::InvalidMemoryAccess);
    }
    Ok(start..end)
}

fn memory(c: &Ctx<'_>) -> Result<wasmtime::Memory, Status> {
    c.data().memory.ok_or(Status::InvalidMemoryAccess)
}

/// Runs `f` on a guest byte range with mutable access to the host state, without copying.
pub(crate) fn with_guest<R>(
    c: &mut Ctx<'_>,
    ptr: i32,
    len: i32,
    f: impl FnOnce(&[u8], &mut HostState) -> R,
) -> Result<R, Status> {
    let mem = memory(c)?;
    let (data, state) = mem.data_and_store_mut(c);
    let range = guest_range(ptr, len, data.len())?;
    Ok(f(&data[range], state))
}

/// Like [`with_guest`] for two ranges (key and value).
pub(crate) fn with_guest2<R>(
    c: &mut Ctx<'_>,
    (p1, l1): (i32, i32),
    (p2, l2): (i32, i32),
    f: impl FnOnce(&[u8], &[u8], &mut HostState) -> R,
) -> Result<R, Status> {
    let mem = memory(c)?;
    let (data, state) = mem.data_and_store_mut(c);
    let r1 = guest_range(p1, l1, data.len())?;
    let r2 = guest_range(p2, l2, data.len())?;
    Ok(f(&data[r1], &data[r2], state))
}

pub(crate) fn read(c: &mut Ctx<'_>, ptr: i32, len: i32) -> Result<Vec<u8>, Status> {
    with_guest(c, ptr, len, |bytes, _| bytes.to_vec())
}

pub(crate) fn write(c: &mut Ctx<'_>, ptr: i32, bytes: &[u8]) -> Result<(), Status> {
    let len = i32::try_from(bytes.len()).map_err(|_| Status::InvalidMemoryAccess)?;
    let mem = memory(c)?;
    let data = mem.data_mut(c);
    let range = guest_range(ptr, len, data.len())?;
    data[range].copy_from_slice(bytes);
    Ok(())
}

pub(crate) fn write_u32(c: &mut Ctx<'_>, ptr: i32, v: u32) -> Result<(), Status> {
    write(c, ptr, &v.to_le_bytes())
}

pub(crate) fn write_u64(c: &mut Ctx<'_>, ptr: i32, v: u64) -> Result<(), Status> {
    write(c, ptr, &v.to_le_bytes())
}

pub(crate) fn check_writable(c: &Ctx<'_>, ptr: i32, len: i32) -> Result<(), Status> {
    let mem = memory(c)?;
    guest_range(ptr, len, mem.data_size(c)).map(|_| ())
}

/// Copies `bytes` into memory the guest allocates with `proxy_on_memory_allocate` (or
/// `malloc`), then writes the pointer and length to `ptr_ptr` / `size_ptr`. A trap inside the
/// allocator propagates as the error of the host call.
pub(crate) fn copy_out(
    c: &mut Ctx<'_>,
    bytes: &[u8],
    ptr_ptr: i32,
    size_ptr: i32,
) -> wasmtime::Result<i32> {
    let checked = memory(c).and_then(|mem| {
        let size = mem.data_size(&*c);
        guest_range(ptr_ptr, 4, size).and(guest_range(size_ptr, 4, size))
    });
    if let Err(s) = checked {
        return Ok(s.code());
    }
    let Ok(len) = i32::try_from(bytes.len()) else {
        return Ok(Status::BadArgument.code());
    };
    // An empty value is a null pointer and no allocation, as Envoy's host answers it: the
    // SDKs read it as "no value" (a property that is not set, an empty header).
    let guest_ptr = if bytes.is_empty() {
        0
    } else {
        let Some(alloc) = c.data_mut().allocator.take() else {
            return Ok(Status::InternalFailure.code());
        };
        let p = alloc.call(&mut *c, len);
        c.data_mut().allocator = Some(alloc);
        let p = p?;
        if p == 0 && len > 0 {
            return Ok(Status::InvalidMemoryAccess.code());
        }
        p
    };
    // The value, then its pointer and length, through one look at the memory (the allocator
    // may have grown it).
    let written = memory(c).and_then(|mem| {
        let data = mem.data_mut(&mut *c);
        let size = data.len();
        if guest_ptr != 0 {
            data[guest_range(guest_ptr, len, size)?].copy_from_slice(bytes);
        }
        data[guest_range(ptr_ptr, 4, size)?].copy_from_slice(&(guest_ptr as u32).to_le_bytes());
        data[guest_range(size_ptr, 4, size)?].copy_from_slice(&(len as u32).to_le_bytes());
        Ok(())
    });
    Ok(crate::status::status_of(written))
}

/// Emits one guest log line through `tracing` at the Proxy-Wasm level `level`
/// (0 trace … 4 error, 5 critical → error).
pub(crate) fn emit_log(level: i32, plugin: &str, msg: &str) -> Result<(), Status> {
    match level {
        0 => tracing::trace!(target: LOG_TARGET, plugin = %plugin, "{msg}"),
        1 => tracing::debug!(target: LOG_TARGET, plugin = %plugin, "{msg}"),
        2 => tracing::info!(target: LOG_TARGET, plugin = %plugin, "{msg}"),
        3 => tracing::warn!(target: LOG_TARGET, plugin = %plugin, "{msg}"),
        4 | 5 => tracing::error!(target: LOG_TARGET, plugin = %plugin, "{msg}"),
        _ => return Err(Status::BadArgument),
    }
    Ok(())
}

/// Emits the complete lines of a WASI stdout/stderr buffer, keeping the unfinished tail.
/// A tail longer than 64 KiB is emitted anyway so a guest cannot grow host memory unboundedly.
pub(crate) fn flush_lines(buf: &mut Vec<u8>, level: i32, plugin: &str, force: bool) {
    const MAX_PENDING: usize = 64 * 1024;
    while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
        let line: Vec<u8> = buf.drain(..=pos).collect();
        let text = String::from_utf8_lossy(&line[..line.len() - 1]);
        let _ = emit_log(level, plugin, text.trim_end_matches('\r'));
    }
    if (force && !buf.is_empty()) || buf.len() > MAX_PENDING {
        let text = String::from_utf8_lossy(buf).into_owned();
        buf.clear();
        let _ = emit_log(level, plugin, &text);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_range_bounds() {
        assert_eq!(guest_range(0, 0, 0), Ok(0..0));
        assert_eq!(guest_range(10, 5, 15), Ok(10..15));
        assert_eq!(guest_range(10, 6, 15), Err(Status::InvalidMemoryAccess));
        assert_eq!(
            guest_range(-1, 2, 1 << 20),
            Err(Status::InvalidMemoryAccess)
        );
        assert_eq!(
            guest_range(0, -1, 1 << 20),
            Err(Status::InvalidMemoryAccess)
        );
        assert_eq!(guest_range(16, 0, 15), Err(Status::InvalidMemoryAccess));
    }
}
