//! Devices, memory, streams, events and kernel launches, over two back ends:
//!
//! * **CUDA** (`cuda.rs`): the driver API via cudarc, loaded at run time. No CUDA toolkit
//!   is needed to build; a machine without a driver gets [`Error::NoDriver`].
//! * **CPU** (`cpu.rs`): host memory and the kernel emulator of `moe-ep-kernels`, so every
//!   kernel runs, unchanged, in CI. A CPU launch runs to completion before `launch` returns
//!   (the stream is trivially ordered); drive each rank from its own thread, as processes
//!   drive GPUs.
//!
//! Layering as in cudarc: `cuda.rs` wraps raw `sys` calls into `Result`s, this module is
//! the safe, back-end-neutral API.
pub(crate) mod cpu;
pub(crate) mod cuda;
pub mod fd;

use crate::{Error, Result};
use bytemuck::Pod;
use cudarc::driver::sys;
use moe_ep_abi::{DeviceError, ErrorSlot, error_code};
use moe_ep_kernels::Kernel;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;

/// The PTX of every kernel, built by `cargo xtask ptx` from `gpu-kernels` (sm_90).
pub const PTX: &str = include_str!("../../ptx/moe_ep_kernels.ptx");

/// Where kernels run.
#[derive(Clone)]
pub struct Device {
    backend: Arc<Backend>,
}

enum Backend {
    Cpu,
    Cuda(cuda::CudaDevice),
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &*self.backend {
            Backend::Cpu => write!(f, "Device(cpu)"),
            Backend::Cuda(d) => write!(f, "Device(cuda:{})", d.ctx.ordinal()),
        }
    }
}

impl Device {
    /// The CPU emulator.
    pub fn cpu() -> Device {
        Device { backend: Arc::new(Backend::Cpu) }
    }

    /// CUDA device `ordinal`. Errors (never panics) when there is no driver or no such GPU.
    ///
    /// Every call for one GPU returns the same device, whose kernel module is loaded (JIT)
    /// here, once: loading a module while other ranks' kernels spin on that GPU waits for
    /// them to finish, which would stall a rank that is still to launch.
    pub fn cuda(ordinal: usize) -> Result<Device> {
        static OPEN: Mutex<Vec<(usize, Weak<Backend>)>> = Mutex::new(Vec::new());
        let mut open = OPEN.lock().map_err(|_| Error::KernelFault("poisoned lock".into()))?;
        open.retain(|(_, w)| w.strong_count() > 0);
        if let Some(backend) = open.iter().find(|(o, _)| *o == ordinal).and_then(|(_, w)| w.upgrade()) {
            return Ok(Device { backend });
        }
        let gpu = cuda::CudaDevice::new(ordinal)?;
        gpu.load_module(PTX)?;
        let backend = Arc::new(Backend::Cuda(gpu));
        open.push((ordinal, Arc::downgrade(&backend)));
        Ok(Device { backend })
    }

    /// Number of CUDA GPUs; `Err(NoDriver)` on machines without the driver.
    pub fn cuda_count() -> Result<usize> {
        cuda::device_count()
    }

