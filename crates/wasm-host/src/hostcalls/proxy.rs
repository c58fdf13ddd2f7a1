//! The Proxy-Wasm host functions (module `env`), plus the few `env` imports that SDK runtimes
//! bring along (AssemblyScript's `abort`/`seed`/`trace`, Emscripten's memory-growth hook).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tracing::Level;

use super::{
    Ctx, LOG_TARGET, Registrar, check_writable, copy_out, deserialize_map, emit_log, properties,
    read, serialize_map, with_guest, with_guest2, write_u32, write_u64,
};
use crate::shared::MetricKind;
use crate::state::{ContextAction, GuestExit, HostState};
use crate::status::{Status, status_of};
use crate::types::{GrpcCommand, GrpcTarget, HeaderMap, LocalResponse, PendingCallout, StreamType};

const ENV: &str = "env";

fn header_map(state: &mut HostState, map_type: i32) -> Result<&mut HeaderMap, Status> {
    let found = match map_type {
        0..=3 => {
            let stream = state.effective_stream().ok_or(Status::NotFound)?;
            match map_type {
                0 => stream.convert_request_headers(),
                1 => &mut stream.request_trailers,
                2 => stream.convert_response_headers(),
                _ => &mut stream.response_trailers,
            }
        }
        // Readable only while the answer of a callout is being delivered.
        4 => state
            .delivery
            .grpc_initial
            .as_mut()
            .ok_or(Status::NotFound)?,
        5 => state
            .delivery
            .grpc_trailing
            .as_mut()
            .ok_or(Status::NotFound)?,
        6 => {
            &mut state
                .delivery
                .http_response
                .as_mut()
                .ok_or(Status::NotFound)?
                .headers
        }
        7 => {
            &mut state
                .delivery
                .http_response
                .as_mut()
                .ok_or(Status::NotFound)?
                .trailers
        }
        _ => return Err(Status::BadArgument),
    };
    Ok(found)
}

fn buffer(state: &mut HostState, buffer_type: i32) -> Result<&[u8], Status> {
    match buffer_type {
        0 => Ok(&state
            .effective_stream()
            .ok_or(Status::NotFound)?
            .request_body),
        1 => Ok(&state
            .effective_stream()
            .ok_or(Status::NotFound)?
            .response_body),
        2 => Ok(&state
            .network
            .as_ref()
            .ok_or(Status::NotFound)?
            .downstream_data),
        3 => Ok(&state
            .network
            .as_ref()
            .ok_or(Status::NotFound)?
            .upstream_data),
        4 => Ok(&state
            .delivery
            .http_response
            .as_ref()
            .ok_or(Status::NotFound)?
            .body),
        5 => Ok(state
            .delivery
            .grpc_message
            .as_deref()
            .ok_or(Status::NotFound)?),
        6 => Ok(&state.spec.vm_configuration),
        7 => Ok(&state.spec.plugin_configuration),
        // Foreign-function call data: no foreign functions call into plugins.
        8 => Err(Status::NotFound),
        _ => Err(Status::BadArgument),
    }
}

