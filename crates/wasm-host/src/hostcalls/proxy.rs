//! The Proxy-Wasm host functions (module `env`), plus the few `env` imports that SDK runtimes
//! bring along (AssemblyScript's `abort`/`seed`/`trace`, Emscripten's memory-growth hook).

use std::time::{SystemTime, UNIX_EPOCH};

use tracing::Level;

use super::{
    Ctx, Empty, LOG_TARGET, Registrar, check_writable, copy_out, deserialize_map, emit_log,
    properties, read, serialize_map, with_guest, with_guest2, write_u32, write_u64,
};
use crate::shared::MetricKind;
use crate::state::{GuestExit, HostState};
use crate::status::{Status, status_of};
use crate::types::{HeaderMap, LocalResponse, StreamType};

const ENV: &str = "env";

fn header_map(state: &mut HostState, map_type: i32) -> Result<&mut HeaderMap, Status> {
    let stream = match map_type {
        0..=3 => state.stream.as_mut().ok_or(Status::NotFound)?,
        // gRPC metadata and HTTP-call responses exist only during callouts, which come later.
        4..=7 => return Err(Status::NotFound),
        _ => return Err(Status::BadArgument),
    };
    Ok(match map_type {
        0 => &mut stream.request_headers,
        1 => &mut stream.request_trailers,
        2 => &mut stream.response_headers,
        _ => &mut stream.response_trailers,
    })
}

fn buffer(state: &HostState, buffer_type: i32) -> Result<&[u8], Status> {
    match buffer_type {
        0 => Ok(&state.stream.as_ref().ok_or(Status::NotFound)?.request_body),
        1 => Ok(&state.stream.as_ref().ok_or(Status::NotFound)?.response_body),
        6 => Ok(&state.spec.vm_configuration),
        7 => Ok(&state.spec.plugin_configuration),
        2..=5 | 8 => Err(Status::NotFound),
        _ => Err(Status::BadArgument),
    }
}

fn buffer_mut(state: &mut HostState, buffer_type: i32) -> Result<&mut Vec<u8>, Status> {
    match buffer_type {
        0 => Ok(&mut state.stream.as_mut().ok_or(Status::NotFound)?.request_body),
        1 => Ok(&mut state.stream.as_mut().ok_or(Status::NotFound)?.response_body),
        // Configuration buffers are read-only.
        6 | 7 => Err(Status::BadArgument),
        2..=5 | 8 => Err(Status::NotFound),
        _ => Err(Status::BadArgument),
    }
}

/// Envoy's rules for `proxy_set_buffer_bytes`: `(0, 0)` prepends, `start >= len` with size 0
/// appends, `(0, >= len)` replaces, anything else splices `[start, start+size)`.
pub(crate) fn splice_buffer(buf: &mut Vec<u8>, start: u32, size: u32, data: &[u8]) {
    let len = buf.len();
    let start = start as usize;
    let size = size as usize;
    if start == 0 && size == 0 {
        buf.splice(0..0, data.iter().copied());
    } else if start >= len {
        buf.extend_from_slice(data);
    } else if start == 0 && size >= len {
        buf.clear();
        buf.extend_from_slice(data);
    } else {
        let end = start.saturating_add(size).min(len);
        buf.splice(start..end, data.iter().copied());
    }
}

fn str_lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn current_log_level() -> u32 {
    if tracing::enabled!(target: LOG_TARGET, Level::TRACE) {
        0
    } else if tracing::enabled!(target: LOG_TARGET, Level::DEBUG) {
        1
    } else if tracing::enabled!(target: LOG_TARGET, Level::INFO) {
        2
    } else if tracing::enabled!(target: LOG_TARGET, Level::WARN) {
        3
    } else if tracing::enabled!(target: LOG_TARGET, Level::ERROR) {
        4
    } else {
        5
    }
}

pub(super) fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Checks every (ptr, len) pair of a call the host cannot serve yet, so that a bad pointer is
/// still reported as such.
fn check_ranges(c: &Ctx<'_>, ranges: &[(i32, i32)]) -> Result<(), Status> {
    ranges
        .iter()
        .try_for_each(|(p, l)| check_writable(c, *p, *l))
}

