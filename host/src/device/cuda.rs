//! CUDA back end: the driver API through `cudarc::driver::sys`, loaded at run time. Every raw
//! driver call of the crate is made here; `mod.rs` uses the checked wrappers at the end.
//!
//! Memory comes from `cuMemAlloc` (never cudarc's stream-ordered pools: pool memory can't
//! be exported with `cuIpcGetMemHandle` and isn't reachable by peers through
//! `cuCtxEnablePeerAccess`) or from VMM (`cuMemCreate`, POSIX-fd shareable).
use crate::{Error, Result};
use cudarc::driver::CudaContext;
use cudarc::driver::sys::{self, CUresult};
use std::collections::HashMap;
use std::ffi::{CStr, c_void};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex, OnceLock};

/// Turns a driver status into a `Result`, naming the call.
pub(crate) fn check(call: &'static str, r: CUresult) -> Result<()> {
    if r == CUresult::CUDA_SUCCESS {
        return Ok(());
    }
    let mut name: *const std::ffi::c_char = std::ptr::null();
    // SAFETY: cuGetErrorName writes a pointer to a static string or leaves it null.
    unsafe { sys::cuGetErrorName(r, &mut name) };
    let name = if name.is_null() {
        format!("{r:?}")
    } else {
        // SAFETY: non-null pointers from cuGetErrorName are static C strings.
        unsafe { CStr::from_ptr(name) }.to_string_lossy().into_owned()
    };
    Err(Error::Driver { call, code: r as i32, name })
}

/// Loads and initialises the driver once; a missing `libcuda` is an error, not a panic.
pub(crate) fn driver() -> Result<()> {
    static INIT: OnceLock<Result<()>> = OnceLock::new();
    INIT.get_or_init(|| {
        // SAFETY: probing for the library has no preconditions.
        if !unsafe { sys::is_culib_present() } {
            return Err(Error::NoDriver("libcuda.so could not be loaded".into()));
        }
        // cudarc panics if a symbol is missing: keep that from escaping.
        // SAFETY: cuInit has no preconditions.
        match std::panic::catch_unwind(|| unsafe { sys::cuInit(0) }) {
            Ok(r) => check("cuInit", r),
            Err(_) => Err(Error::NoDriver("the CUDA driver lacks a required entry point".into())),
        }
    })
    .clone()
}

/// Number of CUDA devices (an error when there is no driver).
pub(crate) fn device_count() -> Result<usize> {
    driver()?;
    let mut n = 0;
    // SAFETY: writes one int.
    check("cuDeviceGetCount", unsafe { sys::cuDeviceGetCount(&mut n) })?;
    Ok(n.max(0) as usize)
}

/// One GPU: its primary context and the loaded kernel module.
pub(crate) struct CudaDevice {
    pub(crate) ctx: Arc<CudaContext>,
    /// A private stream for zeroing new allocations. (`cuMemsetD8` on the legacy stream may
    /// return before it is done and is unordered with our non-blocking streams: a peer's
    /// early flag could be wiped.)
    util_stream: Mutex<usize>,
    module: Mutex<Option<sys::CUmodule>>,
    functions: Mutex<HashMap<String, usize>>, // name -> CUfunction
}

// SAFETY: CUDA handles may be used from any thread once the context is current there
// (`bind` does that before each use).
unsafe impl Send for CudaDevice {}
// SAFETY: as above; the mutable parts sit behind mutexes.
unsafe impl Sync for CudaDevice {}

impl CudaDevice {
    pub(crate) fn new(ordinal: usize) -> Result<Self> {
        let n = device_count()?;
        if ordinal >= n {
            return Err(Error::invalid("ordinal", format!("CUDA device {ordinal} requested, {n} present")));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| Error::Driver {
            call: "cuDevicePrimaryCtxRetain",
            code: e.0 as i32,
            name: format!("{e:?}"),
        })?;
        let dev =
            Self { ctx, util_stream: Mutex::new(0), module: Mutex::new(None), functions: Mutex::new(HashMap::new()) };
        Ok(dev)
    }