    /// `"cpu"` → the emulator, `"cuda"` / `"cuda:N"` → GPU N (default 0).
    pub fn from_name(name: &str) -> Result<Device> {
        match name.trim() {
            "cpu" => Ok(Device::cpu()),
            "cuda" | "gpu" => Device::cuda(0),
            other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Device::cuda(n),
                _ => Err(Error::invalid("device", format!("`{other}`: expected cpu, cuda or cuda:N"))),
            },
        }
    }

    /// The device named by `MOE_EP_DEVICE` (`cpu`, `cuda`, `cuda:N`); without it, GPU 0 when
    /// a driver and a GPU are present, else the CPU emulator.
    pub fn from_env() -> Result<Device> {
        match std::env::var("MOE_EP_DEVICE") {
            Ok(name) => Device::from_name(&name),
            Err(_) => match Device::cuda_count() {
                Ok(n) if n > 0 => Device::cuda(0),
                _ => Ok(Device::cpu()),
            },
        }
    }

    /// True for the CPU emulator.
    pub fn is_cpu(&self) -> bool {
        matches!(*self.backend, Backend::Cpu)
    }

    /// CUDA ordinal, `None` on the CPU.
    pub fn ordinal(&self) -> Option<usize> {
        match &*self.backend {
            Backend::Cpu => None,
            Backend::Cuda(d) => Some(d.ctx.ordinal()),
        }
    }

    /// A human-readable name ("NVIDIA H100 80GB HBM3", "CPU emulator").
    pub fn name(&self) -> String {
        match &*self.backend {
            Backend::Cpu => "CPU emulator".into(),
            Backend::Cuda(d) => d.name(),
        }
    }

    /// Which physical device this is, the same string in every process that uses it:
    /// host name and PCI bus id ("node7/0000:1B:00.0"); "node7/cpu" for the emulator.
    pub fn identity(&self) -> Result<String> {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let host = host.trim();
        match &*self.backend {
            Backend::Cpu => Ok(format!("{host}/cpu")),
            Backend::Cuda(d) => Ok(format!("{host}/{}", d.pci_bus_id()?)),
        }
    }

    /// Streaming multiprocessors (the emulator reports 8).
    pub fn num_sms(&self) -> Result<u32> {
        match &*self.backend {
            Backend::Cpu => Ok(8),
            Backend::Cuda(d) => {
                Ok(d.attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as u32)
            }
        }
    }

    /// Threads per block the library's launches use here: 64 on the emulator (one OS thread
    /// per GPU thread), `gpu` on a GPU.
    pub fn block_dim(&self, gpu: u32) -> u32 {
        if self.is_cpu() { 64 } else { gpu }
    }

    /// True when both are the same physical device (same memory).
    pub fn same_as(&self, other: &Device) -> bool {
        match (&*self.backend, &*other.backend) {
            (Backend::Cpu, Backend::Cpu) => true,
            (Backend::Cuda(a), Backend::Cuda(b)) => a.ctx.ordinal() == b.ctx.ordinal(),
            _ => false,
        }
    }

    fn cuda_backend(&self) -> Option<&cuda::CudaDevice> {
        match &*self.backend {
            Backend::Cuda(d) => Some(d),
            Backend::Cpu => None,
        }
    }

    /// Zeroed device memory (`cuMemAlloc`; exportable with [`DeviceBuffer::ipc_handle`]).
    pub fn alloc(&self, bytes: usize) -> Result<DeviceBuffer> {
        match &*self.backend {
            Backend::Cpu => Ok(DeviceBuffer::new(self, cpu::heap_alloc(bytes)? as u64, bytes, Memory::CpuHeap)),
            Backend::Cuda(d) => {
                let p = d.malloc(bytes)?;
                let buf = DeviceBuffer::new(self, p, bytes, Memory::Cuda);
                d.zero(p, bytes)?;
                Ok(buf)
            }
        }
    }

    /// Zeroed memory that other processes can map through a file descriptor
    /// ([`DeviceBuffer::export_fd`], [`Device::import_fd`]): VMM `cuMemCreate` with a POSIX-fd
    /// handle on a GPU, a memfd on the CPU. The size is rounded up to the granularity.
    pub fn alloc_shareable(&self, bytes: usize) -> Result<DeviceBuffer> {
        match &*self.backend {
            Backend::Cpu => {
                let (fd, p) = cpu::shared_create(bytes)?;
                Ok(DeviceBuffer::new(self, p as u64, bytes, Memory::CpuShared { fd: Some(fd) }))
            }
            Backend::Cuda(d) => {
                let size = d.vmm_size(bytes)?;
                let handle = d.vmm_create(size)?;
                let va = match d.vmm_map(handle, size) {
                    Ok(va) => va,
                    Err(e) => {
                        // SAFETY: release the allocation we just created (once).
                        let _ = unsafe { cuda::mem_release(handle) };
                        return Err(e);
                    }
                };
                let buf = DeviceBuffer::new(self, va, size, Memory::CudaVmm { handle, size });
                d.zero(va, size)?;
                Ok(buf)
            }
        }
    }

    /// Maps memory another process exported with [`DeviceBuffer::export_fd`] (`bytes` as the
    /// exporter's [`DeviceBuffer::len`]).
    pub fn import_fd(&self, fd: &OwnedFd, bytes: usize) -> Result<DeviceBuffer> {
        match &*self.backend {
            Backend::Cpu => {
                let p = cpu::shared_map(fd.as_raw_fd(), bytes)?;
                Ok(DeviceBuffer::new(self, p as u64, bytes, Memory::CpuShared { fd: None }))
            }
            Backend::Cuda(d) => {
                let handle = d.vmm_import_fd(fd.as_raw_fd())?;
                match d.vmm_map(handle, bytes) {
                    Ok(va) => Ok(DeviceBuffer::new(self, va, bytes, Memory::CudaVmm { handle, size: bytes })),
                    Err(e) => {
                        // SAFETY: release the imported handle (once).
                        let _ = unsafe { cuda::mem_release(handle) };
                        Err(e)
                    }
                }
            }
        }
    }

    /// Opens a CUDA IPC handle from another process ([`DeviceBuffer::ipc_handle`]).
    pub fn open_ipc(&self, handle: &[u8; 64], bytes: usize) -> Result<DeviceBuffer> {
        let d = self.cuda_backend().ok_or_else(|| Error::Unsupported("CUDA IPC handles on the CPU back end".into()))?;
        let p = d.ipc_open(handle)?;
        Ok(DeviceBuffer::new(self, p, bytes, Memory::CudaIpc))
    }

    /// Lets kernels on this device access `peer`'s memory (no-op for the same device).
    pub fn enable_peer_access(&self, peer: &Device) -> Result<()> {
        match (self.cuda_backend(), peer.cuda_backend()) {
            (Some(a), Some(b)) => a.enable_peer_access(b),
            (None, None) => Ok(()),
            _ => Err(Error::invalid("peer", "cannot mix CPU and CUDA devices")),
        }
    }

    /// Grants this device access to a VMM mapping (made in this process for another GPU).
    pub fn grant_access(&self, buf: &DeviceBuffer) -> Result<()> {
        match (self.cuda_backend(), &buf.mem) {
            (Some(d), Memory::CudaVmm { size, .. }) => d.vmm_grant(buf.ptr, *size),
            _ => Ok(()),
        }
    }

    /// Page-locked host memory that kernels can read and write (zeroed).
    pub fn alloc_host_mapped(&self, bytes: usize) -> Result<HostMapped> {
        let (host, dev) = match &*self.backend {
            Backend::Cpu => {
                let p = cpu::heap_alloc(bytes)?;
                // The emulator then rejects atomics on it, as a PCIe-attached GPU does.
                moe_ep_kernels::dev::register_host_mapped(p as usize, bytes.max(1));
                (p, p as u64)
            }
            Backend::Cuda(d) => d.host_alloc_mapped(bytes)?,
        };
        Ok(HostMapped { device: self.clone(), host, dev, bytes })
    }

    /// A new stream (non-blocking w.r.t. the legacy default stream).
    pub fn new_stream(&self) -> Result<Stream> {
        let (raw, pool) = match &*self.backend {
            Backend::Cpu => (0, 0),
            Backend::Cuda(d) => {
                let raw = d.stream_create()? as usize;
                match d.pool_create() {
                    Ok(pool) => (raw, pool as usize),
                    Err(e) => {
                        drop(StreamHandle { device: self.clone(), raw, pool: 0, borrowed: false }); // destroys the stream
                        return Err(e);
                    }
                }
            }
        };
        Ok(Stream {
            device: self.clone(),
            raw,
            handle: Arc::new(StreamHandle { device: self.clone(), raw, pool, borrowed: false }),
            capture: Mutex::new(None),
        })
    }
}

