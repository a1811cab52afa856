//! The one error type of moe-ep.
use std::fmt;

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong, as data. No function of this crate panics on bad input
/// or on a failing driver; kernels report timeouts through host-visible memory.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    /// A CUDA driver call failed.
    Driver {
        /// The driver function.
        call: &'static str,
        /// Its `CUresult` code.
        code: i32,
        /// The driver's name for the code.
        name: String,
    },
    /// No CUDA driver could be loaded (no GPU machine, or no `libcuda.so`).
    NoDriver(String),
    /// An argument failed validation; nothing was launched.
    InvalidArgument {
        /// The argument.
        arg: &'static str,
        /// What was expected.
        reason: String,
    },
    /// The request is valid but not supported by this build or back end.
    Unsupported(String),
    /// A device-side wait ran out of time.
    Timeout {
        /// Rank whose kernel gave up.
        rank: u32,
        /// Rank it waited for (`u32::MAX` when not a peer wait).
        peer: u32,
        /// Block (channel) that gave up.
        block: u32,
        /// Which wait in the kernel (see the kernel's docs).
        site: u32,
        /// What the kernel expected to see.
        expected: u64,
        /// What it last saw.
        observed: u64,
    },
    /// A kernel reported an inconsistent launch (a bug in moe-ep: please report it).
    BadLaunch {
        /// The kernel.
        kernel: &'static str,
        /// The rank.
        rank: u32,
    },
    /// A kernel faulted (on the emulator: panicked).
    KernelFault(String),
    /// Rank bootstrap failed: a peer did not arrive in time, bad environment, bad secret.
    Bootstrap(String),
    /// An operating-system call failed.
    Io(String),
    /// A struct crossing an ABI boundary had the wrong size or magic.
    AbiMismatch(String),
}

impl Error {
    /// Shorthand for [`Error::InvalidArgument`].
    pub fn invalid(arg: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidArgument { arg, reason: reason.into() }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Driver { call, code, name } => write!(f, "CUDA driver call {call} failed: {name} ({code})"),
            Error::NoDriver(why) => write!(f, "no CUDA driver available: {why}"),
            Error::InvalidArgument { arg, reason } => write!(f, "invalid argument `{arg}`: {reason}"),
            Error::Unsupported(what) => write!(f, "unsupported: {what}"),
            Error::Timeout { rank, peer, block, site, expected, observed } => write!(
                f,
                "rank {rank} timed out waiting for rank {peer} (block {block}, wait site {site}, expected {expected}, saw {observed})"
            ),
            Error::BadLaunch { kernel, rank } => write!(f, "kernel {kernel} on rank {rank} rejected its launch shape"),
            Error::KernelFault(msg) => write!(f, "kernel fault: {msg}"),
            Error::Bootstrap(msg) => write!(f, "bootstrap failed: {msg}"),
            Error::Io(msg) => write!(f, "I/O error: {msg}"),
            Error::AbiMismatch(msg) => write!(f, "ABI mismatch: {msg}"),
        }
    }
}

impl std::error::Error for Error {}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Io(e.to_string())
    }
}