    /// A memory pool for one stream's stream-ordered allocations. Its memory stays in the pool
    /// after frees (threshold = max, as PyTorch's caching allocator does: no trimming on the
    /// hot path), and it never reuses memory by making this stream wait for another one: with
    /// the device's shared default pool, a rank's allocation could wait on a peer rank's
    /// stream, whose kernels wait for this rank's — a deadlock when ranks share a GPU.
    pub(crate) fn pool_create(&self) -> Result<sys::CUmemoryPool> {
        self.bind()?;
        // SAFETY: all-zero is a valid CUmemPoolProps (then filled in).
        let mut props: sys::CUmemPoolProps = unsafe { std::mem::zeroed() };
        props.allocType = sys::CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED;
        props.handleTypes = sys::CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_NONE;
        props.location.type_ = sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE;
        props.location.id = self.ctx.cu_device();
        let mut pool = std::ptr::null_mut();
        // SAFETY: writes one pool handle; `props` is initialised.
        check("cuMemPoolCreate", unsafe { sys::cuMemPoolCreate(&mut pool, &props) })?;
        use sys::CUmemPool_attribute as A;
        for (attr, mut v) in [
            (A::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, u64::MAX),
            (A::CU_MEMPOOL_ATTR_REUSE_ALLOW_INTERNAL_DEPENDENCIES, 0),
        ] {
            // SAFETY: the threshold is a cuuint64_t; the reuse flag an int (low bytes of `v`,
            // little-endian).
            check("cuMemPoolSetAttribute", unsafe {
                sys::cuMemPoolSetAttribute(pool, attr, &mut v as *mut u64 as *mut c_void)
            })?;
        }
        Ok(pool)
    }

    pub(crate) fn bind(&self) -> Result<()> {
        self.ctx.bind_to_thread().map_err(|e| Error::Driver {
            call: "cuCtxSetCurrent",
            code: e.0 as i32,
            name: format!("{e:?}"),
        })
    }

    pub(crate) fn pci_bus_id(&self) -> Result<String> {
        let mut buf = [0 as std::ffi::c_char; 32];
        // SAFETY: writes a NUL-terminated id of at most `len` bytes.
        check("cuDeviceGetPCIBusId", unsafe {
            sys::cuDeviceGetPCIBusId(buf.as_mut_ptr(), buf.len() as i32, self.ctx.cu_device())
        })?;
        // SAFETY: NUL-terminated by the driver (the buffer is larger than any id).
        Ok(unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned())
    }

    pub(crate) fn name(&self) -> String {
        self.ctx.name().unwrap_or_else(|_| "CUDA device".into())
    }

    pub(crate) fn attribute(&self, attr: sys::CUdevice_attribute) -> Result<i32> {
        let mut v = 0;
        // SAFETY: writes one int for a valid device.
        check("cuDeviceGetAttribute", unsafe { sys::cuDeviceGetAttribute(&mut v, attr, self.ctx.cu_device()) })?;
        Ok(v)
    }

    /// Loads (JIT-compiles) the kernel module; a no-op once loaded.
    pub(crate) fn load_module(&self, ptx: &str) -> Result<()> {
        self.bind()?;
        let mut module = self.module.lock().map_err(|_| Error::KernelFault("poisoned lock".into()))?;
        if module.is_none() {
            let m = load_ptx(ptx)?;
            *module = Some(m);
            // Load every kernel now: with CUDA's lazy loading (the default), a kernel's code
            // is loaded at its first launch, which waits for the kernels already running —
            // and on a GPU that ranks share, those spin until this rank launches.
            let mut fns = self.functions.lock().map_err(|_| Error::KernelFault("poisoned lock".into()))?;
            for name in ptx.lines().filter_map(|l| l.trim().strip_prefix(".visible .entry ")) {
                let name = name.split('(').next().unwrap_or("").trim();
                let cname = std::ffi::CString::new(name).map_err(|_| Error::invalid("kernel", "NUL in name"))?;
                let mut f = std::ptr::null_mut();
                // SAFETY: `m` is a loaded module; writes one handle.
                check("cuModuleGetFunction", unsafe { sys::cuModuleGetFunction(&mut f, m, cname.as_ptr()) })?;
                // SAFETY: `f` is a function of the loaded module.
                check("cuFuncLoad", unsafe { sys::cuFuncLoad(f) })?;
                fns.insert(name.to_string(), f as usize);
            }
        }
        Ok(())
    }

    /// The kernel `name` of the module (loaded on first use if `load_module` wasn't called).
    pub(crate) fn function(&self, name: &'static str, ptx: &str) -> Result<sys::CUfunction> {
        self.bind()?;
        if let Some(f) = self.functions.lock().map_err(|_| Error::KernelFault("poisoned lock".into()))?.get(name) {
            return Ok(*f as sys::CUfunction);
        }
        // Loading the module loads (and records) every kernel in it.
        self.load_module(ptx)?;
        let fns = self.functions.lock().map_err(|_| Error::KernelFault("poisoned lock".into()))?;
        fns.get(name)
            .map(|&f| f as sys::CUfunction)
            .ok_or_else(|| Error::KernelFault(format!("no kernel `{name}` in the module")))
    }

