//! EP groups: a checked `ncclEpGroupConfig_t` and the rank's [`moe_ep::Buffer`] sized from it.
use crate::error::{Failure, Result};
use crate::sys::*;
use moe_ep::buffer::HtShapes;
use moe_ep::intranode::{HtBuffer, HtConfig};
use moe_ep::limits::{MAX_HIDDEN, MAX_TOPK};
use moe_ep::low_latency::{LlBuffer, LlConfig};
use moe_ep::{Buffer, BufferConfig, Group};
use std::sync::Arc;
use std::time::Duration;

/// The two modes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algorithm {
    LowLatency,
    HighThroughput,
}

/// A group's configuration with its defaults resolved.
#[derive(Clone, Copy, Debug)]
pub struct GroupConfig {
    pub algorithm: Algorithm,
    pub num_experts: usize,
    /// M: most tokens a rank dispatches per call.
    pub max_dispatch_tokens_per_rank: usize,
    /// HT: output rows per rank (0: sized per routing, "eager").
    pub max_recv_tokens_per_rank: usize,
    /// Most bytes per token row; `hidden` is this over 2 (bf16 elements).
    pub max_token_bytes: usize,
    /// LL: the buffer's bytes (0: sized from the shapes).
    pub rdma_buffer_size: usize,
    /// HT: channels (0: the default).
    pub num_channels: usize,
    /// Device-side waits give up after this (None: the library default).
    pub timeout: Option<Duration>,
    /// Largest top-k of the group's handles (0: unset).
    pub num_topk: usize,
    /// Allocator of library-owned handle memory.
    pub alloc: ncclEpAllocConfig_t,
    /// HT overflow policy DROP: rows past `max_recv_tokens_per_rank` are dropped, not an error.
    pub drop_overflow: bool,
}

impl GroupConfig {
    /// Checks `raw` for a group of `num_ranks`.
    pub fn parse(raw: &ncclEpGroupConfig_t, num_ranks: usize) -> Result<GroupConfig> {
        if raw.version == 0 {
            return Err(Failure::invalid("config.version is 0: initialise the config with NCCL_EP_GROUP_CONFIG_INIT"));
        }
        let algorithm = match raw.algorithm {
            NCCL_EP_ALGO_LOW_LATENCY => Algorithm::LowLatency,
            NCCL_EP_ALGO_HIGH_THROUGHPUT => Algorithm::HighThroughput,
            other => return Err(Failure::invalid(format!("config.algorithm {other} is neither LL (0) nor HT (1)"))),
        };
        let (e, m) = (raw.num_experts as usize, raw.max_dispatch_tokens_per_rank as usize);
        if e == 0 || !e.is_multiple_of(num_ranks) {
            return Err(Failure::invalid(format!(
                "config.num_experts {e} must be a positive multiple of {num_ranks} ranks"
            )));
        }
        if m == 0 {
            return Err(Failure::invalid("config.max_dispatch_tokens_per_rank must be > 0"));
        }
        let token_bytes = raw.max_token_bytes as usize;
        if token_bytes == 0 || !token_bytes.is_multiple_of(16) || token_bytes > 2 * MAX_HIDDEN {
            return Err(Failure::invalid(format!(
                "config.max_token_bytes {token_bytes} must be a positive multiple of 16 up to {}",
                2 * MAX_HIDDEN
            )));
        }
        let recv = raw.max_recv_tokens_per_rank as usize;
        if algorithm == Algorithm::HighThroughput && recv != 0 && recv < m {
            return Err(Failure::invalid(format!(
                "config.max_recv_tokens_per_rank {recv} is below max_dispatch_tokens_per_rank {m}"
            )));
        }
        if raw.num_topk as usize > MAX_TOPK {
            return Err(Failure::invalid(format!("config.num_topk {} is above {MAX_TOPK}", raw.num_topk)));
        }
        if raw.enable_mask != 0 {
            return Err(Failure::usage("config.enable_mask: rank masks are not supported by this moe-ep release"));
        }
        if raw.zero_copy == NCCL_EP_ZERO_COPY_ON {
            return Err(Failure::usage(
                "config.zero_copy ON needs NCCL window-backed tensors, which moe-ep does not take: use AUTO or OFF",
            ));
        }
        let drop_overflow = match raw.overflow_policy {
            NCCL_EP_OVERFLOW_AUTO | NCCL_EP_OVERFLOW_TRAP => false,
            NCCL_EP_OVERFLOW_DROP if algorithm == Algorithm::HighThroughput && recv == 0 => {
                return Err(Failure::invalid(
                    "config.overflow_policy DROP needs a max_recv_tokens_per_rank (the rows each rank keeps), not AUTO",
                ));
            }
            NCCL_EP_OVERFLOW_DROP => algorithm == Algorithm::HighThroughput,
            other => return Err(Failure::invalid(format!("config.overflow_policy {other} is not AUTO, TRAP or DROP"))),
        };
        let timeout = match (raw.timeout_ns, std::env::var("NCCL_EP_TIMEOUT_MS").ok()) {
            (_, Some(ms)) => Some(Duration::from_millis(
                ms.trim().parse().map_err(|_| Failure::invalid(format!("NCCL_EP_TIMEOUT_MS={ms} is not a number")))?,
            )),
            (0, None) => None,
            (ns, None) => Some(Duration::from_nanos(ns)),
        };
        let channels = match (raw.num_channels, raw.max_num_sms) {
            (0, 0) => 0,
            (0, sms) => (sms as usize / 2).max(1),
            (c, _) => c as usize,
        };
        Ok(GroupConfig {
            algorithm,
            num_experts: e,
            max_dispatch_tokens_per_rank: m,
            max_recv_tokens_per_rank: recv,
            max_token_bytes: token_bytes,
            rdma_buffer_size: raw.rdma_buffer_size as usize,
            num_channels: channels,
            timeout,
            num_topk: raw.num_topk as usize,
            alloc: raw.alloc,
            drop_overflow,
        })
    }

