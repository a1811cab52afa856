//! Passing file descriptors between processes of one host: the exporter publishes
//! `(pid, fd)` through the bootstrap, the importer duplicates the descriptor with
//! `pidfd_getfd(2)` (Linux ≥ 5.6; needs ptrace rights over the exporter: same user and no
//! Yama restriction, or CAP_SYS_PTRACE). This is how VMM (`cuMemCreate`) and memfd
//! allocations become shared without a Unix-socket side channel.
use crate::{Error, Result};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// Duplicates descriptor `fd` of process `pid` into this process.
pub fn fetch_fd(pid: u32, fd: RawFd) -> Result<OwnedFd> {
    // SAFETY: plain syscalls; the kernel checks every argument.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if pidfd < 0 {
        return Err(Error::Io(format!("pidfd_open({pid}): {}", std::io::Error::last_os_error())));
    }
    // SAFETY: a fresh descriptor we own.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as RawFd) };
    use std::os::fd::AsRawFd;
    // SAFETY: as above.
    let got = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    if got < 0 {
        return Err(Error::Io(format!(
            "pidfd_getfd(pid {pid}, fd {fd}): {} (sharing by descriptor needs ptrace rights over the peer; use CUDA IPC handles instead)",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(got as RawFd) })
}