    pub(crate) fn malloc(&self, bytes: usize) -> Result<u64> {
        self.bind()?;
        let mut p = 0;
        // SAFETY: writes one device pointer.
        check("cuMemAlloc", unsafe { sys::cuMemAlloc_v2(&mut p, bytes.max(1)) })?;
        Ok(p)
    }

    /// Zeroes `bytes` at `p` and waits until it is done.
    pub(crate) fn zero(&self, p: u64, bytes: usize) -> Result<()> {
        let mut util = self.util_stream.lock().map_err(|_| Error::KernelFault("poisoned lock".into()))?;
        if *util == 0 {
            *util = self.stream_create()? as usize;
        }
        let s = *util as sys::CUstream;
        // SAFETY: `p` holds `bytes` bytes of this context's memory; `s` is a live stream.
        unsafe {
            check("cuMemsetD8Async", sys::cuMemsetD8Async(p, 0, bytes, s))?;
            check("cuStreamSynchronize", sys::cuStreamSynchronize(s))
        }
    }

    pub(crate) fn free(&self, p: u64) -> Result<()> {
        self.bind()?;
        // SAFETY: `p` came from cuMemAlloc in this context and is freed once.
        check("cuMemFree", unsafe { sys::cuMemFree_v2(p) })
    }

    /// Page-locked host memory mapped into the device's address space.
    pub(crate) fn host_alloc_mapped(&self, bytes: usize) -> Result<(*mut u8, u64)> {
        self.bind()?;
        let mut h: *mut c_void = std::ptr::null_mut();
        let flags = sys::CU_MEMHOSTALLOC_DEVICEMAP | sys::CU_MEMHOSTALLOC_PORTABLE;
        // SAFETY: writes one host pointer.
        check("cuMemHostAlloc", unsafe { sys::cuMemHostAlloc(&mut h, bytes.max(1), flags) })?;
        let mut d = 0;
        // SAFETY: `h` is a mapped pinned allocation.
        if let Err(e) = check("cuMemHostGetDevicePointer", unsafe { sys::cuMemHostGetDevicePointer_v2(&mut d, h, 0) }) {
            // SAFETY: `h` was just allocated.
            unsafe { sys::cuMemFreeHost(h) };
            return Err(e);
        }
        // SAFETY: fresh allocation of `bytes` bytes.
        unsafe { std::ptr::write_bytes(h as *mut u8, 0, bytes) };
        Ok((h as *mut u8, d))
    }

    pub(crate) fn host_free(&self, h: *mut u8) -> Result<()> {
        self.bind()?;
        // SAFETY: `h` came from cuMemHostAlloc and is freed once.
        check("cuMemFreeHost", unsafe { sys::cuMemFreeHost(h as *mut c_void) })
    }

    pub(crate) fn stream_create(&self) -> Result<sys::CUstream> {
        self.bind()?;
        let mut s = std::ptr::null_mut();
        let flags = sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32;
        // SAFETY: writes one stream handle.
        check("cuStreamCreate", unsafe { sys::cuStreamCreate(&mut s, flags) })?;
        Ok(s)
    }

    pub(crate) fn ipc_handle(&self, p: u64) -> Result<[u8; 64]> {
        self.bind()?;
        let mut h = sys::CUipcMemHandle { reserved: [0; 64] };
        // SAFETY: `p` is the base of a cuMemAlloc allocation.
        check("cuIpcGetMemHandle", unsafe { sys::cuIpcGetMemHandle(&mut h, p) })?;
        Ok(h.reserved.map(|b| b as u8))
    }

    pub(crate) fn ipc_open(&self, handle: &[u8; 64]) -> Result<u64> {
        self.bind()?;
        let h = sys::CUipcMemHandle { reserved: handle.map(|b| b as _) };
        let mut p = 0;
        let flags = sys::CUipcMem_flags::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as u32;
        // SAFETY: writes one device pointer; the handle bytes came from cuIpcGetMemHandle.
        check("cuIpcOpenMemHandle", unsafe { sys::cuIpcOpenMemHandle_v2(&mut p, h, flags) })?;
        Ok(p)
    }

    pub(crate) fn ipc_close(&self, p: u64) -> Result<()> {
        self.bind()?;
        // SAFETY: `p` came from cuIpcOpenMemHandle and is closed once.
        check("cuIpcCloseMemHandle", unsafe { sys::cuIpcCloseMemHandle(p) })
    }