enum Memory {
    CpuHeap,
    CpuShared {
        fd: Option<OwnedFd>,
    },
    Cuda,
    CudaPool {
        stream: Arc<StreamHandle>,
    },
    CudaIpc,
    CudaVmm {
        handle: sys::CUmemGenericAllocationHandle,
        size: usize,
    },
    /// Someone else's memory ([`DeviceBuffer::borrowed`]): never freed here.
    Borrowed,
    /// A piece of a larger allocation ([`DeviceBuffer::lent`]): `give_back` runs on drop.
    Lent {
        give_back: Option<Box<dyn FnOnce() + Send + Sync>>,
    },
}

/// Memory on a device (or, on the CPU back end, in host memory), freed on drop.
pub struct DeviceBuffer {
    device: Device,
    ptr: u64,
    bytes: usize,
    mem: Memory,
}

// SAFETY: a device address plus ownership information; no thread affinity.
unsafe impl Send for DeviceBuffer {}
// SAFETY: shared access only hands out the address.
unsafe impl Sync for DeviceBuffer {}

impl std::fmt::Debug for DeviceBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceBuffer({:?}, {:#x}, {} bytes)", self.device, self.ptr, self.bytes)
    }
}

impl DeviceBuffer {
    fn new(device: &Device, ptr: u64, bytes: usize, mem: Memory) -> Self {
        DeviceBuffer { device: device.clone(), ptr, bytes, mem }
    }