fn warn_unsupported(c: &Ctx<'_>, what: &str) {
    tracing::warn!(target: LOG_TARGET, plugin = %c.data().spec.name, "{what} is not supported by this host yet");
}

pub(crate) fn register(r: &mut Registrar) -> wasmtime::Result<()> {
    register_basics(r)?;
    register_buffers(r)?;
    register_header_maps(r)?;
    register_stream(r)?;
    register_properties(r)?;
    register_shared(r)?;
    register_metrics(r)?;
    register_callouts(r)?;
    register_runtime_extras(r)
}

fn register_basics(r: &mut Registrar) -> wasmtime::Result<()> {
    r.wrap(
        ENV,
        "proxy_log",
        |mut c: Ctx<'_>, level: i32, ptr: i32, len: i32| {
            let r = with_guest(&mut c, ptr, len, |msg, state| {
                if crate::log_level::drops(&state.spec.name, level) {
                    return Ok(());
                }
                emit_log(level, &state.spec.name, &String::from_utf8_lossy(msg))
            });
            status_of(r.and_then(|x| x))
        },
    )?;
    r.wrap(ENV, "proxy_get_log_level", |mut c: Ctx<'_>, out: i32| {
        let level = crate::log_level::effective(&c.data().spec.name, current_log_level);
        status_of(write_u32(&mut c, out, level))
    })?;
    r.wrap(
        ENV,
        "proxy_get_current_time_nanoseconds",
        |mut c: Ctx<'_>, out: i32| status_of(write_u64(&mut c, out, now_nanos())),
    )?;
    r.wrap(
        ENV,
        "proxy_set_tick_period_milliseconds",
        |mut c: Ctx<'_>, ms: i32| {
            c.data_mut().tick_period_ms = ms as u32;
            Status::Ok.code()
        },
    )?;
    r.wrap(
        ENV,
        "proxy_set_effective_context",
        |mut c: Ctx<'_>, ctx: i32| {
            let ctx = ctx as u32;
            if !c.data().contexts.contains(&ctx) {
                return Status::BadArgument.code();
            }
            c.data_mut().effective_context = ctx;
            Status::Ok.code()
        },
    )?;
    r.wrap(ENV, "proxy_done", |mut c: Ctx<'_>| {
        c.data_mut().done_requested = true;
        Status::Ok.code()
    })?;
    Ok(())
}

fn register_buffers(r: &mut Registrar) -> wasmtime::Result<()> {
    r.wrap(
        ENV,
        "proxy_get_buffer_bytes",
        |mut c: Ctx<'_>, t: i32, start: i32, max: i32, ptr_ptr: i32, size_ptr: i32| {
            let bytes = match buffer(c.data(), t) {
                Ok(buf) => {
                    let start = (start as u32 as usize).min(buf.len());
                    let end = start.saturating_add(max as u32 as usize).min(buf.len());
                    buf[start..end].to_vec()
                }
                Err(s) => return Ok(s.code()),
            };
            copy_out(&mut c, &bytes, ptr_ptr, size_ptr, Empty::Null)
        },
    )?;
    r.wrap(
        ENV,
        "proxy_set_buffer_bytes",
        |mut c: Ctx<'_>, t: i32, start: i32, size: i32, ptr: i32, len: i32| {
            let r = with_guest(&mut c, ptr, len, |data, state| {
                let buf = buffer_mut(state, t)?;
                splice_buffer(buf, start as u32, size as u32, data);
                Ok(())
            });
            status_of(r.and_then(|x| x))
        },
    )?;
    r.wrap(
        ENV,
        "proxy_get_buffer_status",
        |mut c: Ctx<'_>, t: i32, len_ptr: i32, flags_ptr: i32| {
            let len = match buffer(c.data(), t) {
                Ok(b) => b.len() as u32,
                Err(s) => return s.code(),
            };
            status_of(write_u32(&mut c, len_ptr, len).and(write_u32(&mut c, flags_ptr, 0)))
        },
    )?;
    // ABI 0.1.0's way to read the plugin configuration; some C++ SDK builds still import it.
    r.wrap(
        ENV,
        "proxy_get_configuration",
        |mut c: Ctx<'_>, ptr_ptr: i32, size_ptr: i32| {
            let config = c.data().spec.plugin_configuration.clone();
            copy_out(&mut c, &config, ptr_ptr, size_ptr, Empty::Null)
        },
    )?;
    Ok(())
}

