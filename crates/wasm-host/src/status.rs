/// `proxy_status_t` values returned by host functions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub(crate) enum Status {
    Ok = 0,
    NotFound = 1,
    BadArgument = 2,
    ParseFailure = 4,
    InvalidMemoryAccess = 6,
    Empty = 7,
    CasMismatch = 8,
    InternalFailure = 10,
    BrokenConnection = 11,
}

impl Status {
    pub(crate) fn code(self) -> i32 {
        self as i32
    }
}

/// Collapses a host-call body's outcome into the status word returned to the guest.
pub(crate) fn status_of(r: Result<(), Status>) -> i32 {
    match r {
        Ok(()) => Status::Ok.code(),
        Err(s) => s.code(),
    }
}
