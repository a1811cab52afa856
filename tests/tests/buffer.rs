//! `moe_ep::Buffer`, the session every interface drives (Python's `moe_ep.Buffer`, the C ABI):
//! HT layout + dispatch + combine and LL dispatch + combine through it, bit for bit against
//! the reference on fresh random inputs; a handle made before a relayout is refused; memory
//! that is too small is a typed error naming what to pass, and the buffer stays usable.
use moe_ep::buffer::{
    BufferConfig, CallStream, HtCombineCall, HtDispatchCall, LayoutCall, LlCombineCall, LlDispatchCall,
};
use moe_ep::intranode::{HtBuffer, HtConfig, HtDispatchArgs};
use moe_ep::layout::{IndexType, MAX_TOPK};
use moe_ep::low_latency::{LlBuffer, LlConfig, LlDispatchOptions, LlStats};
use moe_ep::reference::{self, Routing};
use moe_ep::{Buffer, Error, Group};
use moe_ep_tests::ht::{self, Case};
use moe_ep_tests::{Rng, device, devices, num_ranks, on_ranks, upload};

const NVL_BYTES: usize = 64 << 20;

fn ll_config() -> LlConfig {
    LlConfig { num_experts: 8, hidden: 128, max_tokens: 6 }
}

#[test]
fn ht_and_ll_through_the_session_match_the_reference() {
    session_round_trips(None); // DeepEP's num_nvl_bytes: rings first, the rest an output heap
}

#[test]
fn ht_and_ll_through_the_session_rings_only() {
    session_round_trips(Some(0));
}

/// Where `got` rows differ from `want` rows (of `h` elements): how many, the first, and
/// what it holds instead (zeros, or another row of `want`), for a failure message.
fn row_diff(got: &[u16], want: &[u16], h: usize) -> String {
    let bad: Vec<usize> = (0..want.len() / h).filter(|&r| got[r * h..][..h] != want[r * h..][..h]).collect();
    let Some(&first) = bad.first() else { return "rows equal".into() };
    let row = &got[first * h..][..h];
    let holds = if row.iter().all(|&v| v == 0) {
        "zeros".to_string()
    } else {
        match (0..want.len() / h).find(|&r| want[r * h..][..h] == *row) {
            Some(r) => format!("expected row {r}"),
            None => format!("{:?}..", &row[..4.min(h)]),
        }
    };
    format!("{} of {} rows differ; first {first} holds {holds}", bad.len(), want.len() / h)
}