fn register_header_maps(r: &mut Registrar) -> wasmtime::Result<()> {
    r.wrap(
        ENV,
        "proxy_get_header_map_pairs",
        |mut c: Ctx<'_>, t: i32, ptr_ptr: i32, size_ptr: i32| {
            let data = match header_map(c.data_mut(), t) {
                Ok(m) => serialize_map(m.entries.iter().map(|(k, v)| (k.as_str(), v.as_slice()))),
                Err(s) => return Ok(s.code()),
            };
            copy_out(&mut c, &data, ptr_ptr, size_ptr, Empty::Allocate)
        },
    )?;
    r.wrap(
        ENV,
        "proxy_set_header_map_pairs",
        |mut c: Ctx<'_>, t: i32, ptr: i32, len: i32| {
            let r = with_guest(&mut c, ptr, len, |data, state| {
                let map = header_map(state, t)?;
                let pairs = deserialize_map(data).ok_or(Status::BadArgument)?;
                map.entries = pairs;
                Ok(())
            });
            status_of(r.and_then(|x| x))
        },
    )?;
    r.wrap(
        ENV,
        "proxy_get_header_map_value",
        |mut c: Ctx<'_>, t: i32, kptr: i32, klen: i32, vptr_ptr: i32, vsize_ptr: i32| {
            if let Err(s) = check_ranges(&c, &[(vptr_ptr, 4), (vsize_ptr, 4)]) {
                return Ok(s.code());
            }
            let r = with_guest(&mut c, kptr, klen, |key, state| {
                let map = header_map(state, t)?;
                // Like Envoy: the first of repeated values, not a joined list.
                map.get(&String::from_utf8_lossy(key))
                    .map(<[u8]>::to_vec)
                    .ok_or(Status::NotFound)
            });
            match r.and_then(|x| x) {
                Ok(value) => copy_out(&mut c, &value, vptr_ptr, vsize_ptr, Empty::Allocate),
                Err(s) => Ok(s.code()),
            }
        },
    )?;
    r.wrap(
        ENV,
        "proxy_add_header_map_value",
        |mut c: Ctx<'_>, t: i32, kptr: i32, klen: i32, vptr: i32, vlen: i32| {
            let r = with_guest2(&mut c, (kptr, klen), (vptr, vlen), |k, v, state| {
                header_map(state, t)?.add(&String::from_utf8_lossy(k), v);
                Ok(())
            });
            status_of(r.and_then(|x| x))
        },
    )?;
    r.wrap(
        ENV,
        "proxy_replace_header_map_value",
        |mut c: Ctx<'_>, t: i32, kptr: i32, klen: i32, vptr: i32, vlen: i32| {
            let r = with_guest2(&mut c, (kptr, klen), (vptr, vlen), |k, v, state| {
                header_map(state, t)?.set(&String::from_utf8_lossy(k), v);
                Ok(())
            });
            status_of(r.and_then(|x| x))
        },
    )?;
    r.wrap(
        ENV,
        "proxy_remove_header_map_value",
        |mut c: Ctx<'_>, t: i32, kptr: i32, klen: i32| {
            let r = with_guest(&mut c, kptr, klen, |k, state| {
                // Removing an absent header is not an error (the Rust SDK panics on anything
                // but Ok here).
                header_map(state, t)?.remove(&String::from_utf8_lossy(k));
                Ok(())
            });
            status_of(r.and_then(|x| x))
        },
    )?;
    r.wrap(
        ENV,
        "proxy_get_header_map_size",
        |mut c: Ctx<'_>, t: i32, out: i32| {
            // Envoy's byteSize(): the sum of key and value lengths.
            let size = match header_map(c.data_mut(), t) {
                Ok(m) => m
                    .entries
                    .iter()
                    .map(|(k, v)| k.len() + v.len())
                    .sum::<usize>(),
                Err(s) => return s.code(),
            };
            status_of(write_u32(&mut c, out, size as u32))
        },
    )?;
    Ok(())
}

