//! Ranks and symmetric memory.
//!
//! A [`Group`] is one rank's membership in a set of ranks (like an `ncclComm_t`): its
//! device, its stream, the bootstrap that connects it to the others, and the host-visible
//! error record its kernels report into. Ranks may be
//! - threads of one process ([`Group::in_process`]): on one GPU, on several GPUs (peer
//!   access is enabled), or on the CPU emulator;
//! - one per process ([`Group::from_env`], [`Group::new`]), joined by the TCP bootstrap.
//!
//! [`Group::alloc_symmetric`] is the collective that gives every rank a buffer of the same
//! size and every rank the addresses of all of them ([`SymmetricBuffer`]): raw pointers
//! between threads of one process, CUDA IPC handles or shared descriptors (VMM, memfd)
//! between processes. Kernels then store into peers' buffers directly.
use crate::bootstrap::{Bootstrap, EnvConfig, InProcessBootstrap, TcpBootstrap, default_timeout};
use crate::device::{Device, DeviceBuffer, ErrorRecord, HostMapped, Stream, fd};
use crate::{Error, Result};
use moe_ep_abi::DEFAULT_TIMEOUT_NS;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

/// How [`Group::alloc_symmetric`] shares memory with ranks in other processes (ranks in
/// this process always get raw pointers).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Sharing {
    /// CUDA IPC handles on a GPU, memfd descriptors on the CPU.
    #[default]
    Auto,
    /// `cuMemAlloc` + `cuIpcGetMemHandle` / `cuIpcOpenMemHandle` (GPU only).
    Ipc,
    /// VMM `cuMemCreate` (POSIX fd) on a GPU, memfd on the CPU; descriptors move between
    /// processes with `pidfd_getfd` (see [`fd::fetch_fd`]).
    Fd,
}

/// One rank of a group.
pub struct Group {
    rank: usize,
    num_ranks: usize,
    device: Device,
    stream: Stream,
    bootstrap: Box<dyn Bootstrap>,
    error: ErrorRecord,
    timeout: Duration,
    /// Ranks of the group on this rank's GPU (see `ranks_on_device`), once asked.
    ranks_on_device: std::sync::OnceLock<usize>,
}

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Group(rank {}/{}, {:?})", self.rank, self.num_ranks, self.device)
    }
}