fn session_round_trips(heap_bytes: Option<usize>) {
    let n = num_ranks(&device()).min(8);
    let mut rng = Rng::fresh("buffer");
    let case = Case { calls: 3, ..Case::new(8, 64, 3, 9) };
    let calls = ht::prepare(&case, n, &mut rng);
    let ll = ll_config();
    let (lk, lm) = (2, ll.max_tokens);
    let ll_idx: Vec<Vec<i64>> =
        (0..n).map(|r| ht::routing(&mut rng, n, &Case::new(ll.num_experts, 8, lk, lm), r)[r].clone()).collect();
    let ll_x: Vec<Vec<u16>> = ll_idx.iter().map(|i| rng.bf16(i.len() / lk * ll.hidden, 4.0)).collect();
    let ll_w: Vec<Vec<f32>> = ll_idx.iter().map(|i| i.iter().map(|_| rng.below(4) as f32 / 4.0).collect()).collect();
    let rdma_bytes = LlBuffer::size_hint(n, &ll);
    on_ranks(Group::in_process(&devices(n)).unwrap(), |rank, group| {
        let buffer = Buffer::new(group, BufferConfig { nvl_bytes: NVL_BYTES, heap_bytes, rdma_bytes }).unwrap();
        let g = buffer.group().clone();
        let s = g.stream();
        let on = CallStream::default();
        let (h, k, e) = (case.hidden, case.num_topk, case.num_experts);
        for (call, c) in calls.iter().enumerate() {
            let ctx = format!("rank {rank} call {call}");
            let t = c.tokens[rank];
            let (topk, weights, x) = (upload(&g, &c.idx[rank]), upload(&g, &c.w[rank]), upload(&g, &c.x[rank]));
            g.bootstrap().barrier().unwrap(); // (uploads may wait for the device when ranks share it)
            let lc =
                LayoutCall { topk_idx: &topk, index_type: IndexType::I64, num_tokens: t, num_topk: k, num_experts: e };
            let (layout, _) = buffer.layout(&on, &lc, None).unwrap();
            let layout = layout.unwrap();
            let layout = moe_ep::layout::DispatchLayout {
                num_tokens_per_rank: upload(&g, &layout.num_tokens_per_rank.to_vec::<i32>(&g).unwrap()),
                num_tokens_per_expert: upload(&g, &layout.num_tokens_per_expert.to_vec::<i32>(&g).unwrap()),
                is_token_in_rank: upload(&g, &layout.is_token_in_rank.to_vec::<u8>(&g).unwrap()),
            };
            g.bootstrap().barrier().unwrap();
            let dc = HtDispatchCall {
                args: HtDispatchArgs {
                    x: &x,
                    hidden_bytes: 2 * h,
                    num_tokens: t,
                    x_scales: None,
                    topk: Some((&topk, IndexType::I64, &weights, k)),
                    layout: &layout,
                    expert_alignment: 1,
                    num_worst_tokens: None,
                },
                hidden: h,
                num_experts: e,
                num_channels: 0,
            };
            let (out, ev) = buffer.ht_dispatch(&on, &dc).unwrap();
            assert!(ev.is_none(), "{ctx}: no event without async_finish");
            // A kernel's error (e.g. a timed-out wait) surfaces here, not as wrong rows.
            buffer.synchronize().unwrap_or_else(|e| panic!("{ctx}: dispatch: {e}"));
            let want = &c.want.ranks[rank];
            let rows = out.handle.num_rows;
            assert_eq!(rows, want.num_recv_tokens, "{ctx}");
            assert_eq!(out.num_recv_tokens_per_expert_list.as_ref(), Some(&want.num_recv_tokens_per_expert), "{ctx}");
            let got_x = out.recv_x.to_vec::<u16>(&g).unwrap();
            if got_x[..rows * h] != want.recv_x[..] {
                // Read again a while later: rows that arrive late point at missing ordering.
                std::thread::sleep(std::time::Duration::from_millis(200));
                let later = out.recv_x.to_vec::<u16>(&g).unwrap();
                panic!(
                    "{ctx}: recv_x ({} bytes at {:#x}): {}; read again 200 ms later: {}",
                    out.recv_x.len(),
                    out.recv_x.ptr(),
                    row_diff(&got_x, &want.recv_x, h),
                    row_diff(&later, &want.recv_x, h)
                );
            }
            assert_eq!(
                out.recv_src_idx.to_vec::<i32>(&g).unwrap()[..rows],
                want.recv_src_idx[..],
                "{ctx}: recv_src_idx"
            );
            let recv_idx = out.recv_topk_idx.as_ref().unwrap().to_vec::<i64>(&g).unwrap();
            assert_eq!(recv_idx[..rows * k], want.recv_topk_idx[..], "{ctx}: recv_topk_idx");
            let rpm = out.handle.rank_prefix_matrix().unwrap().to_vec::<i32>(&g).unwrap();
            assert_eq!(rpm, c.want.handle.rank_prefix_matrix(), "{ctx}: rank_prefix_matrix");

            // Combine the reference's expert outputs with weights and bias.
            let y = upload(&g, &c.y[rank]);
            let rw = upload(&g, &want.recv_topk_weights);
            let (b0, b1) = (upload(&g, &c.bias[0][rank]), upload(&g, &c.bias[1][rank]));
            g.bootstrap().barrier().unwrap();
            let cc = HtCombineCall { x: &y, hidden: h, topk_weights: Some((&rw, k)), bias: [Some(&b0), Some(&b1)] };
            let (combined, _) = buffer.ht_combine(&on, &out.handle, &cc, None).unwrap();
            buffer.synchronize().unwrap_or_else(|e| panic!("{ctx}: combine: {e}"));
            let (cx, cw) = combined.unwrap();
            let got: Vec<u16> = cx.to_vec(&g).unwrap();
            assert!(got[..t * h] == c.combined[rank].combined_x[..], "{ctx}: combined_x");
            let want_w = c.combined[rank].combined_topk_weights.as_ref().unwrap();
            assert_eq!(cw.unwrap().to_vec::<f32>(&g).unwrap()[..t * k], want_w[..], "{ctx}: combined_topk_weights");
            s.synchronize().unwrap();
        }

        // LL: dispatch + combine of the received rows (the identity expert), weighted.
        let lt = ll_idx[rank].len() / lk;
        let (x, idx, w) = (upload(&g, &ll_x[rank]), upload(&g, &ll_idx[rank]), upload(&g, &ll_w[rank]));
        g.bootstrap().barrier().unwrap();
        let dc = LlDispatchCall {
            x: &x,
            num_tokens: lt,
            hidden: ll.hidden,
            topk_idx: &idx,
            index_type: IndexType::I64,
            num_topk: lk,
            max_tokens: lm,
            num_experts: ll.num_experts,
            options: LlDispatchOptions::default(),
            small: None,
            stats: LlStats::default(),
            recv_into: None,
        };
        let (d, _) = buffer.ll_dispatch(&on, dc).unwrap();
        buffer.synchronize().unwrap_or_else(|e| panic!("rank {rank}: LL dispatch: {e}"));
        let views = d.views();
        let routing = Routing::new(n, ll.num_experts, lk, ll_idx.clone()).unwrap();
        let want = reference::ll_dispatch(&routing, &ll_x, ll.hidden, lm).unwrap();
        let count = views.packed_recv_count.to_vec::<i32>(&g).unwrap();
        assert_eq!(count, want.ranks[rank].packed_recv_count, "rank {rank}: LL packed_recv_count");
        let cc = LlCombineCall {
            x: &unsafe_view(&g, &views.packed_recv_x),
            num_tokens: lt,
            topk_idx: &idx,
            index_type: IndexType::I64,
            topk_weights: &w,
            num_topk: lk,
            send_only: false,
            wait_stats: None,
        };
        let (combined, pending, _) = buffer.ll_combine(&on, &d, &cc, None).unwrap();
        buffer.synchronize().unwrap_or_else(|e| panic!("rank {rank}: LL combine: {e}"));
        assert!(pending.is_none());
        let got: Vec<u16> = combined.unwrap().to_vec(&g).unwrap();
        let ys: Vec<Vec<u16>> = (0..n).map(|r| want.ranks[r].packed_recv_x.clone()).collect();
        let want_c = reference::ll_combine(&want.handle, &ys, &ll_w, ll.hidden).unwrap();
        assert!(got[..lt * ll.hidden] == want_c[rank][..], "rank {rank}: LL combined_x");
        s.synchronize().unwrap();
        g.bootstrap().barrier().unwrap();
    });
}