fn stream_type(t: i32) -> Result<StreamType, Status> {
    match t {
        0 => Ok(StreamType::Request),
        1 => Ok(StreamType::Response),
        // Downstream/upstream (L4) streams do not exist in an HTTP host.
        2 | 3 => Err(Status::NotFound),
        _ => Err(Status::BadArgument),
    }
}

/// Records that the guest asked to resume `st`; only meaningful during an HTTP callback.
fn request_continue(c: &mut Ctx<'_>, st: StreamType) -> Result<(), Status> {
    let stream = c.data_mut().stream.as_mut().ok_or(Status::NotFound)?;
    stream.continue_requested = Some(st);
    Ok(())
}

fn register_stream(r: &mut Registrar) -> wasmtime::Result<()> {
    r.wrap(ENV, "proxy_continue_stream", |mut c: Ctx<'_>, t: i32| {
        status_of(stream_type(t).and_then(|st| request_continue(&mut c, st)))
    })?;
    r.wrap(ENV, "proxy_close_stream", |mut c: Ctx<'_>, t: i32| {
        let r = stream_type(t).map(|st| c.data_mut().close_requested = Some(st));
        status_of(r)
    })?;
    // ABI 0.1.0 spellings of continue_stream, still imported by some C++ SDK builds.
    r.wrap(ENV, "proxy_continue_request", |mut c: Ctx<'_>| {
        status_of(request_continue(&mut c, StreamType::Request))
    })?;
    r.wrap(ENV, "proxy_continue_response", |mut c: Ctx<'_>| {
        status_of(request_continue(&mut c, StreamType::Response))
    })?;
    // Routing is decided outside the host, so there is no cache to clear.
    r.wrap(ENV, "proxy_clear_route_cache", |_c: Ctx<'_>| {
        Status::Ok.code()
    })?;
    r.wrap(
        ENV,
        "proxy_get_status",
        |c: Ctx<'_>, code_ptr: i32, msg_ptr_ptr: i32, msg_size_ptr: i32| {
            let r = check_ranges(&c, &[(code_ptr, 4), (msg_ptr_ptr, 4), (msg_size_ptr, 4)])
                .and(Err(Status::NotFound));
            status_of(r)
        },
    )?;
    r.wrap(
        ENV,
        "proxy_send_local_response",
        |mut c: Ctx<'_>,
         status: i32,
         dptr: i32,
         dlen: i32,
         bptr: i32,
         blen: i32,
         hptr: i32,
         hlen: i32,
         grpc_status: i32| {
            let r = (|| {
                let details = read(&mut c, dptr, dlen)?;
                let body = read(&mut c, bptr, blen)?;
                let headers = read(&mut c, hptr, hlen)?;
                let headers = deserialize_map(&headers).ok_or(Status::BadArgument)?;
                let status = u16::try_from(status)
                    .ok()
                    .filter(|s| (100..1000).contains(s))
                    .ok_or(Status::BadArgument)?;
                let stream = c.data_mut().stream.as_mut().ok_or(Status::NotFound)?;
                stream.local_response = Some(LocalResponse {
                    status,
                    details: str_lossy(&details),
                    body,
                    headers,
                    grpc_status,
                });
                Ok(())
            })();
            status_of(r)
        },
    )?;
    Ok(())
}

fn register_properties(r: &mut Registrar) -> wasmtime::Result<()> {
    r.wrap(
        ENV,
        "proxy_get_property",
        |mut c: Ctx<'_>, pptr: i32, plen: i32, vptr_ptr: i32, vsize_ptr: i32| {
            if let Err(s) = check_ranges(&c, &[(vptr_ptr, 4), (vsize_ptr, 4)]) {
                return Ok(s.code());
            }
            let r = with_guest(&mut c, pptr, plen, |path, state| {
                properties::get_property(state, path).ok_or(Status::NotFound)
            });
            match r.and_then(|x| x) {
                Ok(value) => copy_out(&mut c, &value, vptr_ptr, vsize_ptr, Empty::Allocate),
                Err(s) => Ok(s.code()),
            }
        },
    )?;
    r.wrap(
        ENV,
        "proxy_set_property",
        |mut c: Ctx<'_>, pptr: i32, plen: i32, vptr: i32, vlen: i32| {
            let r = with_guest2(&mut c, (pptr, plen), (vptr, vlen), |path, value, state| {
                let extra = match state.stream.as_mut() {
                    Some(s) => &mut s.properties.extra,
                    None => &mut state.root_properties,
                };
                extra.insert(path.to_vec(), value.to_vec());
            });
            status_of(r)
        },
    )?;
    Ok(())
}

