//! HT intranode dispatch/combine on the device against `reference::ht_dispatch` /
//! `ht_combine`, bit for bit, on fresh random inputs with poisoned outputs: uneven and
//! empty ranks, random -1 entries, exact-size and padded (`num_worst_tokens`) outputs,
//! bias and weights, many consecutive calls over the same rings.
use moe_ep::intranode::{HtBuffer, HtConfig, HtDispatchArgs};
use moe_ep::layout::{IndexType, get_dispatch_layout};
use moe_ep::reference::{self, Routing, f32_to_bf16};
use moe_ep::{DeviceBuffer, Group};
use moe_ep_tests::{Rng, device, devices, num_ranks, on_ranks};

struct Case {
    num_experts: usize,
    hidden: usize,
    num_topk: usize,
    max_tokens: usize,
    num_worst_tokens: Option<usize>,
    with_bias: bool,
    calls: usize,
}

/// Random bf16 bits of moderate values (no NaN/inf), so sums stay finite.
fn bf16_row(rng: &mut Rng, n: usize) -> Vec<u16> {
    (0..n).map(|_| f32_to_bf16((rng.next_u32() as f32 / u32::MAX as f32 - 0.5) * 8.0)).collect()
}

fn routing(rng: &mut Rng, num_ranks: usize, case: &Case, call: usize) -> Vec<Vec<i64>> {
    (0..num_ranks)
        .map(|r| {
            // Uneven counts that change between calls; rank 1 is empty on even calls.
            let t = if r == 1 && call.is_multiple_of(2) { 0 } else { 1 + rng.below(case.max_tokens as u64) as usize };
            let mut idx = Vec::new();
            for _ in 0..t {
                let mut row: Vec<i64> = Vec::new();
                while row.len() < case.num_topk {
                    let e = rng.below(case.num_experts as u64) as i64;
                    if !row.contains(&e) {
                        row.push(e);
                    }
                }
                for e in row.iter_mut() {
                    if rng.below(8) == 0 {
                        *e = -1;
                    }
                }
                idx.extend(row);
            }
            idx
        })
        .collect()
}

fn upload<T: bytemuck::Pod>(group: &Group, data: &[T]) -> DeviceBuffer {
    let b = group.stream().alloc((std::mem::size_of_val(data)).max(16)).unwrap();
    b.write(group.stream(), 0, data).unwrap();
    b
}