    /// The device address (a host address on the CPU back end).
    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.bytes
    }

    /// True for a zero-byte buffer.
    pub fn is_empty(&self) -> bool {
        self.bytes == 0
    }

    /// The device this memory lives on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    fn check_range(&self, offset: usize, len: usize) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.bytes => Ok(()),
            _ => Err(Error::invalid("offset", format!("{len} bytes at {offset} exceed a {}-byte buffer", self.bytes))),
        }
    }

    /// Copies `data` to byte `offset`, in `stream` order; returns when the copy is done.
    pub fn write<T: Pod>(&self, stream: &Stream, offset: usize, data: &[T]) -> Result<()> {
        let bytes: &[u8] = bytemuck::cast_slice(data);
        self.check_range(offset, bytes.len())?;
        if stream.capturing() {
            return Err(Error::Unsupported("a blocking copy while the stream captures a graph".into()));
        }
        match self.device.cuda_backend() {
            None => {
                // SAFETY: range checked; CPU "device" memory is host memory.
                unsafe {
                    std::ptr::copy_nonoverlapping(bytes.as_ptr(), (self.ptr as *mut u8).add(offset), bytes.len())
                };
                Ok(())
            }
            Some(d) => {
                d.bind()?;
                // SAFETY: range checked; the host slice outlives the synchronised copy; a live
                // stream.
                unsafe { cuda::memcpy_htod_async(self.ptr + offset as u64, bytes, stream.cu()) }?;
                stream.synchronize()
            }
        }
    }

    /// Copies from byte `offset` into `out`, in `stream` order; returns when done.
    pub fn read<T: Pod>(&self, stream: &Stream, offset: usize, out: &mut [T]) -> Result<()> {
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(out);
        self.check_range(offset, bytes.len())?;
        if stream.capturing() {
            return Err(Error::Unsupported("a blocking copy while the stream captures a graph".into()));
        }
        match self.device.cuda_backend() {
            None => {
                // SAFETY: range checked.
                unsafe {
                    std::ptr::copy_nonoverlapping((self.ptr as *const u8).add(offset), bytes.as_mut_ptr(), bytes.len())
                };
                Ok(())
            }
            Some(d) => {
                d.bind()?;
                // SAFETY: range checked; `out` outlives the synchronised copy; a live stream.
                unsafe { cuda::memcpy_dtoh_async(bytes, self.ptr + offset as u64, stream.cu()) }?;
                stream.synchronize()
            }
        }
    }

    /// The whole buffer as a vector of `T` (trailing bytes that don't fill a `T` are dropped).
    pub fn to_vec<T: Pod + Default>(&self, stream: &Stream) -> Result<Vec<T>> {
        let mut v = vec![T::default(); self.bytes / std::mem::size_of::<T>().max(1)];
        self.read(stream, 0, &mut v)?;
        Ok(v)
    }

    /// Queues a copy of the first `bytes` of `src` into this buffer on `stream`.
    pub fn copy_from_async(&self, stream: &Stream, src: &DeviceBuffer, bytes: usize) -> Result<()> {
        self.check_range(0, bytes)?;
        src.check_range(0, bytes)?;
        match self.device.cuda_backend() {
            None => {
                let (from, to) = (src.ptr, self.ptr);
                stream.cpu_run(Box::new(move || {
                    // SAFETY: both ranges checked; distinct allocations (alive while it runs).
                    unsafe { std::ptr::copy_nonoverlapping(from as *const u8, to as *mut u8, bytes) };
                    Ok(())
                }))
            }
            Some(d) => {
                d.bind()?;
                // SAFETY: both ranges checked, ordered on `stream` (live).
                unsafe { cuda::memcpy_dtod_async(self.ptr, src.ptr, bytes, stream.cu()) }
            }
        }
    }

    /// Sets every byte to `value` in `stream` order and waits (e.g. to poison outputs).
    pub fn fill(&self, stream: &Stream, value: u8) -> Result<()> {
        self.fill_async(stream, value)?;
        stream.synchronize()
    }

    /// Queues setting every byte to `value` on `stream` (done at once on the CPU).
    pub fn fill_async(&self, stream: &Stream, value: u8) -> Result<()> {
        if self.bytes == 0 {
            return Ok(()); // (an empty tensor's pointer may be null)
        }
        match self.device.cuda_backend() {
            None => {
                let (ptr, bytes) = (self.ptr, self.bytes);
                stream.cpu_run(Box::new(move || {
                    // SAFETY: the whole allocation (alive while its work, or a graph of it, runs).
                    unsafe { std::ptr::write_bytes(ptr as *mut u8, value, bytes) };
                    Ok(())
                }))
            }
            Some(d) => {
                d.bind()?;
                // SAFETY: the whole allocation, ordered on `stream` (live).
                unsafe { cuda::memset_d8_async(self.ptr, value, self.bytes, stream.cu()) }
            }
        }
    }

    /// CUDA IPC handle of this `cuMemAlloc` buffer, for [`Device::open_ipc`] in another process.
    pub fn ipc_handle(&self) -> Result<[u8; 64]> {
        match (self.device.cuda_backend(), &self.mem) {
            (Some(d), Memory::Cuda) => d.ipc_handle(self.ptr),
            _ => Err(Error::Unsupported("IPC handles exist only for cuMemAlloc memory on a GPU".into())),
        }
    }

    /// A descriptor of this shareable buffer ([`Device::alloc_shareable`]) for
    /// [`Device::import_fd`] in another process (see [`fd::fetch_fd`]).
    pub fn export_fd(&self) -> Result<OwnedFd> {
        match (&self.mem, self.device.cuda_backend()) {
            (Memory::CpuShared { fd: Some(fd) }, None) => Ok(fd.try_clone()?),
            (Memory::CudaVmm { handle, .. }, Some(d)) => d.vmm_export_fd(*handle),
            _ => Err(Error::Unsupported("only buffers from alloc_shareable can be exported as descriptors".into())),
        }
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        if let Memory::Lent { give_back } = &mut self.mem
            && let Some(f) = give_back.take()
        {
            f();
            return;
        }
        // Errors while freeing cannot be reported from drop; the driver keeps its state.
        match (&self.mem, self.device.cuda_backend()) {
            // SAFETY: allocated by heap_alloc with this size.
            (Memory::CpuHeap, _) => unsafe { cpu::heap_free(self.ptr as *mut u8, self.bytes) },
            // SAFETY: mapped by shared_map with this size.
            (Memory::CpuShared { .. }, _) => unsafe { cpu::shared_unmap(self.ptr as *mut u8, self.bytes) },
            (Memory::Cuda, Some(d)) => drop(d.free(self.ptr)),
            (Memory::CudaPool { stream }, Some(d)) if d.bind().is_ok() => {
                // SAFETY: allocated on this stream from its pool; freed once, after the
                // work queued on it so far (the handle keeps the stream alive).
                let _ = unsafe { cuda::mem_free_async(self.ptr, stream.raw as sys::CUstream) };
            }
            (Memory::CudaIpc, Some(d)) => drop(d.ipc_close(self.ptr)),
            (Memory::CudaVmm { handle, size }, Some(d)) => drop(d.vmm_unmap_release(self.ptr, *size, *handle)),
            _ => {}
        }
    }
}

/// Page-locked host memory mapped into a device: kernels write it (e.g. error records,
/// counters) and the host reads it without a copy, even while kernels run.
pub struct HostMapped {
    device: Device,
    host: *mut u8,
    dev: u64,
    bytes: usize,
}

// SAFETY: plain memory owned by this value.
unsafe impl Send for HostMapped {}
// SAFETY: reads/writes go through volatile accessors.
unsafe impl Sync for HostMapped {}

impl HostMapped {
    /// Address kernels use.
    pub fn device_ptr(&self) -> u64 {
        self.dev
    }

    /// Address the host uses.
    pub fn host_ptr(&self) -> *mut u8 {
        self.host
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.bytes
    }

    /// True for a zero-byte mapping.
    pub fn is_empty(&self) -> bool {
        self.bytes == 0
    }

    /// Volatile read of a `T` at byte `offset` (what a kernel may be writing right now).
    pub fn read<T: Pod>(&self, offset: usize) -> Result<T> {
        if !offset.is_multiple_of(std::mem::align_of::<T>()) || offset + std::mem::size_of::<T>() > self.bytes {
            return Err(Error::invalid("offset", format!("{offset} is out of range or misaligned")));
        }
        // SAFETY: in range and aligned (checked above); T is Pod.
        Ok(unsafe { std::ptr::read_volatile(self.host.add(offset) as *const T) })
    }