fn register_shared(r: &mut Registrar) -> wasmtime::Result<()> {
    r.wrap(
        ENV,
        "proxy_get_shared_data",
        |mut c: Ctx<'_>, kptr: i32, klen: i32, vptr_ptr: i32, vsize_ptr: i32, cas_ptr: i32| {
            if let Err(s) = check_ranges(&c, &[(vptr_ptr, 4), (vsize_ptr, 4), (cas_ptr, 4)]) {
                return Ok(s.code());
            }
            let found = with_guest(&mut c, kptr, klen, |key, state| {
                state.shared.get_data(&state.spec.vm_id, key)
            });
            let (value, cas) = match found {
                Ok(Some(v)) => v,
                Ok(None) => return Ok(Status::NotFound.code()),
                Err(s) => return Ok(s.code()),
            };
            let status = copy_out(&mut c, &value, vptr_ptr, vsize_ptr, Empty::Allocate)?;
            if status != Status::Ok.code() {
                return Ok(status);
            }
            Ok(status_of(write_u32(&mut c, cas_ptr, cas)))
        },
    )?;
    r.wrap(
        ENV,
        "proxy_set_shared_data",
        |mut c: Ctx<'_>, kptr: i32, klen: i32, vptr: i32, vlen: i32, cas: i32| {
            let r = with_guest2(&mut c, (kptr, klen), (vptr, vlen), |k, v, state| {
                state
                    .shared
                    .set_data(&state.spec.vm_id, k, v.to_vec(), cas as u32)
            });
            status_of(r.and_then(|x| x))
        },
    )?;
    r.wrap(
        ENV,
        "proxy_register_shared_queue",
        |mut c: Ctx<'_>, nptr: i32, nlen: i32, id_ptr: i32| {
            let r = check_writable(&c, id_ptr, 4).and_then(|()| {
                with_guest(&mut c, nptr, nlen, |name, state| {
                    state.shared.register_queue(&state.spec.vm_id, name)
                })
            });
            status_of(r.and_then(|id| write_u32(&mut c, id_ptr, id)))
        },
    )?;
    r.wrap(
        ENV,
        "proxy_resolve_shared_queue",
        |mut c: Ctx<'_>, vptr: i32, vlen: i32, nptr: i32, nlen: i32, id_ptr: i32| {
            let r = with_guest2(&mut c, (vptr, vlen), (nptr, nlen), |vm, name, state| {
                state
                    .shared
                    .resolve_queue(&String::from_utf8_lossy(vm), name)
                    .ok_or(Status::NotFound)
            });
            status_of(
                r.and_then(|x| x)
                    .and_then(|id| write_u32(&mut c, id_ptr, id)),
            )
        },
    )?;
    r.wrap(
        ENV,
        "proxy_enqueue_shared_queue",
        |mut c: Ctx<'_>, id: i32, ptr: i32, len: i32| {
            let r = with_guest(&mut c, ptr, len, |data, state| {
                state.shared.enqueue(id as u32, data.to_vec())
            });
            status_of(r.and_then(|x| x))
        },
    )?;
    r.wrap(
        ENV,
        "proxy_dequeue_shared_queue",
        |mut c: Ctx<'_>, id: i32, ptr_ptr: i32, size_ptr: i32| {
            if let Err(s) = check_ranges(&c, &[(ptr_ptr, 4), (size_ptr, 4)]) {
                return Ok(s.code());
            }
            match c.data().shared.dequeue(id as u32) {
                Ok(item) => copy_out(&mut c, &item, ptr_ptr, size_ptr, Empty::Allocate),
                Err(s) => Ok(s.code()),
            }
        },
    )?;
    Ok(())
}