    fn vmm_prop(&self) -> sys::CUmemAllocationProp {
        // SAFETY: an all-zero CUmemAllocationProp is a valid starting point (C struct).
        let mut prop: sys::CUmemAllocationProp = unsafe { std::mem::zeroed() };
        prop.type_ = sys::CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED;
        prop.requestedHandleTypes = sys::CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR;
        prop.location.type_ = sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE;
        prop.location.id = self.ctx.ordinal() as i32;
        prop
    }

    /// Rounds `bytes` up to the VMM allocation granularity.
    pub(crate) fn vmm_size(&self, bytes: usize) -> Result<usize> {
        let prop = self.vmm_prop();
        let mut gran = 0usize;
        let flag = sys::CUmemAllocationGranularity_flags::CU_MEM_ALLOC_GRANULARITY_RECOMMENDED;
        // SAFETY: writes one size.
        check("cuMemGetAllocationGranularity", unsafe { sys::cuMemGetAllocationGranularity(&mut gran, &prop, flag) })?;
        let gran = gran.max(1);
        Ok(bytes.max(1).div_ceil(gran) * gran)
    }

    /// `cuMemCreate` (POSIX-fd shareable) of `size` bytes (a granularity multiple).
    pub(crate) fn vmm_create(&self, size: usize) -> Result<sys::CUmemGenericAllocationHandle> {
        self.bind()?;
        let prop = self.vmm_prop();
        let mut h = 0;
        // SAFETY: writes one handle.
        check("cuMemCreate", unsafe { sys::cuMemCreate(&mut h, size, &prop, 0) })?;
        Ok(h)
    }

    /// Reserves a VA range, maps `handle` there and grants this device read/write.
    pub(crate) fn vmm_map(&self, handle: sys::CUmemGenericAllocationHandle, size: usize) -> Result<u64> {
        self.bind()?;
        let mut va = 0;
        // SAFETY: writes one address.
        check("cuMemAddressReserve", unsafe { sys::cuMemAddressReserve(&mut va, size, 0, 0, 0) })?;
        let mapped = (|| {
            // SAFETY: `va` is a fresh reservation of `size` bytes; `handle` is a live allocation.
            check("cuMemMap", unsafe { sys::cuMemMap(va, size, 0, handle, 0) })?;
            // SAFETY: an all-zero access descriptor is valid (C struct); fields set below.
            let mut access: sys::CUmemAccessDesc = unsafe { std::mem::zeroed() };
            access.location = self.vmm_prop().location;
            access.flags = sys::CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
            // SAFETY: `va` maps `size` bytes.
            check("cuMemSetAccess", unsafe { sys::cuMemSetAccess(va, size, &access, 1) })
        })();
        if let Err(e) = mapped {
            // SAFETY: undo the reservation (and the mapping, if it was made).
            unsafe {
                sys::cuMemUnmap(va, size);
                sys::cuMemAddressFree(va, size);
            }
            return Err(e);
        }
        Ok(va)
    }

    pub(crate) fn vmm_unmap_release(
        &self,
        va: u64,
        size: usize,
        handle: sys::CUmemGenericAllocationHandle,
    ) -> Result<()> {
        self.bind()?;
        // SAFETY: `va`/`size`/`handle` are a mapping made by `vmm_map` and torn down once.
        unsafe {
            check("cuMemUnmap", sys::cuMemUnmap(va, size))?;
            check("cuMemAddressFree", sys::cuMemAddressFree(va, size))?;
            check("cuMemRelease", sys::cuMemRelease(handle))
        }
    }

    pub(crate) fn vmm_export_fd(&self, handle: sys::CUmemGenericAllocationHandle) -> Result<OwnedFd> {
        let mut fd: RawFd = -1;
        let kind = sys::CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR;
        // SAFETY: writes one int (the fd) for a POSIX-fd shareable allocation.
        check("cuMemExportToShareableHandle", unsafe {
            sys::cuMemExportToShareableHandle(&mut fd as *mut RawFd as *mut c_void, handle, kind, 0)
        })?;
        // SAFETY: the driver handed us a new descriptor that we now own.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    pub(crate) fn vmm_import_fd(&self, fd: RawFd) -> Result<sys::CUmemGenericAllocationHandle> {
        self.bind()?;
        let mut h = 0;
        let kind = sys::CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR;
        // SAFETY: for POSIX fds the driver takes the fd value itself as the "pointer".
        check("cuMemImportFromShareableHandle", unsafe {
            sys::cuMemImportFromShareableHandle(&mut h, fd as usize as *mut c_void, kind)
        })?;
        Ok(h)
    }