    /// Volatile write of a `T` at byte `offset`.
    pub fn write<T: Pod>(&self, offset: usize, value: T) -> Result<()> {
        if !offset.is_multiple_of(std::mem::align_of::<T>()) || offset + std::mem::size_of::<T>() > self.bytes {
            return Err(Error::invalid("offset", format!("{offset} is out of range or misaligned")));
        }
        // SAFETY: in range and aligned (checked above); T is Pod.
        unsafe { std::ptr::write_volatile(self.host.add(offset) as *mut T, value) };
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }
}

impl Drop for HostMapped {
    fn drop(&mut self) {
        match self.device.cuda_backend() {
            Some(d) => drop(d.host_free(self.host)),
            None => {
                moe_ep_kernels::dev::unregister_host_mapped(self.host as usize);
                // SAFETY: allocated by heap_alloc with this size.
                unsafe { cpu::heap_free(self.host, self.bytes) }
            }
        }
    }
}

/// Where a rank's kernels report errors: an [`ErrorSlot`] in device memory (the first-writer
/// claim needs an atomic, which PCIe GPUs can't do on host memory) pointing to a
/// [`DeviceError`] in mapped host memory (readable without a copy, even mid-kernel).
pub struct ErrorRecord {
    slot: DeviceBuffer,
    host: HostMapped,
}

impl ErrorRecord {
    /// A cleared record on `device`.
    pub fn new(device: &Device) -> Result<ErrorRecord> {
        let host = device.alloc_host_mapped(std::mem::size_of::<DeviceError>())?;
        let slot = device.alloc(std::mem::size_of::<ErrorSlot>())?;
        let rec = ErrorRecord { slot, host };
        rec.clear()?;
        Ok(rec)
    }

    fn clear(&self) -> Result<()> {
        self.host.write(0, DeviceError::default())?;
        let slot = ErrorSlot { claimed: 0, reserved: 0, record: self.host.device_ptr() };
        let stream = self.slot.device().new_stream()?;
        self.slot.write(&stream, 0, std::slice::from_ref(&slot))
    }

    /// The address kernels take as their `error` parameter.
    pub fn ptr(&self) -> u64 {
        self.slot.ptr()
    }

    /// What a kernel reported, read without synchronising (`None`: nothing yet).
    pub fn peek(&self) -> Result<Option<DeviceError>> {
        let rec: DeviceError = self.host.read(0)?;
        Ok((rec.code != error_code::NONE).then_some(rec))
    }

    /// Returns (and clears) what a kernel reported, as an [`Error`]. Call once the kernels
    /// that use this record have finished (after synchronising their stream).
    pub fn take(&self, kernel: &'static str) -> Result<()> {
        let Some(rec) = self.peek()? else { return Ok(()) };
        self.clear()?;
        Err(match rec.code {
            error_code::TIMEOUT => Error::Timeout {
                rank: rec.rank,
                peer: rec.peer,
                block: rec.block,
                site: rec.site,
                expected: rec.expected,
                observed: rec.observed,
            },
            error_code::BAD_LAUNCH => Error::BadLaunch { kernel, rank: rec.rank },
            error_code::OVERFLOW => Error::InvalidArgument {
                arg: "num_worst_tokens",
                reason: format!(
                    "{kernel} on rank {}: {} rows arrive, the fixed-size output holds {}",
                    rec.rank, rec.observed, rec.expected
                ),
            },
            error_code::BAD_INPUT => Error::InvalidArgument {
                arg: "input",
                reason: format!(
                    "{kernel} on rank {}: row {} holds {} (valid: below {})",
                    rec.rank, rec.site, rec.observed as i64, rec.expected
                ),
            },
            other => Error::KernelFault(format!("{kernel}: unknown device error code {other}")),
        })
    }
}

/// Grid and block shape of a launch (1-D, as every moe-ep kernel is).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchConfig {
    /// Blocks.
    pub grid_dim: u32,
    /// Threads per block (a multiple of 32).
    pub block_dim: u32,
    /// Dynamic shared memory per block.
    pub shared_mem_bytes: u32,
}

/// An ordered queue of work on one device.
pub struct Stream {
    device: Device,
    raw: usize, // CUstream on CUDA, 0 on the CPU
    /// Keeps the CUDA stream alive while buffers allocated on it are still to be freed on it.
    handle: Arc<StreamHandle>,
    /// While capturing: on the CPU, the recorded work; on CUDA, an empty marker.
    capture: Mutex<Option<Vec<CpuOp>>>,
}

/// Work the CPU back end records while a stream captures a graph.
type CpuOp = Box<dyn Fn() -> Result<()> + Send + Sync>;

/// A captured sequence of work ([`Stream::begin_capture`] .. [`Stream::end_capture`]),
/// replayed by [`Graph::launch`]: a CUDA graph on a GPU, the recorded launches on the CPU.
pub struct Graph {
    device: Device,
    cpu: Vec<CpuOp>,
    graph: usize,
    exec: usize,
}

// SAFETY: CUDA graph handles may be used from any thread; the CPU ops are Send + Sync.
unsafe impl Send for Graph {}
// SAFETY: as above.
unsafe impl Sync for Graph {}