fn register_metrics(r: &mut Registrar) -> wasmtime::Result<()> {
    r.wrap(
        ENV,
        "proxy_define_metric",
        |mut c: Ctx<'_>, kind: i32, nptr: i32, nlen: i32, id_ptr: i32| {
            let kind = match kind {
                0 => MetricKind::Counter,
                1 => MetricKind::Gauge,
                2 => MetricKind::Histogram,
                _ => return Status::BadArgument.code(),
            };
            let r = check_writable(&c, id_ptr, 4).and_then(|()| {
                with_guest(&mut c, nptr, nlen, |name, state| {
                    state.shared.define_metric(kind, str_lossy(name))
                })
            });
            status_of(r.and_then(|id| write_u32(&mut c, id_ptr, id)))
        },
    )?;
    r.wrap(
        ENV,
        "proxy_increment_metric",
        |c: Ctx<'_>, id: i32, offset: i64| {
            status_of(c.data().shared.increment_metric(id as u32, offset))
        },
    )?;
    r.wrap(
        ENV,
        "proxy_record_metric",
        |c: Ctx<'_>, id: i32, value: i64| {
            status_of(c.data().shared.record_metric(id as u32, value as u64))
        },
    )?;
    r.wrap(
        ENV,
        "proxy_get_metric",
        |mut c: Ctx<'_>, id: i32, out: i32| {
            let r = check_writable(&c, out, 8)
                .and_then(|()| c.data().shared.get_metric(id as u32))
                .and_then(|v| write_u64(&mut c, out, v));
            status_of(r)
        },
    )?;
    Ok(())
}

/// Callouts need the data plane to run work on the guest's behalf and call back later; until
/// that lands they fail with the statuses the SDKs treat as recoverable errors (the Rust SDK
/// panics on Unimplemented for `dispatch_http_call`, which would poison the instance).
fn register_callouts(r: &mut Registrar) -> wasmtime::Result<()> {
    r.wrap(
        ENV,
        "proxy_http_call",
        |c: Ctx<'_>,
         uptr: i32,
         ulen: i32,
         hptr: i32,
         hlen: i32,
         bptr: i32,
         blen: i32,
         tptr: i32,
         tlen: i32,
         _timeout_ms: i32,
         token_ptr: i32| {
            let r = check_ranges(
                &c,
                &[
                    (uptr, ulen),
                    (hptr, hlen),
                    (bptr, blen),
                    (tptr, tlen),
                    (token_ptr, 4),
                ],
            );
            if r.is_ok() {
                warn_unsupported(&c, "proxy_http_call");
            }
            status_of(r.and(Err(Status::InternalFailure)))
        },
    )?;
    r.wrap(
        ENV,
        "proxy_grpc_call",
        |c: Ctx<'_>,
         uptr: i32,
         ulen: i32,
         sptr: i32,
         slen: i32,
         mptr: i32,
         mlen: i32,
         iptr: i32,
         ilen: i32,
         msgptr: i32,
         msglen: i32,
         _timeout_ms: i32,
         token_ptr: i32| {
            let r = check_ranges(
                &c,
                &[
                    (uptr, ulen),
                    (sptr, slen),
                    (mptr, mlen),
                    (iptr, ilen),
                    (msgptr, msglen),
                    (token_ptr, 4),
                ],
            );
            if r.is_ok() {
                warn_unsupported(&c, "proxy_grpc_call");
            }
            status_of(r.and(Err(Status::InternalFailure)))
        },
    )?;
    r.wrap(
        ENV,
        "proxy_grpc_stream",
        |c: Ctx<'_>,
         uptr: i32,
         ulen: i32,
         sptr: i32,
         slen: i32,
         mptr: i32,
         mlen: i32,
         iptr: i32,
         ilen: i32,
         token_ptr: i32| {
            let r = check_ranges(
                &c,
                &[
                    (uptr, ulen),
                    (sptr, slen),
                    (mptr, mlen),
                    (iptr, ilen),
                    (token_ptr, 4),
                ],
            );
            if r.is_ok() {
                warn_unsupported(&c, "proxy_grpc_stream");
            }
            status_of(r.and(Err(Status::InternalFailure)))
        },
    )?;
    // No call or stream can exist yet, so every token is unknown.
    r.wrap(
        ENV,
        "proxy_grpc_send",
        |c: Ctx<'_>, _token: i32, ptr: i32, len: i32, _end: i32| {
            status_of(check_ranges(&c, &[(ptr, len)]).and(Err(Status::NotFound)))
        },
    )?;
    r.wrap(ENV, "proxy_grpc_cancel", |_c: Ctx<'_>, _token: i32| {
        Status::NotFound.code()
    })?;
    r.wrap(ENV, "proxy_grpc_close", |_c: Ctx<'_>, _token: i32| {
        Status::NotFound.code()
    })?;
    r.wrap(
        ENV,
        "proxy_call_foreign_function",
        |c: Ctx<'_>, nptr: i32, nlen: i32, aptr: i32, alen: i32, rptr_ptr: i32, rsize_ptr: i32| {
            // No foreign functions are registered: every name is unknown.
            let r = check_ranges(
                &c,
                &[(nptr, nlen), (aptr, alen), (rptr_ptr, 4), (rsize_ptr, 4)],
            );
            status_of(r.and(Err(Status::NotFound)))
        },
    )?;
    Ok(())
}

