//! The WASI preview1 subset that Proxy-Wasm SDK runtimes import. There is no file system:
//! stdout and stderr become log lines of the plugin, everything else answers "bad descriptor"
//! or "not supported". wasi-libc scans preopens until `fd_prestat_get` returns EBADF, so that
//! errno (not ENOSYS) is what keeps such modules starting.

use std::sync::OnceLock;
use std::time::Instant;

use rand::RngCore;

use super::{Ctx, Registrar, flush_lines, guest_range, write, write_u32, write_u64};
use crate::state::GuestExit;
use crate::status::Status;

const SUCCESS: i32 = 0;
const EBADF: i32 = 8;
const EFAULT: i32 = 21;
const EINVAL: i32 = 28;
const ENOSYS: i32 = 52;
const ESPIPE: i32 = 70;

const STDOUT_LEVEL: i32 = 2;
const STDERR_LEVEL: i32 = 4;

fn errno(r: Result<(), Status>) -> i32 {
    match r {
        Ok(()) => SUCCESS,
        Err(_) => EFAULT,
    }
}

fn monotonic_nanos() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    BASE.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// Appends the bytes of an iovec array to the plugin's stdout/stderr line buffer.
fn fd_write(c: &mut Ctx<'_>, fd: i32, iovs: i32, iovs_len: i32, nwritten: i32) -> i32 {
    if fd != 1 && fd != 2 {
        return EBADF;
    }
    let Some(mem) = c.data().memory else {
        return EFAULT;
    };
    let (data, state) = mem.data_and_store_mut(&mut *c);
    let Some(table_len) = (iovs_len as u32).checked_mul(8) else {
        return EFAULT;
    };
    let Ok(table) = guest_range(iovs, table_len as i32, data.len()) else {
        return EFAULT;
    };
    let table = &data[table];
    let mut ranges = Vec::with_capacity(iovs_len as u32 as usize);
    for iov in table.chunks_exact(8) {
        let ptr = i32::from_le_bytes([iov[0], iov[1], iov[2], iov[3]]);
        let len = i32::from_le_bytes([iov[4], iov[5], iov[6], iov[7]]);
        match guest_range(ptr, len, data.len()) {
            Ok(r) => ranges.push(r),
            Err(_) => return EFAULT,
        }
    }
    let total: usize = ranges.iter().map(|r| r.len()).sum();
    let (buf, level) = if fd == 1 {
        (&mut state.stdout, STDOUT_LEVEL)
    } else {
        (&mut state.stderr, STDERR_LEVEL)
    };
    for r in ranges {
        buf.extend_from_slice(&data[r]);
    }
    flush_lines(buf, level, &state.spec.name, false);
    errno(write_u32(c, nwritten, total as u32))
}