    /// Lets this device's kernels access `peer`'s `cuMemAlloc` memory.
    pub(crate) fn enable_peer_access(&self, peer: &CudaDevice) -> Result<()> {
        if peer.ctx.ordinal() == self.ctx.ordinal() {
            return Ok(());
        }
        let mut can = 0;
        // SAFETY: writes one int.
        check("cuDeviceCanAccessPeer", unsafe {
            sys::cuDeviceCanAccessPeer(&mut can, self.ctx.cu_device(), peer.ctx.cu_device())
        })?;
        if can == 0 {
            return Err(Error::Unsupported(format!(
                "GPU {} cannot access GPU {} (no P2P)",
                self.ctx.ordinal(),
                peer.ctx.ordinal()
            )));
        }
        self.bind()?;
        // SAFETY: both contexts are live primary contexts.
        let r = unsafe { sys::cuCtxEnablePeerAccess(peer.ctx.cu_ctx(), 0) };
        if r == CUresult::CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED {
            return Ok(());
        }
        check("cuCtxEnablePeerAccess", r)
    }

    /// Grants this device access to a VMM mapping that lives on `owner` (peer GPU memory
    /// mapped into this process): `cuMemSetAccess` for both devices.
    pub(crate) fn vmm_grant(&self, va: u64, size: usize) -> Result<()> {
        self.bind()?;
        // SAFETY: zeroed C struct, fields set below.
        let mut access: sys::CUmemAccessDesc = unsafe { std::mem::zeroed() };
        access.location.type_ = sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE;
        access.location.id = self.ctx.ordinal() as i32;
        access.flags = sys::CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
        // SAFETY: `va` maps `size` bytes.
        check("cuMemSetAccess", unsafe { sys::cuMemSetAccess(va, size, &access, 1) })
    }
}

impl Drop for CudaDevice {
    fn drop(&mut self) {
        let util = self.util_stream.get_mut().map(|s| *s).unwrap_or(0);
        if util != 0 && self.bind().is_ok() {
            // SAFETY: our stream, destroyed once.
            unsafe { sys::cuStreamDestroy_v2(util as sys::CUstream) };
        }
        if let Ok(Some(m)) = self.module.get_mut().map(|m| m.take())
            && self.bind().is_ok()
        {
            // SAFETY: the module was loaded in this context; unloaded once.
            unsafe { sys::cuModuleUnload(m) };
        }
    }
}

/// `cuModuleLoadDataEx` with the JIT's error log in the error message.
fn load_ptx(ptx: &str) -> Result<sys::CUmodule> {
    let src = std::ffi::CString::new(ptx).map_err(|_| Error::invalid("ptx", "NUL byte in PTX"))?;
    let mut log = vec![0u8; 8192];
    let mut opts = [sys::CUjit_option::CU_JIT_ERROR_LOG_BUFFER, sys::CUjit_option::CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES];
    let mut vals = [log.as_mut_ptr() as *mut c_void, log.len() as *mut c_void];
    let mut m = std::ptr::null_mut();
    // SAFETY: NUL-terminated PTX; option arrays of equal length; the log outlives the call.
    let r = unsafe {
        sys::cuModuleLoadDataEx(&mut m, src.as_ptr() as *const c_void, 2, opts.as_mut_ptr(), vals.as_mut_ptr())
    };
    if let Err(Error::Driver { call, code, name }) = check("cuModuleLoadDataEx", r) {
        let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
        let jit = String::from_utf8_lossy(&log[..end]);
        return Err(Error::Driver { call, code, name: format!("{name}; JIT log: {jit}") });
    }
    Ok(m)
}

// Checked wrappers for `mod.rs`, one driver call each (cudarc's `result` layer). Destroy and
// free calls return a `Result` too; their callers in `Drop` ignore it.

// ---------------------------------------------------------------------------------------------
// Memory: copies, fills, allocations and frees
// ---------------------------------------------------------------------------------------------

/// Queues a copy of `src` to device address `dst` on `stream`.
///
/// # Safety
/// 1. `dst` holds `src.len()` bytes of memory the current context can write.
/// 2. `src` stays alive and unchanged until the copy is done.
/// 3. `stream` is a live stream of the current context (or null).
pub(crate) unsafe fn memcpy_htod_async(dst: u64, src: &[u8], stream: sys::CUstream) -> Result<()> {
    // SAFETY: forwarded to the caller.
    check("cuMemcpyHtoDAsync", unsafe {
        sys::cuMemcpyHtoDAsync_v2(dst, src.as_ptr() as *const c_void, src.len(), stream)
    })
}