impl Graph {
    /// Replays the captured work on `stream`.
    pub fn launch(&self, stream: &Stream) -> Result<()> {
        match self.device.cuda_backend() {
            None => self.cpu.iter().try_for_each(|op| op()),
            Some(d) => {
                d.bind()?;
                // SAFETY: a live executable graph and stream of the same context.
                unsafe { cuda::graph_launch(self.exec as sys::CUgraphExec, stream.cu()) }
            }
        }
    }
}

impl Drop for Graph {
    fn drop(&mut self) {
        if let Some(d) = self.device.cuda_backend()
            && d.bind().is_ok()
        {
            // SAFETY: created by end_capture, destroyed once.
            unsafe {
                let _ = cuda::graph_exec_destroy(self.exec as sys::CUgraphExec);
                let _ = cuda::graph_destroy(self.graph as sys::CUgraph);
            }
        }
    }
}

/// Owns a `CUstream`; destroyed when the last [`Stream`] or stream-ordered buffer using it
/// is gone.
pub(crate) struct StreamHandle {
    device: Device,
    raw: usize,
    /// This stream's own memory pool (see `Stream::alloc`; 0: the device's default pool).
    pool: usize,
    /// Made by [`Stream::from_raw`]: the stream belongs to someone else.
    borrowed: bool,
}

impl StreamHandle {
    /// [`Stream::record_event`].
    pub(crate) fn record_event(&self) -> Result<Event> {
        match self.device.cuda_backend() {
            None => Ok(Event { device: self.device.clone(), raw: 0, cpu_time: Instant::now() }),
            Some(d) => {
                d.bind()?;
                let e = cuda::event_create()?;
                let event = Event { device: self.device.clone(), raw: e as usize, cpu_time: Instant::now() };
                // SAFETY: live event and stream.
                unsafe { cuda::event_record(e, self.raw as sys::CUstream) }?;
                Ok(event)
            }
        }
    }
}

impl Drop for StreamHandle {
    fn drop(&mut self) {
        if let Some(d) = self.device.cuda_backend()
            && d.bind().is_ok()
        {
            // SAFETY: destroyed once; queued work still completes. Buffers from the pool
            // hold this handle, so all of them were freed (in stream order) before.
            unsafe {
                if !self.borrowed {
                    let _ = cuda::stream_destroy(self.raw as sys::CUstream);
                }
                if self.pool != 0 {
                    let _ = cuda::mem_pool_destroy(self.pool as sys::CUmemoryPool);
                }
            }
        }
    }
}

// SAFETY: CUDA streams may be used from any thread (the context is bound before each use).
unsafe impl Send for Stream {}
// SAFETY: as above.
unsafe impl Sync for Stream {}

impl Stream {
    fn cu(&self) -> sys::CUstream {
        self.raw as sys::CUstream
    }

    /// The raw `CUstream` (null on the CPU), for interop with other CUDA libraries.
    pub fn raw(&self) -> usize {
        self.raw
    }

    /// The device this stream runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Starts recording the work queued on this stream into a [`Graph`] instead of running
    /// it (CUDA stream capture, relaxed mode; on the CPU the launches are recorded). Buffers
    /// the captured work uses must outlive the graph's launches.
    pub fn begin_capture(&self) -> Result<()> {
        let mut cap = self.capture.lock().map_err(|_| Error::KernelFault("poisoned lock".into()))?;
        if cap.is_some() {
            return Err(Error::invalid("stream", "already capturing"));
        }
        if let Some(d) = self.device.cuda_backend() {
            d.bind()?;
            let mode = sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED;
            // SAFETY: a live stream.
            unsafe { cuda::stream_begin_capture(self.cu(), mode) }?;
        }
        *cap = Some(Vec::new());
        Ok(())
    }

    /// Ends a capture and returns the graph, ready to launch.
    pub fn end_capture(&self) -> Result<Graph> {
        let mut cap = self.capture.lock().map_err(|_| Error::KernelFault("poisoned lock".into()))?;
        let Some(cpu) = cap.take() else { return Err(Error::invalid("stream", "not capturing")) };
        let mut graph = Graph { device: self.device.clone(), cpu, graph: 0, exec: 0 };
        if let Some(d) = self.device.cuda_backend() {
            d.bind()?;
            // SAFETY: the stream is capturing (begin_capture succeeded).
            let g = unsafe { cuda::stream_end_capture(self.cu()) }?;
            graph.graph = g as usize;
            // SAFETY: `g` is the captured graph.
            let exec = unsafe { cuda::graph_instantiate(g) }?;
            graph.exec = exec as usize;
            // Upload now, in stream order: a first launch that had to upload could otherwise
            // wait while a peer rank's captured kernels spin on this GPU.
            // SAFETY: `exec` was just instantiated; the stream is live.
            unsafe { cuda::graph_upload(exec, self.cu()) }?;
        }
        Ok(graph)
    }

    /// Capturing: through [`Stream::begin_capture`], or (CUDA) by another library on this
    /// stream, e.g. `torch.cuda.graph` on a stream from [`Stream::from_raw`].
    pub fn capturing(&self) -> bool {
        if self.capture.lock().map(|c| c.is_some()).unwrap_or(false) {
            return true;
        }
        if self.device.cuda_backend().is_none() {
            return false;
        }
        // An error counts as capturing.
        // SAFETY: a live stream.
        unsafe { cuda::stream_is_capturing(self.cu()) }.unwrap_or(true)
    }

    /// CPU back end: runs `op` now, or records it while capturing.
    fn cpu_run(&self, op: CpuOp) -> Result<()> {
        let mut cap = self.capture.lock().map_err(|_| Error::KernelFault("poisoned lock".into()))?;
        match cap.as_mut() {
            Some(ops) => {
                ops.push(op);
                Ok(())
            }
            None => {
                drop(cap);
                op()
            }
        }
    }