impl Group {
    /// `devices.len()` ranks in this process, rank `i` on `devices[i]` (repeat a device to
    /// put several ranks on it). Enables peer access between distinct GPUs. Drive each
    /// returned `Group` from its own thread: collectives block until every rank joins.
    ///
    /// More ranks (one stream each) on a GPU than it has hardware queues would queue one
    /// rank's spinning kernel in front of the kernel it waits for: set
    /// `CUDA_DEVICE_MAX_CONNECTIONS=32` in the environment before the first CUDA call when
    /// putting more than 8 ranks on one GPU; more than that many ranks on a GPU is refused
    /// ([`Error::Unsupported`]).
    pub fn in_process(devices: &[Device]) -> Result<Vec<Group>> {
        if devices.is_empty() {
            return Err(Error::invalid("devices", "at least one rank"));
        }
        let queues = std::env::var("CUDA_DEVICE_MAX_CONNECTIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(8usize);
        for d in devices.iter().filter(|d| !d.is_cpu()) {
            let sharing = devices.iter().filter(|o| o.same_as(d)).count();
            if sharing > queues {
                return Err(Error::Unsupported(format!(
                    "{sharing} ranks on one GPU with {queues} hardware queues (CUDA_DEVICE_MAX_CONNECTIONS, at most 32): \
                     a rank's waiting kernel could block the one it waits for"
                )));
            }
        }
        for a in devices {
            for b in devices {
                if !a.same_as(b) {
                    a.enable_peer_access(b)?;
                }
            }
        }
        let boots = InProcessBootstrap::new_group(devices.len(), default_timeout());
        devices.iter().zip(boots).map(|(d, b)| Group::new(d.clone(), Box::new(b))).collect()
    }

    /// One rank on `device`, connected by `bootstrap`.
    pub fn new(device: Device, bootstrap: Box<dyn Bootstrap>) -> Result<Group> {
        let stream = device.new_stream()?;
        let error = ErrorRecord::new(&device)?;
        Ok(Group {
            rank: bootstrap.rank(),
            num_ranks: bootstrap.num_ranks(),
            device,
            stream,
            bootstrap,
            error,
            timeout: default_kernel_timeout()?,
            ranks_on_device: std::sync::OnceLock::new(),
        })
    }

    /// One rank per process, as `torchrun` or `srun` launch them: `RANK`, `WORLD_SIZE`,
    /// `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT` (see [`EnvConfig`]). The device:
    /// `MOE_EP_DEVICE=cpu` the emulator, `cuda:N` GPU N; `cuda` or unset: GPU
    /// `LOCAL_RANK % count` when GPUs exist (unset and no GPU: the emulator).
    pub fn from_env() -> Result<Group> {
        let env = EnvConfig::from_env()?;
        let local_gpu = || -> Result<Option<Device>> {
            match Device::cuda_count() {
                Ok(n) if n > 0 => Ok(Some(Device::cuda(env.local_rank % n)?)),
                _ => Ok(None),
            }
        };
        let device = match std::env::var("MOE_EP_DEVICE").as_deref() {
            Ok("cuda") | Ok("gpu") => {
                local_gpu()?.ok_or_else(|| Error::NoDriver("MOE_EP_DEVICE=cuda but no GPU".into()))?
            }
            Ok(name) => Device::from_name(name)?,
            Err(_) => local_gpu()?.unwrap_or_else(Device::cpu),
        };
        let bootstrap = TcpBootstrap::from_env(default_timeout())?;
        Group::new(device, Box::new(bootstrap))
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Ranks in the group.
    pub fn num_ranks(&self) -> usize {
        self.num_ranks
    }

    /// This rank's device.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// This rank's stream: every op of the group runs on it.
    pub fn stream(&self) -> &Stream {
        &self.stream
    }

    /// Collective the first time (every rank calls it): how many ranks of the group run on
    /// this rank's GPU (in this process or others, e.g. under MPS). Ranks sharing a GPU also
    /// share its SMs: a kernel that waits for its peers only finishes if all their blocks
    /// are resident at once, so ops size their grids by this.
    pub fn ranks_on_device(&self) -> Result<usize> {
        if let Some(&n) = self.ranks_on_device.get() {
            return Ok(n);
        }
        let me = self.device.identity()?;
        let all = self.bootstrap.all_gather(me.as_bytes())?;
        let n = all.iter().filter(|id| id[..] == *me.as_bytes()).count().max(1);
        Ok(*self.ranks_on_device.get_or_init(|| n))
    }

    /// The bootstrap (small host-side all-gathers and barriers).
    pub fn bootstrap(&self) -> &dyn Bootstrap {
        &*self.bootstrap
    }

    /// Bound for every device-side wait of this group's kernels (default 100 s, or
    /// `MOE_EP_TIMEOUT_S`).
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Sets the bound for device-side waits.
    pub fn set_timeout(&mut self, timeout: Duration) -> Result<()> {
        if timeout.is_zero() {
            return Err(Error::invalid("timeout", "must be positive"));
        }
        self.timeout = timeout;
        Ok(())
    }

    /// Timeout in nanoseconds, as kernels take it.
    pub fn timeout_ns(&self) -> u64 {
        self.timeout.as_nanos().min(u64::MAX as u128) as u64
    }

    /// Device address of the [`moe_ep_abi::ErrorSlot`] this rank's kernels report into.
    pub fn error_ptr(&self) -> u64 {
        self.error.ptr()
    }

    /// Returns (and clears) what a kernel of this rank reported, as an [`Error`]. Call after
    /// the stream is synchronised.
    pub fn take_device_error(&self, kernel: &'static str) -> Result<()> {
        self.error.take(kernel)
    }

    /// Collective: a zeroed buffer of `bytes` on every rank, plus every rank's view of all of
    /// them. Every rank calls it with the same `bytes` and `sharing`.
    pub fn alloc_symmetric(&self, bytes: usize, sharing: Sharing) -> Result<SymmetricBuffer> {
        let use_fd = match sharing {
            Sharing::Auto => self.device.is_cpu(),
            Sharing::Ipc if self.device.is_cpu() => {
                return Err(Error::Unsupported("Sharing::Ipc needs a GPU (the CPU back end shares memfds)".into()));
            }
            Sharing::Ipc => false,
            Sharing::Fd => true,
        };
        let local = if use_fd { self.device.alloc_shareable(bytes)? } else { self.device.alloc(bytes)? };
        let exported: Option<OwnedFd> = if use_fd { Some(local.export_fd()?) } else { None };
        let me = Export {
            pid: std::process::id(),
            ordinal: self.device.ordinal().map_or(-1, |o| o as i32),
            bytes: local.len() as u64,
            ptr: local.ptr(),
            fd: exported.as_ref().map_or(-1, |f| f.as_raw_fd()),
            ipc: if use_fd || self.device.is_cpu() { None } else { Some(local.ipc_handle()?) },
        };
        let blobs = self.bootstrap.all_gather(&me.encode())?;
        if blobs.len() != self.num_ranks {
            return Err(Error::Bootstrap(format!(
                "all-gather returned {} blobs for {} ranks",
                blobs.len(),
                self.num_ranks
            )));
        }
        let mut peer_ptrs = Vec::with_capacity(self.num_ranks);
        let mut imported = Vec::new();
        for (r, blob) in blobs.iter().enumerate() {
            let peer = Export::decode(blob)?;
            if peer.bytes != me.bytes {
                return Err(Error::invalid(
                    "bytes",
                    format!("rank {r} allocated {} bytes, rank {} {}", peer.bytes, self.rank, me.bytes),
                ));
            }
            if r == self.rank {
                peer_ptrs.push(local.ptr());
            } else if peer.pid == me.pid {
                // Same address space: the pointer is valid here (peer access was enabled by
                // `in_process`; VMM mappings of another GPU need an explicit grant).
                if peer.ordinal != me.ordinal && peer.ordinal >= 0 && use_fd {
                    Device::cuda(peer.ordinal as usize)?.grant_access(&local)?;
                }
                peer_ptrs.push(peer.ptr);
            } else if let Some(handle) = peer.ipc {
                let buf = self.device.open_ipc(&handle, peer.bytes as usize)?;
                peer_ptrs.push(buf.ptr());
                imported.push(buf);
            } else if peer.fd >= 0 {
                let fd = fd::fetch_fd(peer.pid, peer.fd)?;
                let buf = self.device.import_fd(&fd, peer.bytes as usize)?;
                peer_ptrs.push(buf.ptr());
                imported.push(buf);
            } else {
                return Err(Error::Unsupported(format!("rank {r}'s memory is not shareable across processes")));
            }
        }
        let peer_table = self.device.alloc(8 * self.num_ranks)?;
        peer_table.write(&self.stream, 0, &peer_ptrs)?; // (returns once written)
        // Exporters keep their descriptors open until every importer has its own copy; and
        // no rank returns (to launch kernels that peers' allocations could stall behind on a
        // shared GPU) before every rank is done allocating.
        self.bootstrap.barrier()?;
        drop(exported);
        Ok(SymmetricBuffer {
            local,
            _imported: imported,
            peer_ptrs,
            peer_table: PeerTable::Device(peer_table),
            epoch: 0,
        })
    }
}

/// The device-side wait bound: `MOE_EP_TIMEOUT_S` (seconds, may be fractional) or 100 s.
fn default_kernel_timeout() -> Result<Duration> {
    match std::env::var("MOE_EP_TIMEOUT_S") {
        Err(_) => Ok(Duration::from_nanos(DEFAULT_TIMEOUT_NS)),
        Ok(v) => match v.trim().parse::<f64>() {
            Ok(s) if s > 0.0 && s.is_finite() => Ok(Duration::from_secs_f64(s)),
            _ => Err(Error::invalid(
                "MOE_EP_TIMEOUT_S",
                format!("MOE_EP_TIMEOUT_S=\"{v}\" is not a positive number of seconds"),
            )),
        },
    }
}

/// What a rank publishes about its part of a symmetric allocation.
struct Export {
    pid: u32,
    ordinal: i32,
    bytes: u64,
    ptr: u64,
    fd: i32,
    ipc: Option<[u8; 64]>,
}

impl Export {
    const MAGIC: u32 = 0x4d45_5331; // "MES1"

    fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(104);
        b.extend_from_slice(&Self::MAGIC.to_le_bytes());
        b.extend_from_slice(&self.pid.to_le_bytes());
        b.extend_from_slice(&self.ordinal.to_le_bytes());
        b.extend_from_slice(&self.fd.to_le_bytes());
        b.extend_from_slice(&self.bytes.to_le_bytes());
        b.extend_from_slice(&self.ptr.to_le_bytes());
        if let Some(h) = &self.ipc {
            b.extend_from_slice(h);
        }
        b
    }

    fn decode(b: &[u8]) -> Result<Export> {
        let bad = || Error::Bootstrap("malformed symmetric-memory descriptor from a peer".into());
        if (b.len() != 32 && b.len() != 96) || b[0..4] != Self::MAGIC.to_le_bytes() {
            return Err(bad());
        }
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| u64::from(u32_at(i)) | (u64::from(u32_at(i + 4)) << 32);
        let ipc = if b.len() == 96 {
            let mut h = [0u8; 64];
            h.copy_from_slice(&b[32..96]);
            Some(h)
        } else {
            None
        };
        Ok(Export {
            pid: u32_at(4),
            ordinal: u32_at(8) as i32,
            fd: u32_at(12) as i32,
            bytes: u64_at(16),
            ptr: u64_at(24),
            ipc,
        })
    }
}

/// A buffer of equal size on every rank, with this rank's view of all of them.
pub struct SymmetricBuffer {
    local: DeviceBuffer,
    _imported: Vec<DeviceBuffer>,
    peer_ptrs: Vec<u64>,
    peer_table: PeerTable,
    epoch: u64,
}

/// Where a [`SymmetricBuffer`]'s table of peer addresses lives.
enum PeerTable {
    Device(DeviceBuffer),
    /// Host memory the GPU reads (written without a CUDA call).
    Mapped(HostMapped),
}

impl SymmetricBuffer {
    /// This rank's buffer.
    pub fn local(&self) -> &DeviceBuffer {
        &self.local
    }