/// Queues a copy from device address `src` into `dst` on `stream`.
///
/// # Safety
/// 1. `src` holds `dst.len()` bytes of memory the current context can read.
/// 2. `dst` stays alive, and is neither read nor written, until the copy is done.
/// 3. `stream` is a live stream of the current context (or null).
pub(crate) unsafe fn memcpy_dtoh_async(dst: &mut [u8], src: u64, stream: sys::CUstream) -> Result<()> {
    // SAFETY: forwarded to the caller.
    check("cuMemcpyDtoHAsync", unsafe {
        sys::cuMemcpyDtoHAsync_v2(dst.as_mut_ptr() as *mut c_void, src, dst.len(), stream)
    })
}

/// Queues a copy of `bytes` bytes from device address `src` to `dst` on `stream`.
///
/// # Safety
/// 1. `src` and `dst` each hold `bytes` bytes the current context can read (`src`) and write
///    (`dst`), until the copy is done.
/// 2. `stream` is a live stream of the current context (or null).
pub(crate) unsafe fn memcpy_dtod_async(dst: u64, src: u64, bytes: usize, stream: sys::CUstream) -> Result<()> {
    // SAFETY: forwarded to the caller.
    check("cuMemcpyDtoDAsync", unsafe { sys::cuMemcpyDtoDAsync_v2(dst, src, bytes, stream) })
}

/// Queues setting `bytes` bytes at device address `dst` to `value` on `stream`.
///
/// # Safety
/// 1. `dst` holds `bytes` bytes the current context can write, until the fill is done.
/// 2. `stream` is a live stream of the current context (or null).
pub(crate) unsafe fn memset_d8_async(dst: u64, value: u8, bytes: usize, stream: sys::CUstream) -> Result<()> {
    // SAFETY: forwarded to the caller.
    check("cuMemsetD8Async", unsafe { sys::cuMemsetD8Async(dst, value, bytes, stream) })
}

/// Allocates `bytes` bytes in `stream` order from the device's default pool.
///
/// # Safety
/// `stream` is a live stream of the current context (or null).
pub(crate) unsafe fn mem_alloc_async(bytes: usize, stream: sys::CUstream) -> Result<u64> {
    let mut p = 0;
    // SAFETY: writes one pointer; the stream is the caller's to vouch for.
    check("cuMemAllocAsync", unsafe { sys::cuMemAllocAsync(&mut p, bytes, stream) })?;
    Ok(p)
}

/// Allocates `bytes` bytes in `stream` order from `pool`.
///
/// # Safety
/// 1. `pool` is a live memory pool of the current context's device.
/// 2. `stream` is a live stream of the current context (or null).
pub(crate) unsafe fn mem_alloc_from_pool_async(
    bytes: usize,
    pool: sys::CUmemoryPool,
    stream: sys::CUstream,
) -> Result<u64> {
    let mut p = 0;
    // SAFETY: writes one pointer; pool and stream are the caller's to vouch for.
    check("cuMemAllocFromPoolAsync", unsafe { sys::cuMemAllocFromPoolAsync(&mut p, bytes, pool, stream) })?;
    Ok(p)
}

/// Frees `ptr` in `stream` order (after the work queued on `stream` so far).
///
/// # Safety
/// 1. `ptr` came from a stream-ordered allocation and is freed once.
/// 2. `stream` is a live stream of the current context (or null).
pub(crate) unsafe fn mem_free_async(ptr: u64, stream: sys::CUstream) -> Result<()> {
    // SAFETY: forwarded to the caller.
    check("cuMemFreeAsync", unsafe { sys::cuMemFreeAsync(ptr, stream) })
}

/// Destroys a memory pool.
///
/// # Safety
/// `pool` came from `cuMemPoolCreate`, is destroyed once, and none of its memory is in use.
pub(crate) unsafe fn mem_pool_destroy(pool: sys::CUmemoryPool) -> Result<()> {
    // SAFETY: forwarded to the caller.
    check("cuMemPoolDestroy", unsafe { sys::cuMemPoolDestroy(pool) })
}

/// Releases a VMM allocation handle.
///
/// # Safety
/// `handle` came from `cuMemCreate` or an import and is released once.
pub(crate) unsafe fn mem_release(handle: sys::CUmemGenericAllocationHandle) -> Result<()> {
    // SAFETY: forwarded to the caller.
    check("cuMemRelease", unsafe { sys::cuMemRelease(handle) })
}

// ---------------------------------------------------------------------------------------------
// Streams
// ---------------------------------------------------------------------------------------------

/// Waits for everything queued on `stream`.
///
/// # Safety
/// `stream` is a live stream of the current context (or null).
pub(crate) unsafe fn stream_synchronize(stream: sys::CUstream) -> Result<()> {
    // SAFETY: forwarded to the caller.
    check("cuStreamSynchronize", unsafe { sys::cuStreamSynchronize(stream) })
}

