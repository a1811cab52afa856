//! CPU back end: host memory for "device" buffers, the emulator for launches, and memfd
//! mappings as the shareable (cross-process) memory.
use crate::{Error, Result};
use std::alloc::Layout;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Alignment of every emulated device allocation (as `cuMemAlloc` gives 256 bytes).
pub(crate) const ALIGN: usize = 256;

pub(crate) fn heap_layout(bytes: usize) -> Result<Layout> {
    Layout::from_size_align(bytes.max(1), ALIGN).map_err(|e| Error::invalid("bytes", e.to_string()))
}

/// Zeroed, 256-byte aligned host memory.
pub(crate) fn heap_alloc(bytes: usize) -> Result<*mut u8> {
    let layout = heap_layout(bytes)?;
    // SAFETY: non-zero size.
    let p = unsafe { std::alloc::alloc_zeroed(layout) };
    if p.is_null() {
        return Err(Error::Io(format!("out of host memory allocating {bytes} bytes")));
    }
    Ok(p)
}

/// # Safety
/// `p` came from [`heap_alloc`] with the same `bytes`, freed once.
pub(crate) unsafe fn heap_free(p: *mut u8, bytes: usize) {
    if let Ok(layout) = heap_layout(bytes) {
        // SAFETY: caller's contract.
        unsafe { std::alloc::dealloc(p, layout) }
    }
}

/// A zeroed anonymous shared file of `bytes` bytes (memfd), mapped shared.
pub(crate) fn shared_create(bytes: usize) -> Result<(OwnedFd, *mut u8)> {
    // SAFETY: the name is a static NUL-terminated string.
    let fd = unsafe { libc::memfd_create(c"moe-ep-shared".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: valid fd.
    if unsafe { libc::ftruncate(fd.as_raw_fd(), bytes.max(1) as libc::off_t) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    let p = shared_map(fd.as_raw_fd(), bytes)?;
    Ok((fd, p))
}

/// Maps `bytes` of the shared file `fd`.
pub(crate) fn shared_map(fd: RawFd, bytes: usize) -> Result<*mut u8> {
    // SAFETY: mapping a file we hold open; the kernel validates the arguments.
    let p = unsafe {
        libc::mmap(std::ptr::null_mut(), bytes.max(1), libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd, 0)
    };
    if p == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(p as *mut u8)
}

/// # Safety
/// `p`/`bytes` is a mapping made by [`shared_map`], unmapped once.
pub(crate) unsafe fn shared_unmap(p: *mut u8, bytes: usize) {
    // SAFETY: caller's contract.
    unsafe { libc::munmap(p as *mut libc::c_void, bytes.max(1)) };
}
