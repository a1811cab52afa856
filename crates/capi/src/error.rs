//! Errors as NCCL result codes, with a message per thread for `moeEpGetLastError`; no panic
//! crosses the boundary.
use crate::sys::{
    ncclInternalError, ncclInvalidArgument, ncclInvalidUsage, ncclRemoteError, ncclResult_t, ncclSuccess,
    ncclSystemError, ncclUnhandledCudaError,
};
use std::cell::RefCell;
use std::ffi::{CString, c_char};
use std::panic::{AssertUnwindSafe, catch_unwind};

/// A failed call: its NCCL code and what went wrong.
#[derive(Debug)]
pub struct Failure {
    pub code: ncclResult_t,
    pub message: String,
}

pub type Result<T, E = Failure> = std::result::Result<T, E>;

impl Failure {
    /// `ncclInvalidArgument`: a bad pointer, struct, tensor or value.
    pub fn invalid(message: impl Into<String>) -> Failure {
        Failure { code: ncclInvalidArgument, message: message.into() }
    }

    /// `ncclInvalidUsage`: valid on its own, but not in this state or not supported.
    pub fn usage(message: impl Into<String>) -> Failure {
        Failure { code: ncclInvalidUsage, message: message.into() }
    }

    /// `ncclSystemError`: the environment (a library missing, a socket).
    pub fn system(message: impl Into<String>) -> Failure {
        Failure { code: ncclSystemError, message: message.into() }
    }
}

impl From<moe_ep::Error> for Failure {
    fn from(e: moe_ep::Error) -> Failure {
        use moe_ep::Error as E;
        let code = match &e {
            E::InvalidArgument { .. } | E::AbiMismatch(_) => ncclInvalidArgument,
            E::Unsupported(_) => ncclInvalidUsage,
            E::Driver { .. } => ncclUnhandledCudaError,
            E::NoDriver(_) | E::Io(_) | E::Bootstrap(_) => ncclSystemError,
            // A peer that did not arrive in time: NCCL's code for a remote failure.
            E::Timeout { .. } => ncclRemoteError,
            _ => ncclInternalError,
        };
        Failure { code, message: e.to_string() }
    }
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(message: &str) {
    // Interior NULs would cut the message short in C: replace them.
    let text = CString::new(message.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|m| *m.borrow_mut() = text);
}

/// The message of the last failed call on this thread ("" after a success), valid until this
/// thread's next call into the library.
pub fn last_error() -> *const c_char {
    LAST_ERROR.with(|m| m.borrow().as_ptr())
}

/// Runs the body of C function `name`: its error (or a panic, a bug) becomes a code and this
/// thread's last-error message; success clears the message.
pub fn guard(name: &str, body: impl FnOnce() -> Result<()>) -> ncclResult_t {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => {
            set_last_error("");
            ncclSuccess
        }
        Ok(Err(f)) => {
            set_last_error(&format!("{name}: {}", f.message));
            f.code
        }
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            set_last_error(&format!("{name}: internal error (please report): {what}"));
            ncclInternalError
        }
    }
}