fn buffer_mut(state: &mut HostState, buffer_type: i32) -> Result<&mut Vec<u8>, Status> {
    match buffer_type {
        0 => Ok(&mut state
            .effective_stream()
            .ok_or(Status::NotFound)?
            .request_body),
        1 => Ok(&mut state
            .effective_stream()
            .ok_or(Status::NotFound)?
            .response_body),
        2 => Ok(&mut state
            .network
            .as_mut()
            .ok_or(Status::NotFound)?
            .downstream_data),
        3 => Ok(&mut state
            .network
            .as_mut()
            .ok_or(Status::NotFound)?
            .upstream_data),
        4 => Ok(&mut state
            .delivery
            .http_response
            .as_mut()
            .ok_or(Status::NotFound)?
            .body),
        5 => state.delivery.grpc_message.as_mut().ok_or(Status::NotFound),
        // Configuration buffers are read-only.
        6 | 7 => Err(Status::BadArgument),
        8 => Err(Status::NotFound),
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
    // Only a root context whose proxy_on_done answered false can be finished: Envoy answers
    // NotFound otherwise.
    r.wrap(ENV, "proxy_done", |mut c: Ctx<'_>| {
        if !c.data().root_closing {
            return Status::NotFound.code();
        }
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
            let bytes = match buffer(c.data_mut(), t) {
                Ok(buf) => {
                    let start = (start as u32 as usize).min(buf.len());
                    let end = start.saturating_add(max as u32 as usize).min(buf.len());
                    buf[start..end].to_vec()
                }
                Err(s) => return Ok(s.code()),
            };
            copy_out(&mut c, &bytes, ptr_ptr, size_ptr)
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
            let len = match buffer(c.data_mut(), t) {
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
            copy_out(&mut c, &config, ptr_ptr, size_ptr)
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
                Ok(m) => serialize_map(m.iter()),
                Err(s) => return Ok(s.code()),
            };
            copy_out(&mut c, &data, ptr_ptr, size_ptr)
        },
    )?;
    r.wrap(
        ENV,
        "proxy_set_header_map_pairs",
        |mut c: Ctx<'_>, t: i32, ptr: i32, len: i32| {
            let r = with_guest(&mut c, ptr, len, |data, state| {
                let map = header_map(state, t)?;
                let pairs = deserialize_map(data).ok_or(Status::BadArgument)?;
                map.replace_all(&pairs);
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
                let mut value = std::mem::take(&mut state.scratch);
                value.clear();
                let abi = state.abi;
                // Headers not converted yet are read from their source when it can answer.
                let pending = match (t, state.effective_stream()) {
                    (0, Some(s)) => s.request_source.as_ref(),
                    (2, Some(s)) => s.response_source.as_ref(),
                    _ => None,
                };
                let found = match pending.and_then(|src| src.first_value(key, &mut value)) {
                    Some(found) => found,
                    // Like Envoy: the first of repeated values, not a joined list.
                    None => match header_map(state, t)?.get(key) {
                        Some(v) => {
                            value.extend_from_slice(v);
                            true
                        }
                        None => false,
                    },
                };
                // Envoy answers a missing header with NotFound, except to ABI 0.1.0 modules,
                // which get Ok and an empty value (their SDKs treat NotFound as fatal).
                if !found && abi != crate::types::AbiVersion::V0_1_0 {
                    state.scratch = value;
                    return Err(Status::NotFound);
                }
                Ok(value)
            });
            match r.and_then(|x| x) {
                Ok(value) => {
                    let r = copy_out(&mut c, &value, vptr_ptr, vsize_ptr);
                    c.data_mut().scratch = value;
                    r
                }
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
                Ok(m) => m.byte_size(),
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
        2 => Ok(StreamType::Downstream),
        3 => Ok(StreamType::Upstream),
        _ => Err(Status::BadArgument),
    }
}

/// Records that the guest asked to resume `st` of the effective context: on the running
/// callback's stream directly, or as an action for the embedder when the guest switched to
/// another context (e.g. a root context resuming a request it paused).
fn request_continue(c: &mut Ctx<'_>, st: StreamType) -> Result<(), Status> {
    let state = c.data_mut();
    if state.switched_context() {
        let context_id = state.effective_context;
        state.context_actions.push(ContextAction::Continue {
            context_id,
            stream: st,
        });
        return Ok(());
    }
    match st {
        StreamType::Request | StreamType::Response => {
            state
                .stream
                .as_mut()
                .ok_or(Status::NotFound)?
                .continue_requested = Some(st);
        }
        // L4 data flows on as soon as the callback returns Continue: nothing is held back.
        StreamType::Downstream | StreamType::Upstream if state.network.is_some() => {}
        // Outside the connection's own callbacks (a callout answer delivered to the network
        // context that made the call): Envoy's `continueReading` on that connection.
        StreamType::Downstream | StreamType::Upstream if outside_own_callbacks(state) => {
            let context_id = state.effective_context;
            state.context_actions.push(ContextAction::Continue {
                context_id,
                stream: st,
            });
        }
        StreamType::Downstream | StreamType::Upstream => return Err(Status::NotFound),
    }
    Ok(())
}

/// A non-root context running with neither an HTTP stream nor a connection attached: an
/// answer (callout) delivered to the context that asked, whose stream actions the embedder
/// applies to its connection.
fn outside_own_callbacks(state: &HostState) -> bool {
    state.network.is_none()
        && state.stream.is_none()
        && state.current_context != crate::instance::ROOT_CONTEXT
}

fn request_close(c: &mut Ctx<'_>, st: StreamType) -> Result<(), Status> {
    let state = c.data_mut();
    if state.switched_context() {
        let context_id = state.effective_context;
        state.context_actions.push(ContextAction::Close {
            context_id,
            stream: st,
        });
        return Ok(());
    }
    match st {
        StreamType::Request | StreamType::Response => {
            state.stream.as_ref().ok_or(Status::NotFound)?;
            state.close_requested = Some(st);
        }
        StreamType::Downstream | StreamType::Upstream if state.network.is_some() => {
            if let Some(network) = state.network.as_mut() {
                network.close_requested = Some(st);
            }
        }
        // Outside the connection's own callbacks (a callout answer): the embedder closes that
        // connection.
        StreamType::Downstream | StreamType::Upstream if outside_own_callbacks(state) => {
            let context_id = state.effective_context;
            state.context_actions.push(ContextAction::Close {
                context_id,
                stream: st,
            });
        }
        StreamType::Downstream | StreamType::Upstream => return Err(Status::NotFound),
    }
    Ok(())
}

fn register_stream(r: &mut Registrar) -> wasmtime::Result<()> {
    // 0.2.x spellings; 0.1.0 modules may not import them (checked at compile time).
    r.wrap(ENV, "proxy_continue_stream", |mut c: Ctx<'_>, t: i32| {
        status_of(stream_type(t).and_then(|st| request_continue(&mut c, st)))
    })?;
    r.wrap(ENV, "proxy_close_stream", |mut c: Ctx<'_>, t: i32| {
        status_of(stream_type(t).and_then(|st| request_close(&mut c, st)))
    })?;
    // ABI 0.1.0 only.
    r.wrap(ENV, "proxy_continue_request", |mut c: Ctx<'_>| {
        status_of(request_continue(&mut c, StreamType::Request))
    })?;
    r.wrap(ENV, "proxy_continue_response", |mut c: Ctx<'_>| {
        status_of(request_continue(&mut c, StreamType::Response))
    })?;
    // Routing is decided before the chain runs and not re-evaluated, so there is no cache.
    r.wrap(ENV, "proxy_clear_route_cache", |_c: Ctx<'_>| {
        Status::Ok.code()
    })?;
    // The status of the callout answer being delivered (gRPC close status and message, or
    // BrokenConnection for a failed HTTP call); 0 and no message otherwise.
    r.wrap(
        ENV,
        "proxy_get_status",
        |mut c: Ctx<'_>, code_ptr: i32, msg_ptr_ptr: i32, msg_size_ptr: i32| {
            if let Err(s) = check_ranges(&c, &[(code_ptr, 4), (msg_ptr_ptr, 4), (msg_size_ptr, 4)])
            {
                return Ok(s.code());
            }
            let (code, message) = c.data().delivery.status.clone().unwrap_or_default();
            let status = copy_out(&mut c, &message, msg_ptr_ptr, msg_size_ptr)?;
            if status != Status::Ok.code() {
                return Ok(status);
            }
            Ok(status_of(write_u32(&mut c, code_ptr, code)))
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
                let response = LocalResponse {
                    status,
                    details: str_lossy(&details),
                    body,
                    headers,
                    grpc_status,
                };
                let state = c.data_mut();
                if state.switched_context() {
                    let context_id = state.effective_context;
                    state.context_actions.push(ContextAction::LocalResponse {
                        context_id,
                        response,
                    });
                    return Ok(());
                }
                let stream = state.stream.as_mut().ok_or(Status::NotFound)?;
                stream.local_response = Some(response);
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
                // `request.*` and `response.*` properties read the headers: convert them if
                // pending.
                if let Some(stream) = state.stream.as_mut() {
                    if path.starts_with(b"request") {
                        stream.convert_request_headers();
                    } else if path.starts_with(b"response") {
                        stream.convert_response_headers();
                    }
                }
                properties::get_property(state, path).ok_or(Status::NotFound)
            });
            match r.and_then(|x| x) {
                Ok(value) => copy_out(&mut c, &value, vptr_ptr, vsize_ptr),
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
            let status = copy_out(&mut c, &value, vptr_ptr, vsize_ptr)?;
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
                    // Ready notifications go to this instance's root context.
                    let owner = state.queue_signal.clone();
                    state
                        .shared
                        .register_queue(&state.spec.vm_id, name, Some(&owner))
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
                Ok(item) => copy_out(&mut c, &item, ptr_ptr, size_ptr),
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

/// Most callouts one instance may have queued or in flight: a guest looping on
/// `proxy_http_call` must not grow host memory without bound.
const MAX_OUTSTANDING_CALLOUTS: usize = 10_000;

fn read_map(c: &mut Ctx<'_>, ptr: i32, len: i32) -> Result<Vec<(String, Vec<u8>)>, Status> {
    let bytes = read(c, ptr, len)?;
    deserialize_map(&bytes).ok_or(Status::ParseFailure)
}

fn check_upstream(state: &HostState, upstream: &str) -> Result<(), Status> {
    match &state.upstream_check {
        Some(known) if !known(upstream) => Err(Status::BadArgument),
        _ => Ok(()),
    }
}

fn outstanding(state: &HostState) -> usize {
    let co = &state.callouts;
    co.http_owner.len() + co.grpc_owner.len() + co.queued_grpc.len()
}

fn timeout(ms: i32) -> Duration {
    // 0 means no timeout, as for Envoy's async client.
    Duration::from_millis(u64::from(ms as u32))
}

/// The upstream of a gRPC call: Envoy accepts either a cluster name or a serialized
/// `envoy.config.core.v3.GrpcService`, from which the `envoy_grpc.cluster_name` is taken.
fn grpc_upstream(bytes: &[u8]) -> Result<String, Status> {
    if let Ok(name) = std::str::from_utf8(bytes)
        && !name.is_empty()
        && name.chars().all(|ch| !ch.is_control())
    {
        return Ok(name.to_owned());
    }
    // GrpcService { envoy_grpc (1): EnvoyGrpc { cluster_name (1): string } }
    let envoy_grpc = proto_field(bytes, 1).ok_or(Status::ParseFailure)?;
    let cluster = proto_field(envoy_grpc, 1).ok_or(Status::ParseFailure)?;
    String::from_utf8(cluster.to_vec()).map_err(|_| Status::ParseFailure)
}

/// The first length-delimited field `number` of a protobuf message, skipping other fields.
fn proto_field(mut msg: &[u8], number: u64) -> Option<&[u8]> {
    fn varint(b: &mut &[u8]) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (first, rest) = b.split_first()?;
            *b = rest;
            v |= u64::from(first & 0x7f) << shift;
            if first & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }
    while !msg.is_empty() {
        let key = varint(&mut msg)?;
        match key & 7 {
            0 => {
                varint(&mut msg)?;
            }
            1 => msg = msg.get(8..)?,
            5 => msg = msg.get(4..)?,
            2 => {
                let len = usize::try_from(varint(&mut msg)?).ok()?;
                let value = msg.get(..len)?;
                msg = &msg[len..];
                if key >> 3 == number {
                    return Some(value);
                }
            }
            _ => return None,
        }
    }
    None
}