pub(crate) fn register(r: &mut Registrar, m: &str) -> wasmtime::Result<()> {
    r.wrap(
        m,
        "fd_write",
        |mut c: Ctx<'_>, fd: i32, iovs: i32, n: i32, out: i32| fd_write(&mut c, fd, iovs, n, out),
    )?;
    r.wrap(
        m,
        "fd_read",
        |_c: Ctx<'_>, _fd: i32, _iovs: i32, _n: i32, _out: i32| EBADF,
    )?;
    r.wrap(m, "fd_close", |_c: Ctx<'_>, _fd: i32| EBADF)?;
    r.wrap(
        m,
        "fd_seek",
        |_c: Ctx<'_>, fd: i32, _offset: i64, _whence: i32, _out: i32| {
            if (0..=2).contains(&fd) { ESPIPE } else { EBADF }
        },
    )?;
    r.wrap(m, "fd_fdstat_get", |mut c: Ctx<'_>, fd: i32, out: i32| {
        if !(0..=2).contains(&fd) {
            return EBADF;
        }
        // fdstat: filetype u8 (2 = character device), flags u16 at 2, two u64 rights sets.
        let mut stat = [0u8; 24];
        stat[0] = 2;
        errno(write(&mut c, out, &stat))
    })?;
    r.wrap(
        m,
        "fd_fdstat_set_flags",
        |_c: Ctx<'_>, _fd: i32, _flags: i32| ENOSYS,
    )?;
    r.wrap(m, "fd_filestat_get", |_c: Ctx<'_>, _fd: i32, _out: i32| {
        EBADF
    })?;
    r.wrap(m, "fd_prestat_get", |_c: Ctx<'_>, _fd: i32, _out: i32| {
        EBADF
    })?;
    r.wrap(
        m,
        "fd_prestat_dir_name",
        |_c: Ctx<'_>, _fd: i32, _path: i32, _len: i32| EBADF,
    )?;
    r.wrap(
        m,
        "path_open",
        |_c: Ctx<'_>,
         _fd: i32,
         _dirflags: i32,
         _path: i32,
         _path_len: i32,
         _oflags: i32,
         _rights: i64,
         _inheriting: i64,
         _fdflags: i32,
         _out: i32| ENOSYS,
    )?;
    r.wrap(
        m,
        "path_filestat_get",
        |_c: Ctx<'_>, _fd: i32, _flags: i32, _path: i32, _len: i32, _out: i32| ENOSYS,
    )?;
    r.wrap(
        m,
        "clock_time_get",
        |mut c: Ctx<'_>, id: i32, _precision: i64, out: i32| {
            let now = match id {
                0 => super::proxy_now_nanos(),
                1..=3 => monotonic_nanos(),
                _ => return EINVAL,
            };
            errno(write_u64(&mut c, out, now))
        },
    )?;
    r.wrap(m, "clock_res_get", |mut c: Ctx<'_>, id: i32, out: i32| {
        if !(0..=3).contains(&id) {
            return EINVAL;
        }
        errno(write_u64(&mut c, out, 1))
    })?;
    r.wrap(m, "random_get", |mut c: Ctx<'_>, ptr: i32, len: i32| {
        let Some(mem) = c.data().memory else {
            return EFAULT;
        };
        let data = mem.data_mut(&mut c);
        match guest_range(ptr, len, data.len()) {
            Ok(r) => {
                rand::thread_rng().fill_bytes(&mut data[r]);
                SUCCESS
            }
            Err(_) => EFAULT,
        }
    })?;
    r.wrap(
        m,
        "environ_sizes_get",
        |mut c: Ctx<'_>, count_ptr: i32, size_ptr: i32| {
            let env = &c.data().spec.env;
            let count = env.len() as u32;
            let size: usize = env.iter().map(|(k, v)| k.len() + v.len() + 2).sum();
            errno(write_u32(&mut c, count_ptr, count).and(write_u32(&mut c, size_ptr, size as u32)))
        },
    )?;
    r.wrap(
        m,
        "environ_get",
        |mut c: Ctx<'_>, environ: i32, buf: i32| {
            let spec = c.data().spec.clone();
            let mut offset: u32 = 0;
            for (i, (k, v)) in spec.env.iter().enumerate() {
                let entry = format!("{k}={v}\0");
                let at = (buf as u32).wrapping_add(offset) as i32;
                let slot = (environ as u32).wrapping_add(4 * i as u32) as i32;
                if write(&mut c, at, entry.as_bytes())
                    .and(write_u32(&mut c, slot, at as u32))
                    .is_err()
                {
                    return EFAULT;
                }
                offset += entry.len() as u32;
            }
            SUCCESS
        },
    )?;
    r.wrap(
        m,
        "args_sizes_get",
        |mut c: Ctx<'_>, argc: i32, size: i32| {
            errno(write_u32(&mut c, argc, 0).and(write_u32(&mut c, size, 0)))
        },
    )?;
    r.wrap(m, "args_get", |_c: Ctx<'_>, _argv: i32, _buf: i32| SUCCESS)?;
    r.wrap(
        m,
        "proc_exit",
        |_c: Ctx<'_>, code: i32| -> wasmtime::Result<()> {
            Err(wasmtime::Error::new(GuestExit::ProcExit(code)))
        },
    )?;
    r.wrap(m, "sched_yield", |_c: Ctx<'_>| SUCCESS)?;
    r.wrap(
        m,
        "poll_oneoff",
        |_c: Ctx<'_>, _in: i32, _out: i32, _n: i32, _nevents: i32| ENOSYS,
    )?;
    Ok(())
}
