//! NCCL EP's HT `EXPERT_MAJOR` layout over a FLAT dispatch's rows (kernels
//! `moe_ep_kernels::expert_major`; semantics: `reference::ht_expert_major` and
//! `reference::ht_expert_major_reduce`, bit for bit). Everything runs on the group's stream
//! after the dispatch that made the rows.
use crate::device::{DeviceBuffer, LaunchConfig};
use crate::group::Group;
use crate::{Error, Result};
use moe_ep_abi::HtExpertMajorParams;
use moe_ep_kernels::Kernel;
use moe_ep_kernels::expert_major::{HT_EXPERT_MAJOR_COUNTS, HT_EXPERT_MAJOR_PERMUTE, HT_EXPERT_MAJOR_REDUCE};

/// The flat rows of a dispatch and their expert-major zones.
pub struct ExpertMajorIo<'a> {
    /// `[max_rows, row_bytes]` (permute: read; reduce: written, bf16).
    pub flat_x: &'a DeviceBuffer,
    /// `[max_rows, K]` i64 local expert ids (-1 elsewhere), the dispatch's `recv_topk_idx`.
    pub flat_topk_idx: &'a DeviceBuffer,
    /// `[max_rows, K]` f32 (permute: read; reduce: written), optional.
    pub flat_topk_weights: Option<&'a DeviceBuffer>,
    /// `[1]` i32 on the device: rows of the dispatch.
    pub num_rows: &'a DeviceBuffer,
    /// `[L]` i32 on the device: zone sizes (the notify's aligned counts).
    pub expert_counts: &'a DeviceBuffer,
    /// `[num_slots, row_bytes]` (permute: written; reduce: read, bf16).
    pub em_x: &'a DeviceBuffer,
    /// `[num_slots]` f32 (permute: written; reduce: read), optional.
    pub em_weights: Option<&'a DeviceBuffer>,
    /// `[max_rows, K]` i32: written by the permute, read by the reduce.
    pub slot_map: &'a DeviceBuffer,
    /// Bytes per row, a multiple of 16.
    pub row_bytes: usize,
    /// Flat capacity in rows.
    pub max_rows: usize,
    /// Expert-major capacity in slots.
    pub num_slots: usize,
    /// K.
    pub num_topk: usize,
    /// L.
    pub num_local_experts: usize,
    /// NCCL EP's overflow policy DROP: zones needing more than `num_slots` in all are cut
    /// there (later copies dropped) instead of an `OVERFLOW` error.
    pub drop_overflow: bool,
}