fn grpc_target(
    c: &mut Ctx<'_>,
    upstream: (i32, i32),
    service: (i32, i32),
    method: (i32, i32),
    metadata: (i32, i32),
) -> Result<GrpcTarget, Status> {
    let upstream = read(c, upstream.0, upstream.1)?;
    let service = read(c, service.0, service.1)?;
    let method = read(c, method.0, method.1)?;
    let initial_metadata = read_map(c, metadata.0, metadata.1)?;
    let upstream = grpc_upstream(&upstream)?;
    check_upstream(c.data(), &upstream)?;
    Ok(GrpcTarget {
        upstream,
        service: str_lossy(&service),
        method: str_lossy(&method),
        initial_metadata,
    })
}

fn register_callouts(r: &mut Registrar) -> wasmtime::Result<()> {
    r.wrap(
        ENV,
        "proxy_http_call",
        |mut c: Ctx<'_>,
         uptr: i32,
         ulen: i32,
         hptr: i32,
         hlen: i32,
         bptr: i32,
         blen: i32,
         tptr: i32,
         tlen: i32,
         timeout_ms: i32,
         token_ptr: i32| {
            let r = (|| {
                check_writable(&c, token_ptr, 4)?;
                let upstream = read(&mut c, uptr, ulen)?;
                let headers = read_map(&mut c, hptr, hlen)?;
                let body = read(&mut c, bptr, blen)?;
                let trailers = read_map(&mut c, tptr, tlen)?;
                let upstream = String::from_utf8(upstream).map_err(|_| Status::BadArgument)?;
                // Envoy refuses a call it could not turn into a request.
                for required in [":method", ":path", ":authority"] {
                    if !headers.iter().any(|(k, _)| k == required) {
                        return Err(Status::BadArgument);
                    }
                }
                let state = c.data_mut();
                check_upstream(state, &upstream)?;
                if outstanding(state) >= MAX_OUTSTANDING_CALLOUTS {
                    return Err(Status::InternalFailure);
                }
                let co = &mut state.callouts;
                let token = co.next_http_token;
                co.next_http_token = token.wrapping_add(1).max(1);
                let context_id = state.effective_context;
                co.http_owner.insert(token, context_id);
                co.queued_http.push(PendingCallout {
                    token,
                    context_id,
                    upstream,
                    headers,
                    body,
                    trailers,
                    timeout: timeout(timeout_ms),
                });
                write_u32(&mut c, token_ptr, token)
            })();
            status_of(r)
        },
    )?;
    r.wrap(
        ENV,
        "proxy_grpc_call",
        |mut c: Ctx<'_>,
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
         timeout_ms: i32,
         token_ptr: i32| {
            let r = (|| {
                check_writable(&c, token_ptr, 4)?;
                let call = grpc_target(
                    &mut c,
                    (uptr, ulen),
                    (sptr, slen),
                    (mptr, mlen),
                    (iptr, ilen),
                )?;
                let message = read(&mut c, msgptr, msglen)?;
                let state = c.data_mut();
                if outstanding(state) >= MAX_OUTSTANDING_CALLOUTS {
                    return Err(Status::InternalFailure);
                }
                let context_id = state.effective_context;
                let co = &mut state.callouts;
                // Unary calls get odd tokens, streams even ones (as in Envoy), so a token says
                // which kind it names.
                let token = co.next_grpc_call;
                co.next_grpc_call = token.wrapping_add(2).max(1);
                co.grpc_owner.insert(token, context_id);
                co.queued_grpc.push(GrpcCommand::Call {
                    token,
                    context_id,
                    call,
                    message,
                    timeout: timeout(timeout_ms),
                });
                write_u32(&mut c, token_ptr, token)
            })();
            status_of(r)
        },
    )?;
    r.wrap(
        ENV,
        "proxy_grpc_stream",
        |mut c: Ctx<'_>,
         uptr: i32,
         ulen: i32,
         sptr: i32,
         slen: i32,
         mptr: i32,
         mlen: i32,
         iptr: i32,
         ilen: i32,
         token_ptr: i32| {
            let r = (|| {
                check_writable(&c, token_ptr, 4)?;
                let call = grpc_target(
                    &mut c,
                    (uptr, ulen),
                    (sptr, slen),
                    (mptr, mlen),
                    (iptr, ilen),
                )?;
                let state = c.data_mut();
                if outstanding(state) >= MAX_OUTSTANDING_CALLOUTS {
                    return Err(Status::InternalFailure);
                }
                let context_id = state.effective_context;
                let co = &mut state.callouts;
                let token = co.next_grpc_stream;
                co.next_grpc_stream = token.wrapping_add(2).max(2);
                co.grpc_owner.insert(token, context_id);
                co.queued_grpc.push(GrpcCommand::OpenStream {
                    token,
                    context_id,
                    call,
                });
                write_u32(&mut c, token_ptr, token)
            })();
            status_of(r)
        },
    )?;
    r.wrap(
        ENV,
        "proxy_grpc_send",
        |mut c: Ctx<'_>, token: i32, ptr: i32, len: i32, end: i32| {
            let token = token as u32;
            let r = (|| {
                let message = read(&mut c, ptr, len)?;
                let co = &mut c.data_mut().callouts;
                if !co.grpc_owner.contains_key(&token) {
                    return Err(Status::NotFound);
                }
                if token % 2 == 1 {
                    // A unary call's only message was given with proxy_grpc_call.
                    return Err(Status::BadArgument);
                }
                co.queued_grpc.push(GrpcCommand::Send {
                    token,
                    message,
                    end_of_stream: end != 0,
                });
                Ok(())
            })();
            status_of(r)
        },
    )?;
    r.wrap(ENV, "proxy_grpc_cancel", |mut c: Ctx<'_>, token: i32| {
        let token = token as u32;
        let co = &mut c.data_mut().callouts;
        if co.grpc_owner.remove(&token).is_none() {
            return Status::NotFound.code();
        }
        co.queued_grpc.push(GrpcCommand::Cancel { token });
        Status::Ok.code()
    })?;
    r.wrap(ENV, "proxy_grpc_close", |mut c: Ctx<'_>, token: i32| {
        let token = token as u32;
        let co = &mut c.data_mut().callouts;
        if !co.grpc_owner.contains_key(&token) {
            return Status::NotFound.code();
        }
        if token % 2 == 1 {
            // Closing a unary call abandons it, as Envoy does.
            co.grpc_owner.remove(&token);
            co.queued_grpc.push(GrpcCommand::Cancel { token });
        } else {
            co.queued_grpc.push(GrpcCommand::Close { token });
        }
        Status::Ok.code()
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
    use super::{grpc_upstream, splice_buffer};

    #[test]
    fn grpc_upstream_from_name_or_grpc_service() {
        assert_eq!(
            grpc_upstream(b"outbound|9090||grpc.default.svc.cluster.local").unwrap(),
            "outbound|9090||grpc.default.svc.cluster.local"
        );
        // GrpcService { envoy_grpc: { cluster_name: "ext" } }, with a timeout field (3) first.
        let proto = [
            0x1a, 0x02, 0x08, 0x01, 0x0a, 0x05, 0x0a, 0x03, b'e', b'x', b't',
        ];
        assert_eq!(grpc_upstream(&proto).unwrap(), "ext");
        assert!(grpc_upstream(&[0x0a, 0x09, 0x0a]).is_err());
        assert!(grpc_upstream(b"").is_err());
    }

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