/// Decodes an AssemblyScript string (UTF-16LE, byte length stored just before it).
fn assemblyscript_string(c: &mut Ctx<'_>, ptr: i32) -> String {
    if ptr == 0 {
        return String::new();
    }
    let Ok(len) = read(c, ptr.wrapping_sub(4), 4) else {
        return String::new();
    };
    let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]).min(4096) as i32;
    let Ok(bytes) = read(c, ptr, len) else {
        return String::new();
    };
    let units: Vec<u16> = bytes
        .chunks_exact(2)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
        .collect();
    String::from_utf16_lossy(&units)
}

fn register_runtime_extras(r: &mut Registrar) -> wasmtime::Result<()> {
    r.wrap(
        ENV,
        "abort",
        |mut c: Ctx<'_>, msg: i32, file: i32, line: i32, col: i32| -> wasmtime::Result<()> {
            let msg = assemblyscript_string(&mut c, msg);
            let file = assemblyscript_string(&mut c, file);
            Err(wasmtime::Error::new(GuestExit::Abort(format!(
                "{msg} at {file}:{line}:{col}"
            ))))
        },
    )?;
    r.wrap(ENV, "seed", |_c: Ctx<'_>| -> f64 {
        rand::random::<f64>() * (u32::MAX as f64)
    })?;
    r.wrap(
        ENV,
        "trace",
        |mut c: Ctx<'_>, msg: i32, n: i32, a0: f64, a1: f64, a2: f64, a3: f64, a4: f64| {
            let msg = assemblyscript_string(&mut c, msg);
            let args = [a0, a1, a2, a3, a4];
            let shown = &args[..(n.clamp(0, 5) as usize)];
            let _ = emit_log(2, &c.data().spec.name, &format!("trace: {msg} {shown:?}"));
        },
    )?;
    r.wrap(
        ENV,
        "emscripten_notify_memory_growth",
        |_c: Ctx<'_>, _index: i32| {},
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::splice_buffer;

    fn spliced(start: u32, size: u32, data: &[u8]) -> Vec<u8> {
        let mut b = b"hello".to_vec();
        splice_buffer(&mut b, start, size, data);
        b
    }

    #[test]
    fn set_buffer_rules() {
        assert_eq!(spliced(0, 0, b">>"), b">>hello");
        assert_eq!(spliced(5, 0, b"!"), b"hello!");
        assert_eq!(spliced(u32::MAX, 0, b"!"), b"hello!");
        assert_eq!(spliced(0, 5, b"bye"), b"bye");
        assert_eq!(spliced(0, 99, b"bye"), b"bye");
        assert_eq!(spliced(1, 3, b"ipp"), b"hippo");
        assert_eq!(spliced(4, 10, b"!"), b"hell!");
    }
}