    /// Zeroed memory allocated **in stream order** from this stream's memory pool
    /// (`cuMemAllocFromPoolAsync`), and freed in stream order on this stream when dropped.
    ///
    /// Use it for everything that is not shared with other processes: unlike `cuMemAlloc` /
    /// `cuMemFree`, neither call waits for the device to go idle. That matters when ranks
    /// share a GPU: a rank blocked in an implicitly synchronising call can't launch the
    /// kernel its peers' spinning kernels are waiting for. The pool is the stream's own, so an
    /// allocation never makes this stream wait for another rank's stream either.
    pub fn alloc(&self, bytes: usize) -> Result<DeviceBuffer> {
        match self.device.cuda_backend() {
            None => Ok(DeviceBuffer::new(&self.device, cpu::heap_alloc(bytes)? as u64, bytes, Memory::CpuHeap)),
            Some(_) => {
                let buf = self.alloc_uninit(bytes)?;
                buf.fill_async(self, 0)?;
                Ok(buf)
            }
        }
    }

    /// Like [`Stream::alloc`], without the zeroing: for outputs a kernel overwrites in full
    /// (the contents are whatever the pool held; on the CPU back end, zeros).
    pub fn alloc_uninit(&self, bytes: usize) -> Result<DeviceBuffer> {
        match self.device.cuda_backend() {
            None => self.alloc(bytes),
            Some(d) => {
                d.bind()?;
                let pool = self.handle.pool as sys::CUmemoryPool;
                // SAFETY: ordered on this live stream; `pool` (when not null) is this stream's.
                let p = unsafe {
                    if pool.is_null() {
                        cuda::mem_alloc_async(bytes.max(1), self.cu())
                    } else {
                        cuda::mem_alloc_from_pool_async(bytes.max(1), pool, self.cu())
                    }
                }?;
                Ok(DeviceBuffer::new(&self.device, p, bytes, Memory::CudaPool { stream: self.handle.clone() }))
            }
        }
    }

    /// Launches `kernel` with `params`. On a GPU it is queued (asynchronous); on the CPU
    /// emulator it runs to completion first. Launch errors, and errors left by earlier
    /// work on the stream, are returned here.
    ///
    /// # Safety
    /// 1. Every pointer in `params` is valid on this device for the accesses the kernel's
    ///    documentation describes, until the kernel finishes.
    /// 2. `P` is the parameter type the kernel was written for (guaranteed by `Kernel<P>`).
    pub unsafe fn launch<P: Pod + Sync>(&self, kernel: &Kernel<P>, cfg: LaunchConfig, params: P) -> Result<()> {
        if cfg.grid_dim == 0
            || cfg.block_dim == 0
            || !cfg.block_dim.is_multiple_of(32)
            || cfg.block_dim as usize > crate::limits::MAX_BLOCK_THREADS
        {
            return Err(Error::invalid("cfg", format!("bad launch shape {cfg:?}")));
        }
        match self.device.cuda_backend() {
            None => {
                let (f, name) = (kernel.cpu, kernel.name);
                let bytes: Vec<u8> = bytemuck::bytes_of(&params).to_vec();
                self.cpu_run(Box::new(move || {
                    let params: P = bytemuck::pod_read_unaligned(&bytes);
                    // SAFETY: forwarded launch contract (a recorded launch keeps it too: the
                    // caller keeps the buffers alive for the graph's launches).
                    unsafe {
                        moe_ep_kernels::dev::launch(cfg.grid_dim, cfg.block_dim, cfg.shared_mem_bytes, || f(params))
                    }
                    .map_err(|e| Error::KernelFault(format!("{name}: {e}")))
                }))
            }
            Some(d) => {
                let f = d.function(kernel.symbol, PTX)?;
                if cfg.shared_mem_bytes > 48 << 10 {
                    let attr = sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
                    // SAFETY: `f` is a loaded function.
                    unsafe { cuda::func_set_attribute(f, attr, cfg.shared_mem_bytes as i32) }?;
                }
                let mut p = params;
                let mut args = [&mut p as *mut P as *mut std::ffi::c_void];
                // SAFETY: one by-value struct parameter, matching the kernel's single `.param`;
                // its pointers are valid (the caller's contract); a live stream.
                unsafe {
                    cuda::launch_kernel(f, cfg.grid_dim, cfg.block_dim, cfg.shared_mem_bytes, self.cu(), &mut args)
                }?;
                if self.capturing() {
                    return Ok(()); // a query would invalidate the capture
                }
                // Surface sticky errors from earlier work (the driver API's "last error").
                // SAFETY: a live stream.
                unsafe { cuda::stream_query(self.cu()) }.map(|_done| ())
            }
        }
    }

    /// Waits for everything queued on the stream.
    pub fn synchronize(&self) -> Result<()> {
        match self.device.cuda_backend() {
            None => Ok(()),
            Some(d) => {
                d.bind()?;
                // SAFETY: a live stream.
                unsafe { cuda::stream_synchronize(self.cu()) }
            }
        }
    }

    /// Records a new event at the current end of the stream.
    pub fn record_event(&self) -> Result<Event> {
        self.handle.record_event()
    }

    /// Something that records events on this stream later, e.g. from a destructor, and
    /// keeps the stream alive meanwhile.
    pub(crate) fn event_source(&self) -> Arc<StreamHandle> {
        self.handle.clone()
    }