    /// Size in bytes (the same on every rank).
    pub fn len(&self) -> usize {
        self.local.len()
    }

    /// True when zero-sized.
    pub fn is_empty(&self) -> bool {
        self.local.is_empty()
    }

    /// Address of rank `r`'s buffer as this rank's kernels see it.
    pub fn peer_ptr(&self, r: usize) -> Option<u64> {
        self.peer_ptrs.get(r).copied()
    }

    /// Device address of the table of all ranks' addresses (`num_ranks` u64).
    pub fn peer_table_ptr(&self) -> u64 {
        match &self.peer_table {
            PeerTable::Device(t) => t.ptr(),
            PeerTable::Mapped(t) => t.device_ptr(),
        }
    }

    /// The next flag value for a call using this buffer (1, 2, ...). Every rank calls it
    /// once per call, so all ranks agree; flags compare `>=` and are never reset.
    pub fn next_epoch(&mut self) -> u64 {
        self.epoch += 1;
        self.epoch
    }

    /// Bytes `[offset, offset + len)` of every rank's buffer as a symmetric buffer of its
    /// own, its peer table in `table` (host memory the GPU reads, `8 * num_ranks` bytes,
    /// allocated beforehand). Not collective and no CUDA call: every rank already maps every
    /// other's memory, so one allocation made up front (a DeepEP-style
    /// `Buffer(num_nvl_bytes)`) can be carved up later, even while a CUDA graph is being
    /// captured. `offset` is a multiple of 256; the part keeps `self` alive. Carve the same
    /// way on every rank.
    pub fn slice(self: &Arc<Self>, offset: usize, len: usize, table: HostMapped) -> Result<SymmetricBuffer> {
        if !offset.is_multiple_of(256) || offset.checked_add(len).is_none_or(|end| end > self.len()) {
            return Err(Error::invalid(
                "offset",
                format!("[{offset}, +{len}) is not a 256-aligned part of a {}-byte buffer", self.len()),
            ));
        }
        if table.len() < 8 * self.peer_ptrs.len() {
            return Err(Error::invalid("table", format!("{} bytes for {} ranks", table.len(), self.peer_ptrs.len())));
        }
        let peer_ptrs: Vec<u64> = self.peer_ptrs.iter().map(|p| p + offset as u64).collect();
        for (r, p) in peer_ptrs.iter().enumerate() {
            table.write(8 * r, *p)?;
        }
        let device = self.local.device().clone();
        let keep = self.clone();
        // SAFETY: the range lies in this rank's buffer (checked), which `keep` holds until the
        // part is dropped.
        let local =
            unsafe { DeviceBuffer::lent(&device, self.local.ptr() + offset as u64, len, Box::new(move || drop(keep))) };
        let peer_table = PeerTable::Mapped(table);
        Ok(SymmetricBuffer { local, _imported: Vec::new(), peer_ptrs, peer_table, epoch: 0 })
    }
}