/// A device view of an output (borrowed: the output stays alive in the caller).
fn unsafe_view(g: &Group, o: &moe_ep::Output) -> moe_ep::DeviceBuffer {
    // SAFETY: the caller keeps `o` alive for as long as it uses the view.
    unsafe { moe_ep::DeviceBuffer::borrowed(g.device(), o.ptr(), o.len()) }
}

#[test]
fn stale_handles_and_too_small_memory_are_typed_errors() {
    let n = 2;
    on_ranks(Group::in_process(&devices(n)).unwrap(), |rank, group| {
        // Rings for rows of up to 1024 bf16 (what a dispatch of hidden 1024 lays out after
        // one of hidden 64, which kept room for any top-k), no more.
        let fits = HtConfig {
            num_experts: 4,
            hidden: 1024,
            num_topk: MAX_TOPK,
            num_scales: 1024 / 128,
            num_channels: 0,
            warps_per_peer: 0,
            num_slots: 0,
            heap_bytes: 0,
        };
        let nvl_bytes = HtBuffer::bytes_needed(&group, &fits).unwrap();
        let buffer = Buffer::new(group, BufferConfig { nvl_bytes, heap_bytes: Some(0), rdma_bytes: 0 }).unwrap();
        let g = buffer.group().clone();
        let on = CallStream::default();
        let (e, k) = (4, 2);
        let idx: Vec<i64> = vec![0, 2, 1, 3];
        let topk = upload(&g, &idx);
        let weights = upload(&g, &[1.0f32; 4]);
        let dispatch = |hidden: usize| {
            let x = upload(&g, &vec![rank as u16; 2 * hidden]);
            let lc =
                LayoutCall { topk_idx: &topk, index_type: IndexType::I64, num_tokens: 2, num_topk: k, num_experts: e };
            let (layout, _) = buffer.layout(&on, &lc, None)?;
            let layout = layout.unwrap();
            let layout = moe_ep::layout::DispatchLayout {
                num_tokens_per_rank: unsafe_view(&g, &layout.num_tokens_per_rank),
                num_tokens_per_expert: unsafe_view(&g, &layout.num_tokens_per_expert),
                is_token_in_rank: unsafe_view(&g, &layout.is_token_in_rank),
            };
            let args = HtDispatchArgs {
                x: &x,
                hidden_bytes: 2 * hidden,
                num_tokens: 2,
                x_scales: None,
                topk: Some((&topk, IndexType::I64, &weights, k)),
                layout: &layout,
                expert_alignment: 1,
                num_worst_tokens: None,
            };
            buffer.ht_dispatch(&on, &HtDispatchCall { args, hidden, num_experts: e, num_channels: 0 }).map(|(o, _)| o)
        };
        let small = dispatch(64).unwrap();
        let y = upload(&g, &vec![1u16; small.handle.num_rows * 64]);
        let cc = HtCombineCall { x: &y, hidden: 64, topk_weights: None, bias: [None, None] };
        buffer.ht_combine(&on, &small.handle, &cc, None).unwrap();
        // Larger rows: laid out again (collectively); the older handle is refused.
        let large = dispatch(1024).unwrap();
        match buffer.ht_combine(&on, &small.handle, &cc, None) {
            Err(Error::InvalidArgument { arg, .. }) => assert_eq!(arg, "handle"),
            other => panic!("rank {rank}: a stale handle gave {:?}", other.err()),
        }
        // Too large for the memory: names num_nvl_bytes; the buffer keeps working.
        match dispatch(2048) {
            Err(Error::InvalidArgument { arg, reason }) => {
                assert_eq!(arg, "num_nvl_bytes");
                assert!(reason.contains("pass at least"), "{reason}");
            }
            other => panic!("rank {rank}: too large gave {:?}", other.err()),
        }
        let y = upload(&g, &vec![1u16; large.handle.num_rows * 1024]);
        let cc = HtCombineCall { x: &y, hidden: 1024, topk_weights: None, bias: [None, None] };
        buffer.ht_combine(&on, &large.handle, &cc, None).unwrap();
        // No LL memory was given.
        let x = upload(&g, &[0u16; 2 * 128]);
        let dc = LlDispatchCall {
            x: &x,
            num_tokens: 2,
            hidden: 128,
            topk_idx: &topk,
            index_type: IndexType::I64,
            num_topk: k,
            max_tokens: 2,
            num_experts: e,
            options: LlDispatchOptions::default(),
            small: None,
            stats: LlStats::default(),
            recv_into: None,
        };
        match buffer.ll_dispatch(&on, dc) {
            Err(Error::InvalidArgument { arg, .. }) => assert_eq!(arg, "num_rdma_bytes"),
            other => panic!("rank {rank}: LL without memory gave {:?}", other.err().map(|e| e.to_string())),
        }
        buffer.synchronize().unwrap();
        buffer.destroy().unwrap();
    });
}
