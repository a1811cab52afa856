//! Collectives over symmetric memory, built on the peer kernels of `moe-ep-kernels`.
use crate::device::LaunchConfig;
use crate::group::{Group, Sharing, SymmetricBuffer};
use crate::{DeviceBuffer, Error, Result};
use moe_ep_abi::{AllGatherLayout, AllGatherParams};
use moe_ep_kernels::collective::ALL_GATHER;

/// All-gather of fixed-size blocks: every rank contributes `block_bytes` and receives all
/// ranks' blocks in rank order. Each rank stores its block into every peer's symmetric
/// buffer with 16-byte stores and raises a release flag there (see the kernel's docs).
pub struct AllGather {
    sym: SymmetricBuffer,
    block_bytes: usize,
    num_blocks: u32,
}

impl AllGather {
    /// Collective: sets up an all-gather of `block_bytes` (a positive multiple of 16) per
    /// rank, moved by `num_blocks` thread blocks (`0` = 4 on a GPU, 2 on the CPU emulator).
    pub fn new(group: &Group, block_bytes: usize, num_blocks: u32, sharing: Sharing) -> Result<AllGather> {
        if block_bytes == 0 || !block_bytes.is_multiple_of(16) {
            return Err(Error::invalid("block_bytes", format!("{block_bytes} is not a positive multiple of 16")));
        }
        let num_blocks = match num_blocks {
            0 if group.device().is_cpu() => 2,
            0 => 4,
            n => n,
        };
        if num_blocks > 64 {
            return Err(Error::invalid("num_blocks", format!("{num_blocks} > 64")));
        }
        let layout = AllGatherLayout::new(group.num_ranks() as u32, num_blocks, block_bytes as u64);
        let sym = group.alloc_symmetric(layout.total_bytes as usize, sharing)?;
        Ok(AllGather { sym, block_bytes, num_blocks })
    }

    /// Bytes each rank contributes.
    pub fn block_bytes(&self) -> usize {
        self.block_bytes
    }

    /// The symmetric buffer the blocks travel through.
    pub fn symmetric(&self) -> &SymmetricBuffer {
        &self.sym
    }

    /// Collective: gathers `send` (`block_bytes`) of every rank into `recv`
    /// (`num_ranks * block_bytes`, rank order) and waits for completion. A peer that never
    /// joins gives [`Error::Timeout`] after the group's timeout; the group stays usable.
    pub fn run(&mut self, group: &Group, send: &DeviceBuffer, recv: &DeviceBuffer) -> Result<()> {
        self.launch(group, send, recv)?;
        group.stream().synchronize()?;
        group.take_device_error(ALL_GATHER.name)
    }

    /// Queues the all-gather on the group's stream without waiting (on the CPU emulator it
    /// completes before returning). Check [`Group::take_device_error`] after synchronising.
    pub fn launch(&mut self, group: &Group, send: &DeviceBuffer, recv: &DeviceBuffer) -> Result<()> {
        let num_ranks = group.num_ranks();
        if send.len() < self.block_bytes {
            return Err(Error::invalid("send", format!("{} bytes, need {}", send.len(), self.block_bytes)));
        }
        if recv.len() < num_ranks * self.block_bytes {
            return Err(Error::invalid("recv", format!("{} bytes, need {}", recv.len(), num_ranks * self.block_bytes)));
        }
        if !send.device().same_as(group.device()) || !recv.device().same_as(group.device()) {
            return Err(Error::invalid("send/recv", "buffers must live on the group's device"));
        }
        if !send.ptr().is_multiple_of(16) || !recv.ptr().is_multiple_of(16) {
            return Err(Error::invalid("send/recv", "16-byte alignment required"));
        }
        let params = AllGatherParams {
            peer_bases: self.sym.peer_table_ptr(),
            send: send.ptr(),
            recv: recv.ptr(),
            error: group.error_ptr(),
            block_bytes: self.block_bytes as u64,
            epoch: self.sym.next_epoch(),
            timeout_ns: group.timeout_ns(),
            rank: group.rank() as u32,
            num_ranks: num_ranks as u32,
        };
        let block_dim = group.device().block_dim(256).max((num_ranks as u32).div_ceil(32) * 32);
        let cfg = LaunchConfig { grid_dim: self.num_blocks, block_dim, shared_mem_bytes: 0 };
        // SAFETY: the symmetric buffer was sized by the same AllGatherLayout the kernel uses;
        // send/recv sizes and alignment were checked above; all stay alive until the caller
        // synchronises (`run` does).
        unsafe { group.stream().launch(&ALL_GATHER, cfg, params) }
    }
}