/// Whether all work queued on `stream` is done (never waits). Also reports errors left by
/// earlier work (the driver API's "last error").
///
/// # Safety
/// `stream` is a live stream of the current context (or null).
pub(crate) unsafe fn stream_query(stream: sys::CUstream) -> Result<bool> {
    // SAFETY: forwarded to the caller.
    match unsafe { sys::cuStreamQuery(stream) } {
        CUresult::CUDA_ERROR_NOT_READY => Ok(false),
        r => check("cuStreamQuery", r).map(|()| true),
    }
}

/// Makes later work on `stream` wait for `event`.
///
/// # Safety
/// `stream` (or null) and `event` are live handles of the current context.
pub(crate) unsafe fn stream_wait_event(stream: sys::CUstream, event: sys::CUevent) -> Result<()> {
    // SAFETY: forwarded to the caller.
    check("cuStreamWaitEvent", unsafe { sys::cuStreamWaitEvent(stream, event, 0) })
}

/// Destroys a stream; work already queued on it still completes.
///
/// # Safety
/// `stream` came from `cuStreamCreate` and is destroyed once.
pub(crate) unsafe fn stream_destroy(stream: sys::CUstream) -> Result<()> {
    // SAFETY: forwarded to the caller.
    check("cuStreamDestroy", unsafe { sys::cuStreamDestroy_v2(stream) })
}

// ---------------------------------------------------------------------------------------------
// Events
// ---------------------------------------------------------------------------------------------

/// A new event with default flags (timing enabled, for `event_elapsed_ms`).
pub(crate) fn event_create() -> Result<sys::CUevent> {
    let mut e = std::ptr::null_mut();
    // SAFETY: writes one event handle.
    check("cuEventCreate", unsafe { sys::cuEventCreate(&mut e, 0) })?;
    Ok(e)
}

/// Records `event` at the current end of `stream`.
///
/// # Safety
/// `event` and `stream` (or null) are live handles of the current context.
pub(crate) unsafe fn event_record(event: sys::CUevent, stream: sys::CUstream) -> Result<()> {
    // SAFETY: forwarded to the caller.
    check("cuEventRecord", unsafe { sys::cuEventRecord(event, stream) })
}

/// Whether `event` has happened (never waits).
///
/// # Safety
/// `event` is a live event.
pub(crate) unsafe fn event_query(event: sys::CUevent) -> Result<bool> {
    // SAFETY: forwarded to the caller.
    match unsafe { sys::cuEventQuery(event) } {
        CUresult::CUDA_SUCCESS => Ok(true),
        CUresult::CUDA_ERROR_NOT_READY => Ok(false),
        r => check("cuEventQuery", r).map(|()| false),
    }
}

/// Waits until `event` has happened.
///
/// # Safety
/// `event` is a live event.
pub(crate) unsafe fn event_synchronize(event: sys::CUevent) -> Result<()> {
    // SAFETY: forwarded to the caller.
    check("cuEventSynchronize", unsafe { sys::cuEventSynchronize(event) })
}

/// Milliseconds from `start` to `end`.
///
/// # Safety
/// `start` and `end` are live events (the driver reports incomplete ones as an error).
pub(crate) unsafe fn event_elapsed_ms(start: sys::CUevent, end: sys::CUevent) -> Result<f32> {
    let mut ms = 0f32;
    // SAFETY: writes one float; the events are the caller's to vouch for.
    check("cuEventElapsedTime", unsafe { sys::cuEventElapsedTime(&mut ms, start, end) })?;
    Ok(ms)
}

/// Destroys an event.
///
/// # Safety
/// `event` came from `cuEventCreate` and is destroyed once.
pub(crate) unsafe fn event_destroy(event: sys::CUevent) -> Result<()> {
    // SAFETY: forwarded to the caller.
    check("cuEventDestroy", unsafe { sys::cuEventDestroy_v2(event) })
}

// ---------------------------------------------------------------------------------------------
// Graphs and stream capture
// ---------------------------------------------------------------------------------------------

/// Starts capturing the work queued on `stream` into a graph.
///
/// # Safety
/// `stream` is a live stream of the current context.
pub(crate) unsafe fn stream_begin_capture(stream: sys::CUstream, mode: sys::CUstreamCaptureMode) -> Result<()> {
    // SAFETY: forwarded to the caller.
    check("cuStreamBeginCapture", unsafe { sys::cuStreamBeginCapture_v2(stream, mode) })
}