    /// Makes later work on this stream wait for `event`.
    pub fn wait_event(&self, event: &Event) -> Result<()> {
        match self.device.cuda_backend() {
            None => Ok(()),
            Some(d) => {
                d.bind()?;
                // SAFETY: live event and stream.
                unsafe { cuda::stream_wait_event(self.cu(), event.raw as sys::CUevent) }
            }
        }
    }
}

/// A point in a stream's work, for ordering and timing.
pub struct Event {
    device: Device,
    raw: usize,
    cpu_time: Instant,
}

// SAFETY: CUDA events may be used from any thread.
unsafe impl Send for Event {}
// SAFETY: as above.
unsafe impl Sync for Event {}

impl Event {
    /// Whether the event has happened (never waits; always true on the CPU back end).
    pub fn is_complete(&self) -> Result<bool> {
        match self.device.cuda_backend() {
            None => Ok(true),
            Some(d) => {
                d.bind()?;
                // SAFETY: a live event.
                unsafe { cuda::event_query(self.raw as sys::CUevent) }
            }
        }
    }

    /// Waits until the event has happened.
    pub fn synchronize(&self) -> Result<()> {
        match self.device.cuda_backend() {
            None => Ok(()),
            Some(d) => {
                d.bind()?;
                // SAFETY: a live event.
                unsafe { cuda::event_synchronize(self.raw as sys::CUevent) }
            }
        }
    }

    /// Milliseconds from `self` to `later` (both synchronised first).
    pub fn elapsed_ms(&self, later: &Event) -> Result<f32> {
        later.synchronize()?;
        match self.device.cuda_backend() {
            None => Ok(later.cpu_time.duration_since(self.cpu_time).as_secs_f32() * 1e3),
            Some(_) => {
                // SAFETY: two live, completed events.
                unsafe { cuda::event_elapsed_ms(self.raw as sys::CUevent, later.raw as sys::CUevent) }
            }
        }
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        if let Some(d) = self.device.cuda_backend()
            && d.bind().is_ok()
        {
            // SAFETY: destroyed once.
            let _ = unsafe { cuda::event_destroy(self.raw as sys::CUevent) };
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Interop: memory and streams owned by another library (torch, numpy), used without copies.
// ---------------------------------------------------------------------------------------------

impl DeviceBuffer {
    /// A non-owning view of `bytes` bytes at `ptr` on `device` (a torch tensor's or numpy
    /// array's memory); dropping it frees nothing.
    ///
    /// # Safety
    /// 1. `ptr..ptr + bytes` is memory of `device` (host memory for the CPU back end) that
    ///    kernels of `device` may read and write.
    /// 2. It stays allocated, and nothing else writes it, while the view or work queued with
    ///    it is alive.
    pub unsafe fn borrowed(device: &Device, ptr: u64, bytes: usize) -> DeviceBuffer {
        DeviceBuffer::new(device, ptr, bytes, Memory::Borrowed)
    }

    /// `bytes` at `ptr`, part of an allocation someone else manages (e.g. a block of a
    /// [`crate::heap::SymHeap`]); `give_back` runs when the buffer is dropped.
    ///
    /// # Safety
    /// The memory stays allocated until `give_back` runs, and nothing else uses it meanwhile.
    pub unsafe fn lent(
        device: &Device,
        ptr: u64,
        bytes: usize,
        give_back: Box<dyn FnOnce() + Send + Sync>,
    ) -> DeviceBuffer {
        DeviceBuffer::new(device, ptr, bytes, Memory::Lent { give_back: Some(give_back) })
    }
}

impl Stream {
    /// A non-owning [`Stream`] over a `CUstream` made elsewhere (e.g. torch's current
    /// stream: `torch.cuda.current_stream().cuda_stream`); never destroyed here. On the CPU
    /// back end `raw` is ignored (CPU work runs at once).
    ///
    /// # Safety
    /// On CUDA, `raw` is a live stream (or null, the legacy default stream) of `device`'s
    /// primary context, and outlives the returned value and buffers allocated on it.
    pub unsafe fn from_raw(device: &Device, raw: usize) -> Stream {
        let raw = if device.is_cpu() { 0 } else { raw };
        Stream {
            device: device.clone(),
            raw,
            // Allocations on it (rare: ops allocate on the group's stream) use the device's
            // default pool.
            handle: Arc::new(StreamHandle { device: device.clone(), raw, pool: 0, borrowed: true }),
            capture: Mutex::new(None),
        }
    }

    /// [`Stream::from_raw`], made once per (device, `raw`) and kept for the process: callers
    /// that pass the same stream on every call (torch's current stream, a C program's
    /// `cudaStream_t`) then get the same view, whose capture state persists between calls.
    ///
    /// # Safety
    /// As [`Stream::from_raw`], for as long as ops given the view may use it.
    pub unsafe fn from_raw_shared(device: &Device, raw: usize) -> Arc<Stream> {
        type Cache = Mutex<Vec<((Option<usize>, usize), Arc<Stream>)>>;
        static CACHE: Cache = Mutex::new(Vec::new());
        let key = (device.ordinal(), raw);
        let mut cache = CACHE.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, s)) = cache.iter().find(|(k, _)| *k == key) {
            return s.clone();
        }
        // SAFETY: forwarded to the caller.
        let s = Arc::new(unsafe { Stream::from_raw(device, raw) });
        cache.push((key, s.clone()));
        s
    }
}