    /// Hidden size in bf16 elements the buffers are sized for.
    pub fn hidden(&self) -> usize {
        self.max_token_bytes / 2
    }

    /// The HT shapes: every handle's top-k fits when the config does not bound it.
    pub fn ht_shapes(&self) -> HtShapes {
        HtShapes {
            num_experts: self.num_experts,
            hidden: self.hidden(),
            num_topk: if self.num_topk > 0 { self.num_topk } else { MAX_TOPK },
            num_scales: 0,
            num_channels: self.num_channels,
        }
    }

    /// The LL buffer's shapes for rows of `hidden` bf16 elements.
    pub fn ll_config(&self, hidden: usize) -> LlConfig {
        LlConfig { num_experts: self.num_experts, hidden, max_tokens: self.max_dispatch_tokens_per_rank }
    }
}

/// What `ncclEpGroup_t` points to.
pub struct EpGroup {
    pub buffer: Arc<Buffer>,
    pub config: GroupConfig,
}

impl EpGroup {
    /// Collective: the rank's buffer for `config` on `group`.
    pub fn new(mut group: Group, config: GroupConfig) -> Result<EpGroup> {
        if let Some(t) = config.timeout {
            group.set_timeout(t)?;
        }
        let r = group.num_ranks();
        let memory = match config.algorithm {
            Algorithm::HighThroughput => {
                let s = config.ht_shapes();
                let cfg = HtConfig {
                    num_experts: s.num_experts,
                    hidden: s.hidden,
                    num_topk: s.num_topk,
                    num_scales: s.hidden / 128,
                    num_channels: s.num_channels,
                    warps_per_peer: 0,
                    num_slots: 0,
                    heap_bytes: 0,
                };
                BufferConfig { nvl_bytes: HtBuffer::bytes_needed(&group, &cfg)?, heap_bytes: Some(0), rdma_bytes: 0 }
            }
            Algorithm::LowLatency => {
                let cfg = config.ll_config(config.hidden());
                let need = LlBuffer::size_hint(r, &cfg);
                let rdma_bytes = match config.rdma_buffer_size {
                    0 => need,
                    n if n < need => {
                        return Err(Failure::invalid(format!(
                            "config.rdma_buffer_size {n} is below the {need} bytes these shapes need (or pass NCCL_EP_AUTO)"
                        )));
                    }
                    n => n,
                };
                BufferConfig { nvl_bytes: 0, heap_bytes: None, rdma_bytes }
            }
        };
        let buffer = Buffer::new(group, memory)?;
        if config.algorithm == Algorithm::HighThroughput {
            buffer.ht_prepare(&config.ht_shapes())?;
        }
        Ok(EpGroup { buffer: Arc::new(buffer), config })
    }
}