impl ExpertMajorIo<'_> {
    fn params(&self, group: &Group) -> Result<HtExpertMajorParams> {
        let (rows, slots, k, l, rb) =
            (self.max_rows, self.num_slots, self.num_topk, self.num_local_experts, self.row_bytes);
        if rb == 0 || !rb.is_multiple_of(16) {
            return Err(Error::invalid("row_bytes", format!("{rb} is not a positive multiple of 16")));
        }
        let w = |b: Option<&DeviceBuffer>| b.map_or(0, |b| b.ptr());
        let checks: [(Option<&DeviceBuffer>, usize, u64, &'static str); 8] = [
            (Some(self.flat_x), rows * rb, 16, "flat_x"),
            (Some(self.flat_topk_idx), rows * k * 8, 8, "flat_topk_idx"),
            (self.flat_topk_weights, rows * k * 4, 4, "flat_topk_weights"),
            (Some(self.num_rows), 4, 4, "num_rows"),
            (Some(self.expert_counts), 4 * l, 4, "expert_counts"),
            (Some(self.em_x), slots * rb, 16, "em_x"),
            (self.em_weights, slots * 4, 4, "em_weights"),
            (Some(self.slot_map), rows * k * 4, 4, "slot_map"),
        ];
        for (buf, bytes, align, name) in checks {
            if let Some(b) = buf
                && (b.len() < bytes || !b.ptr().is_multiple_of(align))
            {
                return Err(Error::invalid(name, format!("{bytes} bytes ({align}-aligned) needed, got {}", b.len())));
            }
        }
        if k == 0 || k > moe_ep_abi::LL_MAX_TOPK as usize || l == 0 || slots > i32::MAX as usize {
            return Err(Error::invalid("num_topk", format!("top-{k} with {l} local experts and {slots} slots")));
        }
        Ok(HtExpertMajorParams {
            flat_x: self.flat_x.ptr(),
            flat_topk_idx: self.flat_topk_idx.ptr(),
            flat_topk_weights: w(self.flat_topk_weights),
            num_rows: self.num_rows.ptr(),
            expert_counts: self.expert_counts.ptr(),
            em_x: self.em_x.ptr(),
            em_weights: w(self.em_weights),
            slot_map: self.slot_map.ptr(),
            counts_out: 0,
            offsets_out: 0,
            total_out: 0,
            error: group.error_ptr(),
            row_bytes: rb as u64,
            max_rows: rows as u32,
            num_slots: slots as u32,
            num_topk: k as u32,
            num_local_experts: l as u32,
            rank: group.rank() as u32,
            out_i64: 0,
            drop_overflow: self.drop_overflow as u32,
            reserved: 0,
        })
    }

    /// Places the flat rows (and weights) into their zones, zero-pads each zone and records
    /// the slot map. More slots than `num_slots` needed: a device-side `OVERFLOW` error, or
    /// with `drop_overflow` the zones cut at `num_slots`.
    pub fn permute(&self, group: &Group) -> Result<()> {
        let p = self.params(group)?;
        launch(group, &HT_EXPERT_MAJOR_PERMUTE, p, self.num_local_experts as u32)
    }

    /// Sums each flat row's slots back into `flat_x` (and the slot weights into
    /// `flat_topk_weights`), after a permute of the same routing.
    pub fn reduce(&self, group: &Group) -> Result<()> {
        let p = self.params(group)?;
        launch(group, &HT_EXPERT_MAJOR_REDUCE, p, (self.max_rows as u32).div_ceil(8).clamp(1, 132))
    }
}

/// Writes, from the zone sizes `expert_counts` (`[L]` i32 on the device), the caller's zone
/// sizes, zone starts and total (each optional; `[L]`, `[L]`, `[1]` of i32, or i64 with
/// `i64_out`). With `cut_at` (the DROP policy's slots), sizes and starts are those of the
/// zones cut there ([`ExpertMajorIo::permute`]); the total is always the uncut one.
pub fn zone_counts(
    group: &Group,
    expert_counts: &DeviceBuffer,
    num_local_experts: usize,
    [counts, offsets, total]: [Option<&DeviceBuffer>; 3],
    i64_out: bool,
    cut_at: Option<usize>,
) -> Result<()> {
    let (l, width) = (num_local_experts, if i64_out { 8 } else { 4 });
    for (b, n, name) in [(counts, l, "counts"), (offsets, l, "offsets"), (total, 1, "total")] {
        if let Some(b) = b
            && (b.len() < n * width || !b.ptr().is_multiple_of(width as u64))
        {
            return Err(Error::invalid(name, format!("[{n}] {width}-byte integers needed")));
        }
    }
    if expert_counts.len() < 4 * l {
        return Err(Error::invalid("expert_counts", format!("[{l}] i32 needed")));
    }
    let p = HtExpertMajorParams {
        expert_counts: expert_counts.ptr(),
        counts_out: counts.map_or(0, |b| b.ptr()),
        offsets_out: offsets.map_or(0, |b| b.ptr()),
        total_out: total.map_or(0, |b| b.ptr()),
        error: group.error_ptr(),
        num_local_experts: l as u32,
        rank: group.rank() as u32,
        out_i64: i64_out as u32,
        num_slots: cut_at.unwrap_or(0).min(i32::MAX as usize) as u32,
        drop_overflow: cut_at.is_some() as u32,
        ..HtExpertMajorParams::default()
    };
    launch(group, &HT_EXPERT_MAJOR_COUNTS, p, 1)
}

fn launch(
    group: &Group,
    kernel: &'static Kernel<HtExpertMajorParams>,
    p: HtExpertMajorParams,
    grid: u32,
) -> Result<()> {
    let cfg = LaunchConfig { grid_dim: grid.max(1), block_dim: group.device().block_dim(256), shared_mem_bytes: 0 };
    // SAFETY: every buffer was checked against the shapes the params describe.
    unsafe { group.stream().launch(kernel, cfg, p) }
}