fn run(case: Case) {
    let dev = device();
    let n = num_ranks(&dev).min(8);
    let (h, k, e) = (case.hidden, case.num_topk, case.num_experts);
    let mut rng = Rng::fresh("intranode");
    // Every call's inputs and reference outputs, computed up front for all ranks.
    let mut calls = Vec::new();
    for call in 0..case.calls {
        let idx = routing(&mut rng, n, &case, call);
        let tokens: Vec<usize> = idx.iter().map(|v| v.len() / k).collect();
        let x: Vec<Vec<u16>> = tokens.iter().map(|&t| bf16_row(&mut rng, t * h)).collect();
        let w: Vec<Vec<f32>> =
            tokens.iter().map(|&t| (0..t * k).map(|_| rng.next_u32() as f32 / u32::MAX as f32).collect()).collect();
        let r = Routing::new(n, e, k, idx.clone()).unwrap();
        let want = reference::ht_dispatch(&r, &x, &w, h, 1, case.num_worst_tokens).unwrap();
        // Expert outputs: fresh bf16 rows per received row, plus bias per source token.
        let rows: Vec<usize> = want.ranks.iter().map(|rv| rv.recv_src_idx.len()).collect();
        let y: Vec<Vec<u16>> = rows.iter().map(|&m| bf16_row(&mut rng, m * h)).collect();
        let b0: Vec<Vec<u16>> = tokens.iter().map(|&t| bf16_row(&mut rng, t * h)).collect();
        let b1: Vec<Vec<u16>> = tokens.iter().map(|&t| bf16_row(&mut rng, t * h)).collect();
        let bias = if case.with_bias { [Some(&b0[..]), Some(&b1[..])] } else { [None, None] };
        let combined = reference::ht_combine(
            &want.handle,
            &y,
            Some(&want.ranks.iter().map(|rv| rv.recv_topk_weights.clone()).collect::<Vec<_>>()),
            bias,
            h,
        )
        .unwrap();
        calls.push((idx, tokens, x, w, want, y, b0, b1, combined));
    }
    let groups = Group::in_process(&devices(n)).unwrap();
    let cfg = HtConfig { num_experts: e, hidden: h, num_topk: k, num_scales: 0, num_channels: 0, num_slots: 0 };
    on_ranks(groups, |rank, group| {
        let mut buf = HtBuffer::new(&group, cfg).unwrap();
        let s = group.stream();
        for (call, (idx, tokens, x, w, want, y, b0, b1, combined)) in calls.iter().enumerate() {
            let t = tokens[rank];
            let topk = upload(&group, &idx[rank]);
            let weights = upload(&group, &w[rank]);
            let xb = upload(&group, &x[rank]);
            let layout = get_dispatch_layout(&group, &topk, IndexType::I64, t, k, e).unwrap();
            let args = HtDispatchArgs {
                x: &xb,
                hidden_bytes: 2 * h,
                num_tokens: t,
                x_scales: None,
                topk: Some((&topk, IndexType::I64, &weights, k)),
                layout: &layout,
                expert_alignment: 1,
                num_worst_tokens: case.num_worst_tokens,
            };
            // Ranks share one GPU here: uploads from pageable memory may wait for the device, so
            // no rank starts the collective while another is still uploading.
            group.bootstrap().barrier().unwrap();
            let out = buf.dispatch(&group, &args).unwrap();
            s.synchronize().unwrap();
            group.take_device_error("ht_dispatch").unwrap();
            let rv = &want.ranks[rank];
            let got_n = rv.num_recv_tokens;
            let ctx = format!("rank {rank} call {call}");
            if case.num_worst_tokens.is_none() {
                assert_eq!(out.num_recv_tokens, Some(got_n), "{ctx}");
                assert_eq!(out.num_recv_tokens_per_expert_list.as_ref(), Some(&rv.num_recv_tokens_per_expert), "{ctx}");
            }
            assert_eq!(
                out.num_recv_tokens_per_expert.to_vec::<i32>(s).unwrap(),
                rv.num_recv_tokens_per_expert,
                "{ctx}"
            );
            let rows = out.handle.num_rows;
            assert_eq!(rows, rv.recv_src_idx.len(), "{ctx}");
            let recv_x: Vec<u16> = out.recv_x.to_vec(s).unwrap();
            assert!(recv_x[..got_n * h] == rv.recv_x[..got_n * h], "{ctx}: recv_x");
            assert_eq!(
                &out.recv_src_idx.to_vec::<i32>(s).unwrap()[..rows],
                &rv.recv_src_idx[..],
                "{ctx}: recv_src_idx"
            );
            assert_eq!(
                &out.recv_topk_idx.to_vec::<i64>(s).unwrap()[..rows * k],
                &rv.recv_topk_idx[..],
                "{ctx}: recv_topk_idx"
            );
            let got_w: Vec<f32> = out.recv_topk_weights.to_vec(s).unwrap();
            assert!(
                got_w[..rows * k].iter().zip(&rv.recv_topk_weights).all(|(a, b)| a.to_bits() == b.to_bits()),
                "{ctx}: weights"
            );
            let rpm: Vec<i32> = out.handle.rank_prefix_matrix.to_vec(s).unwrap();
            assert_eq!(rpm, want.handle.rank_prefix_matrix(), "{ctx}: rank_prefix_matrix");

            // Combine the fresh expert outputs back (with the received weights, and bias).
            let yb = upload(&group, &y[rank]);
            let (bb0, bb1) = (upload(&group, &b0[rank]), upload(&group, &b1[rank]));
            let bias = if case.with_bias { [Some(&bb0), Some(&bb1)] } else { [None, None] };
            group.bootstrap().barrier().unwrap();
            let c = buf.combine(&group, &out.handle, &yb, h, Some((&out.recv_topk_weights, k)), bias).unwrap();
            s.synchronize().unwrap();
            group.take_device_error("ht_combine").unwrap();
            let cx: Vec<u16> = c.combined_x.to_vec(s).unwrap();
            assert!(cx[..t * h] == combined[rank].combined_x[..], "{ctx}: combined_x");
            let cw: Vec<f32> = c.combined_topk_weights.unwrap().to_vec(s).unwrap();
            let want_w = combined[rank].combined_topk_weights.as_ref().unwrap();
            assert!(cw[..t * k].iter().zip(want_w).all(|(a, b)| a.to_bits() == b.to_bits()), "{ctx}: combined weights");
        }
    });
}

#[test]
fn ht_exact_size_many_calls() {
    let cpu = device().is_cpu();
    run(Case {
        num_experts: 16,
        hidden: 64,
        num_topk: 4,
        max_tokens: if cpu { 40 } else { 500 },
        num_worst_tokens: None,
        with_bias: true,
        calls: 4,
    });
}

#[test]
fn ht_padded_outputs_without_bias() {
    let cpu = device().is_cpu();
    let max_tokens = if cpu { 30 } else { 300 };
    run(Case {
        num_experts: 8,
        hidden: 128,
        num_topk: 2,
        max_tokens,
        num_worst_tokens: Some(8 * max_tokens + 3),
        with_bias: false,
        calls: 2,
    });
}