/// Ends the capture on `stream` and returns the captured graph.
///
/// # Safety
/// `stream` is a live stream of the current context.
pub(crate) unsafe fn stream_end_capture(stream: sys::CUstream) -> Result<sys::CUgraph> {
    let mut g = std::ptr::null_mut();
    // SAFETY: writes one graph handle; the stream is the caller's to vouch for.
    check("cuStreamEndCapture", unsafe { sys::cuStreamEndCapture(stream, &mut g) })?;
    Ok(g)
}

/// Whether `stream` is capturing a graph (for any library, not only `stream_begin_capture`).
///
/// # Safety
/// `stream` is a live stream of the current context (or null).
pub(crate) unsafe fn stream_is_capturing(stream: sys::CUstream) -> Result<bool> {
    let mut status = sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE;
    // SAFETY: writes one status; the stream is the caller's to vouch for.
    check("cuStreamIsCapturing", unsafe { sys::cuStreamIsCapturing(stream, &mut status) })?;
    Ok(status != sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE)
}

/// An executable graph made from `graph` (no flags).
///
/// # Safety
/// `graph` is a live graph.
pub(crate) unsafe fn graph_instantiate(graph: sys::CUgraph) -> Result<sys::CUgraphExec> {
    let mut exec = std::ptr::null_mut();
    // SAFETY: writes one handle; the graph is the caller's to vouch for.
    check("cuGraphInstantiateWithFlags", unsafe { sys::cuGraphInstantiateWithFlags(&mut exec, graph, 0) })?;
    Ok(exec)
}

/// Uploads `exec` to the device in `stream` order, so that its first launch needn't.
///
/// # Safety
/// `exec` and `stream` (or null) are live handles of the current context.
pub(crate) unsafe fn graph_upload(exec: sys::CUgraphExec, stream: sys::CUstream) -> Result<()> {
    // SAFETY: forwarded to the caller.
    check("cuGraphUpload", unsafe { sys::cuGraphUpload(exec, stream) })
}

/// Queues a launch of `exec` on `stream`.
///
/// # Safety
/// `exec` and `stream` (or null) are live handles of the current context.
pub(crate) unsafe fn graph_launch(exec: sys::CUgraphExec, stream: sys::CUstream) -> Result<()> {
    // SAFETY: forwarded to the caller.
    check("cuGraphLaunch", unsafe { sys::cuGraphLaunch(exec, stream) })
}

/// Destroys an executable graph.
///
/// # Safety
/// `exec` came from `cuGraphInstantiate*` and is destroyed once.
pub(crate) unsafe fn graph_exec_destroy(exec: sys::CUgraphExec) -> Result<()> {
    // SAFETY: forwarded to the caller.
    check("cuGraphExecDestroy", unsafe { sys::cuGraphExecDestroy(exec) })
}

/// Destroys a graph.
///
/// # Safety
/// `graph` is a live graph, destroyed once.
pub(crate) unsafe fn graph_destroy(graph: sys::CUgraph) -> Result<()> {
    // SAFETY: forwarded to the caller.
    check("cuGraphDestroy", unsafe { sys::cuGraphDestroy(graph) })
}

// ---------------------------------------------------------------------------------------------
// Kernel launch
// ---------------------------------------------------------------------------------------------

/// Sets an attribute of a kernel function.
///
/// # Safety
/// `f` is a function of a loaded module.
pub(crate) unsafe fn func_set_attribute(f: sys::CUfunction, attr: sys::CUfunction_attribute, value: i32) -> Result<()> {
    // SAFETY: forwarded to the caller.
    check("cuFuncSetAttribute", unsafe { sys::cuFuncSetAttribute(f, attr, value) })
}

/// Queues a 1-D launch of `f` (`grid_dim` blocks of `block_dim` threads) on `stream`.
///
/// # Safety
/// 1. `f` is a function of a module loaded in the current context.
/// 2. `args` holds one pointer per kernel parameter, each to a value of that parameter's
///    type (the driver copies them before returning).
/// 3. Every pointer those values hold is valid for the kernel's accesses until it finishes.
/// 4. `stream` is a live stream of the current context (or null).
pub(crate) unsafe fn launch_kernel(
    f: sys::CUfunction,
    grid_dim: u32,
    block_dim: u32,
    shared_mem_bytes: u32,
    stream: sys::CUstream,
    args: &mut [*mut c_void],
) -> Result<()> {
    // SAFETY: forwarded to the caller; no `extra` options.
    check("cuLaunchKernel", unsafe {
        sys::cuLaunchKernel(
            f,
            grid_dim,
            1,
            1,
            block_dim,
            1,
            1,
            shared_mem_bytes,
            stream,
            args.as_mut_ptr(),
            std::ptr::null_mut(),
        )
    })
}
