//! The C ABI (`libnccl_ep`, NCCL EP's `nccl_ep.h`) driven the way a C program drives it:
//! groups from moe-ep's bootstrap id, tensor descriptors over device memory, handles,
//! dispatch/combine, bit for bit against the CPU reference; struct versioning and bad input.
#![allow(clippy::undocumented_unsafe_blocks)]
use moe_ep::reference::{self, Routing};
use moe_ep::{Device, DeviceBuffer, Stream};
use moe_ep_tests::{Rng, device, ht, ll};
use nccl_ep::sys::*;
use nccl_ep::*;
use std::ffi::CStr;
use std::ptr::{null, null_mut};

fn last_error() -> String {
    unsafe { CStr::from_ptr(moeEpGetLastError()) }.to_string_lossy().into_owned()
}

#[track_caller]
fn ok(r: ncclResult_t) {
    assert_eq!(r, ncclSuccess, "{}", last_error());
}

/// Device memory with its descriptor (the sizes live in `dims`, which the descriptor points to).
struct Tensor {
    desc: ncclEpTensor_t,
    _dims: Box<[usize]>,
    buf: DeviceBuffer,
}

impl Tensor {
    fn new<T: bytemuck::Pod>(dev: &Device, dtype: ncclDataType_t, dims: &[usize], data: &[T]) -> Tensor {
        let buf = on_rank_stream(dev, |s| {
            // Stream-ordered: cuMemFree may wait for the whole GPU, peers' spinning kernels too.
            let buf = s.alloc_uninit(std::mem::size_of_val(data).max(16)).unwrap();
            buf.write(s, 0, data).unwrap();
            s.synchronize().unwrap();
            buf
        });
        let mut dims: Box<[usize]> = dims.into();
        let mut desc = NCCL_EP_TENSOR_INIT;
        (desc.ndim, desc.datatype, desc.data, desc.sizes) =
            (dims.len() as u32, dtype, buf.ptr() as *mut _, dims.as_mut_ptr());
        Tensor { desc, _dims: dims, buf }
    }

    /// Filled with `byte` (a poison the op must overwrite).
    fn filled(dev: &Device, dtype: ncclDataType_t, dims: &[usize], byte: u8) -> Tensor {
        let n: usize = dims.iter().product::<usize>() * tensor::element_bytes(dtype).unwrap();
        Tensor::new(dev, dtype, dims, &vec![byte; n])
    }

    fn read<T: bytemuck::Pod + Default>(&self, dev: &Device) -> Vec<T> {
        on_rank_stream(dev, |s| self.buf.to_vec(s).unwrap())
    }

    fn ptr(&mut self) -> *mut ncclEpTensor_t {
        &mut self.desc
    }
}

thread_local! {
    static RANK_STREAM: std::cell::OnceCell<Stream> = const { std::cell::OnceCell::new() };
}

/// Runs `f` on this thread's stream, made at first use. Ranks are threads of one process
/// here, so each needs a stream of its own: on the shared NULL (legacy) stream one rank's
/// copy would queue behind another rank's op, whose kernel waits for this rank, until the
/// device-side timeout.
fn on_rank_stream<R>(dev: &Device, f: impl FnOnce(&Stream) -> R) -> R {
    RANK_STREAM.with(|s| f(s.get_or_init(|| dev.new_stream().unwrap())))
}

/// The `cudaStream_t` this rank's C calls pass (NULL on the CPU emulator).
fn cs() -> cudaStream_t {
    on_rank_stream(&device(), |s| s.raw() as cudaStream_t)
}

/// A config shared by the rank threads (its allocator pointers are NULL).
#[derive(Clone, Copy)]
struct Config(ncclEpGroupConfig_t);
unsafe impl Send for Config {}
unsafe impl Sync for Config {}

impl Config {
    /// (A method, so closures capture the whole `Config`, which is `Sync`.)
    fn get(&self) -> *const ncclEpGroupConfig_t {
        &self.0
    }
}

/// Runs `f(rank, group)` on `n` threads, each rank's group made through moeEpCreateGroup.
fn on_groups(n: usize, cfg: ncclEpGroupConfig_t, f: impl Fn(usize, ncclEpGroup_t) + Sync) {
    let mut id = moeEpUniqueId::zeroed();
    ok(unsafe { moeEpGetUniqueId(&mut id) });
    let (f, id, cfg) = (&f, &id, Config(cfg));
    std::thread::scope(|s| {
        let ranks: Vec<_> = (0..n)
            .map(|r| {
                s.spawn(move || {
                    let mut g = null_mut();
                    ok(unsafe { moeEpCreateGroup(&mut g, id, r as i32, n as i32, -1, cfg.get()) });
                    f(r, g);
                    ok(unsafe { ncclEpGroupDestroy(g) });
                })
            })
            .collect();
        for h in ranks {
            h.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
        }
    });
}

fn ht_config(num_experts: usize, hidden: usize, max_tokens: usize, max_recv: usize) -> ncclEpGroupConfig_t {
    let mut c = NCCL_EP_GROUP_CONFIG_INIT;
    c.algorithm = NCCL_EP_ALGO_HIGH_THROUGHPUT;
    c.num_experts = num_experts as u32;
    c.max_dispatch_tokens_per_rank = max_tokens as u32;
    c.max_recv_tokens_per_rank = max_recv as u32;
    c.max_token_bytes = 2 * hidden as u32;
    c
}

/// HT FLAT, forward and backward, over two routings of one handle (caller-owned handle
/// memory, counters at update time) and a second handle made by ncclEpCreateHandle:
/// recv rows, top-k ids and weights, counts, combine and the backward passes bit for bit.
#[test]
fn ht_flat_forward_and_backward_match_the_reference() {
    let dev = device();
    let (n, e, h, k, m) = (4, 16, 64, 4, 12);
    let case = ht::Case { calls: 2, num_worst_tokens: None, ..ht::Case::new(e, h, k, m) };
    let calls = ht::prepare(&case, n, &mut Rng::fresh("c_abi-ht"));
    let rows = n * m; // static outputs: the worst case
    on_groups(n, ht_config(e, h, m, rows), |rank, g| unsafe {
        let mut size = 0usize;
        ok(ncclEpHandleMemSize(g, NCCL_EP_LAYOUT_FLAT, null(), &mut size, k as i32));
        let mut mem = Tensor::filled(&dev, ncclUint8, &[size], 0xa5);
        let mut handle = null_mut();
        ok(ncclEpInitHandle(&mut handle, g, NCCL_EP_LAYOUT_FLAT, null(), k as i32, mem.ptr()));
        for (i, c) in calls.iter().enumerate() {
            let t = c.tokens[rank];
            let want = &c.want.ranks[rank];
            let got_rows = want.num_recv_tokens;
            let mut idx = Tensor::new(&dev, ncclInt64, &[t, k], &c.idx[rank]);
            let mut counters = Tensor::filled(&dev, ncclInt32, &[e / n], 0xff);
            let mut total = Tensor::filled(&dev, ncclInt64, &[1], 0xff);
            let mut info = NCCL_EP_LAYOUT_INFO_INIT;
            (info.expert_counters, info.recv_total_counter) = (counters.ptr(), total.ptr());
            // The second routing asks for global expert ids.
            let global = i == 1;
            if global {
                info.recv_topk_idx_kind = NCCL_EP_EXPERT_ID_GLOBAL;
            }
            let h_ = if i == 0 {
                ok(ncclEpUpdateHandle(handle, idx.ptr(), &info, cs()));
                handle
            } else {
                let mut other = null_mut();
                ok(ncclEpCreateHandle(&mut other, g, NCCL_EP_LAYOUT_FLAT, idx.ptr(), &info, null(), cs()));
                other
            };
            assert_eq!(
                counters.read::<i32>(&dev)[..e / n],
                want.num_recv_tokens_per_expert[..],
                "rank {rank}: counters"
            );
            assert_eq!(total.read::<i64>(&dev)[0], got_rows as i64, "rank {rank}: recv total");

            let (mut x, mut w) = (
                Tensor::new(&dev, ncclBfloat16, &[t, h], &c.x[rank]),
                Tensor::new(&dev, ncclFloat32, &[t, k], &c.w[rank]),
            );
            let mut recv = Tensor::filled(&dev, ncclBfloat16, &[rows, h], 0xee);
            let mut recv_w = Tensor::filled(&dev, ncclFloat32, &[rows, k], 0xee);
            let mut recv_idx = Tensor::filled(&dev, ncclInt64, &[rows, k], 0xee);
            let mut din = NCCL_EP_DISPATCH_INPUTS_INIT;
            (din.tokens, din.topk_weights) = (x.ptr(), w.ptr());
            let mut dout = NCCL_EP_DISPATCH_OUTPUTS_INIT;
            (dout.tokens, dout.topk_weights, dout.topk_idx) = (recv.ptr(), recv_w.ptr(), recv_idx.ptr());
            ok(ncclEpDispatch(h_, &din, &dout, null(), null(), cs()));
            ok(ncclEpComplete(h_, null(), cs())); // nothing pending: a no-op
            let ctx = format!("rank {rank}, routing {i}");
            assert!(recv.read::<u16>(&dev)[..got_rows * h] == want.recv_x[..], "{ctx}: recv rows");
            let lo = if global { (rank * (e / n)) as i64 } else { 0 };
            let want_ids: Vec<i64> = want.recv_topk_idx.iter().map(|&v| if v >= 0 { v + lo } else { v }).collect();
            assert_eq!(recv_idx.read::<i64>(&dev)[..got_rows * k], want_ids[..], "{ctx}: recv top-k ids");
            assert_eq!(recv_w.read::<f32>(&dev)[..got_rows * k], want.recv_topk_weights[..], "{ctx}: recv weights");

            // Forward combine of the expert outputs (their rows in `recv`'s place).
            let mut y_rows = c.y[rank].clone();
            y_rows.resize(rows * h, 0);
            let mut y = Tensor::new(&dev, ncclBfloat16, &[rows, h], &y_rows);
            let mut out = Tensor::filled(&dev, ncclBfloat16, &[t, h], 0xee);
            let mut cin = NCCL_EP_COMBINE_INPUTS_INIT;
            cin.tokens = y.ptr();
            let mut cout = NCCL_EP_COMBINE_OUTPUTS_INIT;
            cout.tokens = out.ptr();
            ok(ncclEpCombine(h_, &cin, &cout, null(), cs()));
            let want_y = reference::ht_combine(&c.want.handle, &c.y, None, [None, None], h).unwrap();
            assert!(out.read::<u16>(&dev)[..t * h] == want_y[rank].combined_x[..], "{ctx}: combined");

            // Backward: combine's backward is a dispatch of the gradients along the same
            // routes; dispatch's backward a combine that also sums the weight gradients.
            let mut grad = Tensor::new(&dev, ncclBfloat16, &[t, h], &c.bias[0][rank]);
            let mut grad_recv = Tensor::filled(&dev, ncclBfloat16, &[rows, h], 0xee);
            let (mut bin, mut bout) = (NCCL_EP_DISPATCH_INPUTS_INIT, NCCL_EP_DISPATCH_OUTPUTS_INIT);
            (bin.tokens, bout.tokens) = (grad.ptr(), grad_recv.ptr());
            let mut bwd = NCCL_EP_DISPATCH_CONFIG_INIT;
            bwd.pass_direction = NCCL_EP_BWD_PASS;
            ok(ncclEpDispatch(h_, &bin, &bout, null(), &bwd, cs()));
            let want_g =
                reference::ht_dispatch(&Routing::new(n, e, k, c.idx.clone()).unwrap(), &c.bias[0], &c.w, h, 1, None)
                    .unwrap();
            assert!(
                grad_recv.read::<u16>(&dev)[..got_rows * h] == want_g.ranks[rank].recv_x[..],
                "{ctx}: backward dispatch"
            );

            let wg: Vec<f32> = (0..got_rows * k).map(|j| j as f32 * 0.25 - 3.0).collect();
            let mut wg_rows = wg.clone();
            wg_rows.resize(rows * k, 0.0);
            let mut w_grad = Tensor::new(&dev, ncclFloat32, &[rows, k], &wg_rows);
            let mut w_out = Tensor::filled(&dev, ncclFloat32, &[t, k], 0xee);
            let mut out2 = Tensor::filled(&dev, ncclBfloat16, &[t, h], 0xee);
            let (mut cin2, mut cout2) = (NCCL_EP_COMBINE_INPUTS_INIT, NCCL_EP_COMBINE_OUTPUTS_INIT);
            (cin2.tokens, cin2.topk_weights, cout2.tokens, cout2.topk_weights) =
                (y.ptr(), w_grad.ptr(), out2.ptr(), w_out.ptr());
            let mut cbwd = NCCL_EP_COMBINE_CONFIG_INIT;
            cbwd.pass_direction = NCCL_EP_BWD_PASS;
            ok(ncclEpCombine(h_, &cin2, &cout2, &cbwd, cs()));
            // Every rank's weight gradients, as the reference takes them.
            let all_wg: Vec<Vec<f32>> = (0..n)
                .map(|r| (0..c.want.ranks[r].num_recv_tokens * k).map(|j| j as f32 * 0.25 - 3.0).collect())
                .collect();
            let want_w = reference::ht_combine(&c.want.handle, &c.y, Some(&all_wg), [None, None], h).unwrap();
            assert!(out2.read::<u16>(&dev)[..t * h] == want_w[rank].combined_x[..], "{ctx}: backward combine rows");
            assert_eq!(
                w_out.read::<f32>(&dev)[..t * k],
                want_w[rank].combined_topk_weights.as_ref().unwrap()[..],
                "{ctx}: backward combine weights"
            );
            if h_ != handle {
                ok(ncclEpHandleDestroy(h_));
            }
        }
        ok(ncclEpHandleDestroy(handle));
    });
}

/// HT FLAT and EXPERT_MAJOR under the overflow policy DROP (NCCL EP's `test_ht_overflow_drop`
/// recipe, with random routes besides the skew to expert 0): each rank keeps the first
/// `max_recv_tokens_per_rank` rows, `recv_total_counter` reports the rows (expert-major:
/// slots) before the drop, the kept rows, counters and the combine (dropped copies left
/// out) match the reference of the dropped routing bit for bit; expert-major zones are cut
/// at the budget too; outputs with fewer rows than the budget are refused.
#[test]
fn ht_overflow_drop_matches_the_reference() {
    let dev = device();
    let (n, e, h, k, m) = (4, 16, 32, 3, 10);
    let budget = m; // the smallest the group takes, far below what arrives
    let mut rng = Rng::fresh("c_abi-drop");
    // m tokens per rank (the last rank m - 3), k distinct experts each, -1 now and then;
    // every other token also goes to expert 0, so rank 0 overflows deeply.
    let tokens: Vec<usize> = (0..n).map(|r| if r == n - 1 { m - 3 } else { m }).collect();
    let idx: Vec<Vec<i64>> = tokens
        .iter()
        .map(|&t| {
            let mut v = Vec::new();
            for token in 0..t {
                let mut row: Vec<i64> = if token % 2 == 0 { vec![0] } else { Vec::new() };
                while row.len() < k {
                    let x = rng.below(e as u64) as i64;
                    if !row.contains(&x) {
                        row.push(x);
                    }
                }
                if rng.below(6) == 0 {
                    row[k - 1] = -1;
                }
                v.extend(row);
            }
            v
        })
        .collect();
    let (kept, routed) = Routing::new(n, e, k, idx.clone()).unwrap().drop_overflow(budget);
    assert!(routed[0] > budget + m, "the routing must overflow rank 0: {routed:?}");
    let x: Vec<Vec<u16>> = tokens.iter().map(|&t| rng.bf16(t * h, 8.0)).collect();
    let w: Vec<Vec<f32>> = tokens.iter().map(|&t| (0..t * k).map(|i| i as f32 * 0.5 + 1.0).collect()).collect();
    let want = reference::ht_dispatch(&kept, &x, &w, h, 1, Some(budget)).unwrap();
    let y: Vec<Vec<u16>> = (0..n).map(|_| rng.bf16(budget * h, 8.0)).collect();
    let want_y = reference::ht_combine(&want.handle, &y, None, [None, None], h).unwrap();
    // Expert-major, zones aligned to 2: along the same dropped routing, cut at the budget.
    let (align, l) = (2usize, e / n);
    let want_em = reference::ht_dispatch(&kept, &x, &w, h, align, Some(budget)).unwrap();
    let ems: Vec<_> =
        want_em.ranks.iter().map(|r| reference::ht_expert_major_dropping(r, k, h, budget).unwrap()).collect();
    let uncut = reference::ht_dispatch(&Routing::new(n, e, k, idx.clone()).unwrap(), &x, &w, h, align, None).unwrap();
    let slots_kept: i32 = want_em.ranks[0].num_recv_tokens_per_expert.iter().sum();
    assert!(slots_kept > budget as i32, "rank 0's zones must need more than the budget: {slots_kept}");
    let flats: Vec<Vec<u16>> = (0..n)
        .map(|r| {
            let mut v = reference::ht_expert_major_reduce(&ems[r], &y[r], None, k, h).0;
            v.resize(budget * h, 0);
            v
        })
        .collect();
    let want_em_out = reference::ht_combine(&want_em.handle, &flats, None, [None, None], h).unwrap();
    let mut cfg = ht_config(e, h, m, budget);
    cfg.overflow_policy = NCCL_EP_OVERFLOW_DROP;
    on_groups(n, cfg, |rank, g| unsafe {
        let (t, want_r) = (tokens[rank], &want.ranks[rank]);
        let mut handle = null_mut();
        ok(ncclEpInitHandle(&mut handle, g, NCCL_EP_LAYOUT_FLAT, null(), k as i32, null()));
        let mut topk = Tensor::new(&dev, ncclInt64, &[t, k], &idx[rank]);
        let mut counters = Tensor::filled(&dev, ncclInt32, &[e / n], 0xff);
        let mut total = Tensor::filled(&dev, ncclInt32, &[1], 0xff);
        let mut info = NCCL_EP_LAYOUT_INFO_INIT;
        (info.expert_counters, info.recv_total_counter) = (counters.ptr(), total.ptr());
        ok(ncclEpUpdateHandle(handle, topk.ptr(), &info, cs()));
        assert_eq!(total.read::<i32>(&dev)[0] as usize, routed[rank], "rank {rank}: rows before the drop");
        assert_eq!(counters.read::<i32>(&dev)[..e / n], want_r.num_recv_tokens_per_expert[..], "rank {rank}: kept");

        let (mut xs, mut ws) =
            (Tensor::new(&dev, ncclBfloat16, &[t, h], &x[rank]), Tensor::new(&dev, ncclFloat32, &[t, k], &w[rank]));
        let mut din = NCCL_EP_DISPATCH_INPUTS_INIT;
        (din.tokens, din.topk_weights) = (xs.ptr(), ws.ptr());
        // Fewer output rows than the budget: refused before anything runs.
        let mut short = Tensor::filled(&dev, ncclBfloat16, &[budget - 1, h], 0);
        let mut short_w = Tensor::filled(&dev, ncclFloat32, &[budget - 1, k], 0);
        let mut short_idx = Tensor::filled(&dev, ncclInt64, &[budget - 1, k], 0);
        let mut dout = NCCL_EP_DISPATCH_OUTPUTS_INIT;
        (dout.tokens, dout.topk_weights, dout.topk_idx) = (short.ptr(), short_w.ptr(), short_idx.ptr());
        assert_eq!(ncclEpDispatch(handle, &din, &dout, null(), null(), cs()), ncclInvalidArgument);
        assert!(last_error().contains("max_recv_tokens_per_rank"), "{}", last_error());

        let mut recv = Tensor::filled(&dev, ncclBfloat16, &[budget, h], 0xee);
        let mut recv_w = Tensor::filled(&dev, ncclFloat32, &[budget, k], 0xee);
        let mut recv_idx = Tensor::filled(&dev, ncclInt64, &[budget, k], 0xee);
        (dout.tokens, dout.topk_weights, dout.topk_idx) = (recv.ptr(), recv_w.ptr(), recv_idx.ptr());
        ok(ncclEpDispatch(handle, &din, &dout, null(), null(), cs()));
        let got = want_r.num_recv_tokens;
        assert_eq!(got, routed[rank].min(budget), "rank {rank}: the reference keeps the budget");
        assert!(recv.read::<u16>(&dev)[..got * h] == want_r.recv_x[..got * h], "rank {rank}: kept rows");
        assert_eq!(recv_idx.read::<i64>(&dev)[..got * k], want_r.recv_topk_idx[..got * k], "rank {rank}: ids");
        assert_eq!(recv_w.read::<f32>(&dev)[..got * k], want_r.recv_topk_weights[..got * k], "rank {rank}: weights");

        let mut ys = Tensor::new(&dev, ncclBfloat16, &[budget, h], &y[rank]);
        let mut out = Tensor::filled(&dev, ncclBfloat16, &[t, h], 0xee);
        let (mut cin, mut cout) = (NCCL_EP_COMBINE_INPUTS_INIT, NCCL_EP_COMBINE_OUTPUTS_INIT);
        (cin.tokens, cout.tokens) = (ys.ptr(), out.ptr());
        ok(ncclEpCombine(handle, &cin, &cout, null(), cs()));
        assert!(out.read::<u16>(&dev)[..t * h] == want_y[rank].combined_x[..], "rank {rank}: combined");
        ok(ncclEpHandleDestroy(handle));

        let mut hcfg = NCCL_EP_HANDLE_CONFIG_INIT;
        hcfg.dispatch_output_per_expert_alignment = align;
        let mut em_handle = null_mut();
        ok(ncclEpInitHandle(&mut em_handle, g, NCCL_EP_LAYOUT_EXPERT_MAJOR, &hcfg, k as i32, null()));
        let em = &ems[rank];
        let mut offsets = Tensor::filled(&dev, ncclInt32, &[l], 0xff);
        (info.expert_counters, info.expert_offsets, info.recv_total_counter) =
            (counters.ptr(), offsets.ptr(), total.ptr());
        ok(ncclEpUpdateHandle(em_handle, topk.ptr(), &info, cs()));
        let want_total: i32 = uncut.ranks[rank].num_recv_tokens_per_expert.iter().sum();
        assert_eq!(total.read::<i32>(&dev)[0], want_total, "rank {rank}: slots before the drop");
        assert_eq!(counters.read::<i32>(&dev)[..l], em.counts[..], "rank {rank}: cut zone sizes");
        assert_eq!(offsets.read::<i32>(&dev)[..l], em.offsets[..], "rank {rank}: cut zone starts");
        let mut zones = Tensor::filled(&dev, ncclBfloat16, &[budget, h], 0xee);
        let mut zone_w = Tensor::filled(&dev, ncclFloat32, &[budget], 0xee);
        let mut dout = NCCL_EP_DISPATCH_OUTPUTS_INIT;
        (dout.tokens, dout.topk_weights) = (zones.ptr(), zone_w.ptr());
        ok(ncclEpDispatch(em_handle, &din, &dout, null(), null(), cs()));
        assert!(zones.read::<u16>(&dev) == em.x, "rank {rank}: cut zones");
        assert_eq!(zone_w.read::<f32>(&dev), em.weights, "rank {rank}: cut slot weights");
        let mut out = Tensor::filled(&dev, ncclBfloat16, &[t, h], 0xee);
        (cin.tokens, cout.tokens) = (ys.ptr(), out.ptr());
        ok(ncclEpCombine(em_handle, &cin, &cout, null(), cs()));
        assert!(out.read::<u16>(&dev)[..t * h] == want_em_out[rank].combined_x[..], "rank {rank}: combined, EM");
        ok(ncclEpHandleDestroy(em_handle));
    });
}

/// HT QUANT_FWD: e4m3 rows (bytes) with their f32 scales, FLAT and EXPERT_MAJOR (aligned
/// zones; the scales rows land in the same slots), forward and the expert-major backward
/// dispatch, bit for bit against the reference dispatch of the rows and of the scales.
#[test]
fn ht_quant_fwd_flat_and_expert_major_match_the_reference() {
    let dev = device();
    let (n, e, h, k, m, align) = (4, 16, 512, 3, 8, 2usize);
    let sc = h / 128;
    let mut rng = Rng::fresh("c_abi-quant-fwd");
    let case = ht::Case::new(e, h, k, m);
    let idx = ht::routing(&mut rng, n, &case, 1);
    let tokens: Vec<usize> = idx.iter().map(|v| v.len() / k).collect();
    let x: Vec<Vec<u8>> =
        tokens.iter().map(|&t| rng.words(t * h / 4).iter().flat_map(|w| w.to_le_bytes()).collect()).collect();
    let scales: Vec<Vec<f32>> = tokens.iter().map(|&t| (0..t * sc).map(|i| i as f32 * 0.5 + 0.25).collect()).collect();
    let w: Vec<Vec<f32>> = tokens.iter().map(|&t| (0..t * k).map(|i| i as f32 + 1.0).collect()).collect();
    let routing = Routing::new(n, e, k, idx.clone()).unwrap();
    let rows = n * m;
    let slots = rows * 2 + e * align;
    let flat_x = reference::ht_dispatch(&routing, &x, &w, h, 1, Some(rows)).unwrap();
    let flat_s = reference::ht_dispatch(&routing, &scales, &w, sc, 1, Some(rows)).unwrap();
    let em_x = reference::ht_dispatch(&routing, &x, &w, h, align, Some(slots)).unwrap();
    let em_s = reference::ht_dispatch(&routing, &scales, &w, sc, align, Some(slots)).unwrap();
    on_groups(n, ht_config(e, h, m, slots), |rank, g| unsafe {
        let (t, ctx) = (tokens[rank], format!("rank {rank}"));
        let mut topk = Tensor::new(&dev, ncclInt64, &[t, k], &idx[rank]);
        let mut xs = Tensor::new(&dev, ncclFloat8e4m3, &[t, h], &x[rank]);
        let mut ss = Tensor::new(&dev, ncclFloat32, &[t, sc], &scales[rank]);
        let mut ws = Tensor::new(&dev, ncclFloat32, &[t, k], &w[rank]);
        let mut din = NCCL_EP_DISPATCH_INPUTS_INIT;
        (din.tokens, din.scales, din.topk_weights) = (xs.ptr(), ss.ptr(), ws.ptr());

        // FLAT.
        let mut flat = null_mut();
        ok(ncclEpCreateHandle(&mut flat, g, NCCL_EP_LAYOUT_FLAT, topk.ptr(), null(), null(), cs()));
        let mut recv = Tensor::filled(&dev, ncclFloat8e4m3, &[slots, h], 0xee);
        let mut recv_s = Tensor::filled(&dev, ncclFloat32, &[slots, sc], 0xee);
        let mut recv_w = Tensor::filled(&dev, ncclFloat32, &[slots, k], 0xee);
        let mut recv_i = Tensor::filled(&dev, ncclInt64, &[slots, k], 0xee);
        let mut dout = NCCL_EP_DISPATCH_OUTPUTS_INIT;
        (dout.tokens, dout.scales, dout.topk_weights, dout.topk_idx) =
            (recv.ptr(), recv_s.ptr(), recv_w.ptr(), recv_i.ptr());
        let mut quant = NCCL_EP_DISPATCH_CONFIG_INIT;
        quant.quant_recipe = NCCL_EP_DISP_QUANT_FWD;
        ok(ncclEpDispatch(flat, &din, &dout, null(), &quant, cs()));
        let got = flat_x.ranks[rank].num_recv_tokens;
        assert!(recv.read::<u8>(&dev)[..got * h] == flat_x.ranks[rank].recv_x[..got * h], "{ctx}: FLAT fp8 rows");
        assert_eq!(recv_s.read::<f32>(&dev)[..got * sc], flat_s.ranks[rank].recv_x[..got * sc], "{ctx}: FLAT scales");
        ok(ncclEpHandleDestroy(flat));

        // EXPERT_MAJOR, forward then backward (the same tensors along the cached routes).
        let mut hcfg = NCCL_EP_HANDLE_CONFIG_INIT;
        hcfg.dispatch_output_per_expert_alignment = align;
        let mut em = null_mut();
        ok(ncclEpCreateHandle(&mut em, g, NCCL_EP_LAYOUT_EXPERT_MAJOR, topk.ptr(), null(), &hcfg, cs()));
        let want_x = reference::ht_expert_major(&em_x.ranks[rank], k, h, slots).unwrap();
        let want_s = reference::ht_expert_major(&em_s.ranks[rank], k, sc, slots).unwrap();
        let used: usize = want_x.counts.iter().map(|&c| c as usize).sum();
        let mut zone_w = Tensor::filled(&dev, ncclFloat32, &[slots], 0xee);
        for pass in ["forward", "backward"] {
            let mut zones = Tensor::filled(&dev, ncclFloat8e4m3, &[slots, h], 0xee);
            let mut zone_s = Tensor::filled(&dev, ncclFloat32, &[slots, sc], 0xee);
            let mut dout = NCCL_EP_DISPATCH_OUTPUTS_INIT;
            (dout.tokens, dout.scales) = (zones.ptr(), zone_s.ptr());
            let mut cfg = quant;
            let mut bin = din;
            if pass == "forward" {
                dout.topk_weights = zone_w.ptr();
            } else {
                cfg.pass_direction = NCCL_EP_BWD_PASS;
                bin.topk_weights = null_mut();
            }
            ok(ncclEpDispatch(em, &bin, &dout, null(), &cfg, cs()));
            assert!(zones.read::<u8>(&dev)[..used * h] == want_x.x[..used * h], "{ctx}: {pass} fp8 zones");
            assert_eq!(zone_s.read::<f32>(&dev)[..used * sc], want_s.x[..used * sc], "{ctx}: {pass} scale zones");
        }
        ok(ncclEpHandleDestroy(em));
    });
}

/// HT EXPERT_MAJOR with a zone alignment: zone sizes (i64), starts (i32) and total at update
/// time, the zones and slot weights, the forward combine of fresh per-slot outputs and both
/// backward passes, bit for bit against the reference (zones over FLAT rows).
#[test]
fn ht_expert_major_forward_and_backward_match_the_reference() {
    let dev = device();
    let (n, e, h, k, m, align) = (4, 16, 64, 4, 10, 4usize);
    let case = ht::Case { calls: 2, num_worst_tokens: None, ..ht::Case::new(e, h, k, m) };
    let calls = ht::prepare(&case, n, &mut Rng::fresh("c_abi-ht-em"));
    let slots = n * m * 2 + e * align;
    let l = e / n;
    on_groups(n, ht_config(e, h, m, slots), |rank, g| unsafe {
        let mut hcfg = NCCL_EP_HANDLE_CONFIG_INIT;
        hcfg.dispatch_output_per_expert_alignment = align;
        let mut handle = null_mut();
        ok(ncclEpInitHandle(&mut handle, g, NCCL_EP_LAYOUT_EXPERT_MAJOR, &hcfg, k as i32, null()));
        for (i, c) in calls.iter().enumerate() {
            let (t, ctx) = (c.tokens[rank], format!("rank {rank}, routing {i}"));
            let routing = Routing::new(n, e, k, c.idx.clone()).unwrap();
            let want = reference::ht_dispatch(&routing, &c.x, &c.w, h, align, Some(slots)).unwrap();
            let ems: Vec<_> = want.ranks.iter().map(|r| reference::ht_expert_major(r, k, h, slots).unwrap()).collect();
            let em = &ems[rank];
            let used: usize = em.counts.iter().map(|&c| c as usize).sum();

            let mut idx = Tensor::new(&dev, ncclInt64, &[t, k], &c.idx[rank]);
            let mut counts = Tensor::filled(&dev, ncclInt64, &[l], 0xff);
            let mut offsets = Tensor::filled(&dev, ncclInt32, &[l], 0xff);
            let mut total = Tensor::filled(&dev, ncclInt32, &[1], 0xff);
            let mut info = NCCL_EP_LAYOUT_INFO_INIT;
            (info.expert_counters, info.expert_offsets, info.recv_total_counter) =
                (counts.ptr(), offsets.ptr(), total.ptr());
            ok(ncclEpUpdateHandle(handle, idx.ptr(), &info, cs()));
            let want_counts: Vec<i64> = em.counts.iter().map(|&c| c as i64).collect();
            assert_eq!(counts.read::<i64>(&dev)[..l], want_counts[..], "{ctx}: zone sizes");
            assert_eq!(offsets.read::<i32>(&dev)[..l], em.offsets[..], "{ctx}: zone starts");
            assert_eq!(total.read::<i32>(&dev)[0], used as i32, "{ctx}: slots in all");

            let (mut x, mut w) = (
                Tensor::new(&dev, ncclBfloat16, &[t, h], &c.x[rank]),
                Tensor::new(&dev, ncclFloat32, &[t, k], &c.w[rank]),
            );
            let mut zones = Tensor::filled(&dev, ncclBfloat16, &[slots, h], 0xee);
            let mut zone_w = Tensor::filled(&dev, ncclFloat32, &[slots], 0xee);
            let (mut din, mut dout) = (NCCL_EP_DISPATCH_INPUTS_INIT, NCCL_EP_DISPATCH_OUTPUTS_INIT);
            (din.tokens, din.topk_weights, dout.tokens, dout.topk_weights) =
                (x.ptr(), w.ptr(), zones.ptr(), zone_w.ptr());
            ok(ncclEpDispatch(handle, &din, &dout, null(), null(), cs()));
            assert!(zones.read::<u16>(&dev)[..used * h] == em.x[..used * h], "{ctx}: zones (rows and zero padding)");
            assert_eq!(zone_w.read::<f32>(&dev)[..used], em.weights[..used], "{ctx}: slot weights");

            // Forward combine of fresh per-slot outputs: zones -> flat rows -> home.
            let pad = |mut v: Vec<u16>, rows: usize| {
                v.resize(rows * h, 0);
                v
            };
            let ys: Vec<Vec<u16>> = (0..n).map(|r| pad(c.y[r].clone(), slots)).collect();
            let flats: Vec<Vec<u16>> =
                (0..n).map(|r| pad(reference::ht_expert_major_reduce(&ems[r], &ys[r], None, k, h).0, slots)).collect();
            let want_out = reference::ht_combine(&want.handle, &flats, None, [None, None], h).unwrap();
            let mut y = Tensor::new(&dev, ncclBfloat16, &[slots, h], &ys[rank]);
            let mut out = Tensor::filled(&dev, ncclBfloat16, &[t, h], 0xee);
            let (mut cin, mut cout) = (NCCL_EP_COMBINE_INPUTS_INIT, NCCL_EP_COMBINE_OUTPUTS_INIT);
            (cin.tokens, cout.tokens) = (y.ptr(), out.ptr());
            ok(ncclEpCombine(handle, &cin, &cout, null(), cs()));
            assert!(out.read::<u16>(&dev)[..t * h] == want_out[rank].combined_x[..], "{ctx}: combined");

            // Backward dispatch: gradients along the routes into the same zones.
            let want_g = reference::ht_dispatch(&routing, &c.bias[0], &c.w, h, align, Some(slots)).unwrap();
            let em_g = reference::ht_expert_major(&want_g.ranks[rank], k, h, slots).unwrap();
            let mut grad = Tensor::new(&dev, ncclBfloat16, &[t, h], &c.bias[0][rank]);
            let mut grad_zones = Tensor::filled(&dev, ncclBfloat16, &[slots, h], 0xee);
            let (mut bin, mut bout) = (NCCL_EP_DISPATCH_INPUTS_INIT, NCCL_EP_DISPATCH_OUTPUTS_INIT);
            (bin.tokens, bout.tokens) = (grad.ptr(), grad_zones.ptr());
            let mut bwd = NCCL_EP_DISPATCH_CONFIG_INIT;
            bwd.pass_direction = NCCL_EP_BWD_PASS;
            ok(ncclEpDispatch(handle, &bin, &bout, null(), &bwd, cs()));
            assert!(grad_zones.read::<u16>(&dev)[..used * h] == em_g.x[..used * h], "{ctx}: backward dispatch");

            // Backward combine: per-slot weight gradients come home as [T, K].
            let wgs: Vec<Vec<f32>> = (0..n).map(|_| (0..slots).map(|j| j as f32 * 0.125 - 1.0).collect()).collect();
            let (flat_ws, flat_ys): (Vec<Vec<f32>>, Vec<Vec<u16>>) = (0..n)
                .map(|r| {
                    let (fx, fw) = reference::ht_expert_major_reduce(&ems[r], &ys[r], Some(&wgs[r]), k, h);
                    let mut fw = fw.unwrap();
                    fw.resize(slots * k, 0.0);
                    (fw, pad(fx, slots))
                })
                .unzip();
            let want_b = reference::ht_combine(&want.handle, &flat_ys, Some(&flat_ws), [None, None], h).unwrap();
            let mut wg = Tensor::new(&dev, ncclFloat32, &[slots], &wgs[rank]);
            let (mut out2, mut w_out) =
                (Tensor::filled(&dev, ncclBfloat16, &[t, h], 0xee), Tensor::filled(&dev, ncclFloat32, &[t, k], 0xee));
            let (mut cin2, mut cout2) = (NCCL_EP_COMBINE_INPUTS_INIT, NCCL_EP_COMBINE_OUTPUTS_INIT);
            (cin2.tokens, cin2.topk_weights, cout2.tokens, cout2.topk_weights) =
                (y.ptr(), wg.ptr(), out2.ptr(), w_out.ptr());
            let mut cbwd = NCCL_EP_COMBINE_CONFIG_INIT;
            cbwd.pass_direction = NCCL_EP_BWD_PASS;
            ok(ncclEpCombine(handle, &cin2, &cout2, &cbwd, cs()));
            assert!(out2.read::<u16>(&dev)[..t * h] == want_b[rank].combined_x[..], "{ctx}: backward combine rows");
            assert_eq!(
                w_out.read::<f32>(&dev)[..t * k],
                want_b[rank].combined_topk_weights.as_ref().unwrap()[..],
                "{ctx}: backward combine weights"
            );
        }
        ok(ncclEpHandleDestroy(handle));
    });
}

fn ll_config(num_experts: usize, hidden: usize, max_tokens: usize) -> ncclEpGroupConfig_t {
    let mut c = NCCL_EP_GROUP_CONFIG_INIT;
    c.algorithm = NCCL_EP_ALGO_LOW_LATENCY;
    c.num_experts = num_experts as u32;
    c.max_dispatch_tokens_per_rank = max_tokens as u32;
    c.max_token_bytes = 2 * hidden as u32;
    c
}

/// LL expert-major: per-expert counts and rows (arrival order within an expert is free),
/// and the weighted combine bit for bit; every other call split by send_only +
/// ncclEpComplete.
#[test]
fn ll_expert_major_with_send_only_matches_the_reference() {
    let dev = device();
    let (n, e, h, k, m) = (4, 8, 64, 3, 6);
    let case = ll::Case { num_experts: e, hidden: h, num_topk: k, max_tokens: m, calls: 3, hooks: true };
    let calls = ll::prepare(&case, n, &mut Rng::fresh("c_abi-ll"));
    let l = e / n;
    on_groups(n, ll_config(e, h, m), |rank, g| unsafe {
        let mut handle = null_mut();
        ok(ncclEpInitHandle(&mut handle, g, NCCL_EP_LAYOUT_EXPERT_MAJOR, null(), k as i32, null()));
        for (i, c) in calls.iter().enumerate() {
            let (t, send_only) = (c.tokens[rank], i % 2 == 1);
            let ctx = format!("rank {rank}, call {i}");
            let mut idx = Tensor::new(&dev, ncclInt64, &[t, k], &c.idx[rank]);
            ok(ncclEpUpdateHandle(handle, idx.ptr(), null(), cs()));
            let mut x = Tensor::new(&dev, ncclBfloat16, &[t, h], &c.x[rank]);
            let mut recv = Tensor::filled(&dev, ncclBfloat16, &[l, n * m, h], 0xee);
            let mut counters = Tensor::filled(&dev, ncclInt32, &[l], 0xff);
            let (mut din, mut dout, mut info) =
                (NCCL_EP_DISPATCH_INPUTS_INIT, NCCL_EP_DISPATCH_OUTPUTS_INIT, NCCL_EP_LAYOUT_INFO_INIT);
            (din.tokens, dout.tokens, info.expert_counters) = (x.ptr(), recv.ptr(), counters.ptr());
            let mut cfg = NCCL_EP_DISPATCH_CONFIG_INIT;
            cfg.send_only = send_only as u32;
            ok(ncclEpDispatch(handle, &din, &dout, &info, &cfg, cs()));
            if send_only {
                ok(ncclEpComplete(handle, null(), cs()));
            }
            let want = &c.want.ranks[rank];
            assert_eq!(counters.read::<i32>(&dev)[..l], want.packed_recv_count[..], "{ctx}: counts");
            let got: Vec<u16> = recv.read(&dev);
            for ex in 0..l {
                let rows_of = |v: &[u16]| {
                    let mut r: Vec<Vec<u16>> = (0..want.packed_recv_count[ex] as usize)
                        .map(|j| v[(ex * n * m + j) * h..(ex * n * m + j + 1) * h].to_vec())
                        .collect();
                    r.sort();
                    r
                };
                assert!(rows_of(&got) == rows_of(&want.packed_recv_x), "{ctx}: rows of local expert {ex}");
                // Only what arrived is copied out: the rows after it keep the poison.
                let past = (ex * n * m + want.packed_recv_count[ex] as usize) * h..(ex + 1) * n * m * h;
                assert!(got[past].iter().all(|&v| v == 0xeeee), "{ctx}: rows past the count of local expert {ex}");
            }
            // Identity experts: combine the received rows themselves.
            let mut out = Tensor::filled(&dev, ncclBfloat16, &[t, h], 0xee);
            let mut w = Tensor::new(&dev, ncclFloat32, &[t, k], &c.w[rank]);
            let (mut cin, mut cout) = (NCCL_EP_COMBINE_INPUTS_INIT, NCCL_EP_COMBINE_OUTPUTS_INIT);
            (cin.tokens, cout.tokens, cout.topk_weights) = (recv.ptr(), out.ptr(), w.ptr());
            let mut ccfg = NCCL_EP_COMBINE_CONFIG_INIT;
            ccfg.send_only = send_only as u32;
            ok(ncclEpCombine(handle, &cin, &cout, &ccfg, cs()));
            if send_only {
                ok(ncclEpComplete(handle, null(), cs()));
            }
            let ys: Vec<Vec<u16>> = c.want.ranks.iter().map(|r| r.packed_recv_x.clone()).collect();
            let want_out = reference::ll_combine(&c.want.handle, &ys, &c.w, h).unwrap();
            assert!(out.read::<u16>(&dev)[..t * h] == want_out[rank][..], "{ctx}: combined");
        }
        ok(ncclEpHandleDestroy(handle));
    });
}

/// LL expert-major with NCCL EP's DS_FP8E3M4 recipe: e4m3 rows and their f32 scales
/// (token-major `[L, R*M, H/128]`), each received row with its scales as the reference
/// quantizes it; plain and power-of-two (`round_scales`) scales, the second send-only.
/// Before those, QUANT_FWD (send-only): fp8 rows and their scales arrive as they were sent.
#[test]
fn ll_fp8_recipe_matches_the_reference() {
    let dev = device();
    let (n, e, h, k, m) = (4, 8, 256, 3, 6);
    let case = ll::Case { num_experts: e, hidden: h, num_topk: k, max_tokens: m, calls: 2, hooks: false };
    let calls = ll::prepare(&case, n, &mut Rng::fresh("c_abi-ll-fp8"));
    let (l, s) = (e / n, h / 128);
    // QUANT_FWD along the first call's routing: fp8 rows (any bytes) and scales as given.
    let mut rng = Rng::fresh("c_abi-ll-quant-fwd");
    let c0 = &calls[0];
    let xq: Vec<Vec<u8>> =
        c0.tokens.iter().map(|&t| rng.words(t * h / 4).iter().flat_map(|w| w.to_le_bytes()).collect()).collect();
    let xs: Vec<Vec<f32>> = c0.tokens.iter().map(|&t| (0..t * s).map(|_| rng.next_u32() as f32).collect()).collect();
    let routing = Routing::new(n, e, k, c0.idx.clone()).unwrap();
    let (want_q, want_s) =
        (reference::ll_dispatch(&routing, &xq, h, m).unwrap(), reference::ll_dispatch(&routing, &xs, s, m).unwrap());
    // Per local expert, the received (row, scales) pairs in any order: the rows of one expert
    // from different sources may land in either order.
    let pairs = |x: &[u8], sc: &[f32], ex: usize, rows: usize| {
        let mut v: Vec<(Vec<u8>, Vec<u32>)> = (ex * n * m..ex * n * m + rows)
            .map(|r| (x[r * h..(r + 1) * h].to_vec(), sc[r * s..(r + 1) * s].iter().map(|v| v.to_bits()).collect()))
            .collect();
        v.sort();
        v
    };
    on_groups(n, ll_config(e, h, m), |rank, g| unsafe {
        let mut handle = null_mut();
        ok(ncclEpInitHandle(&mut handle, g, NCCL_EP_LAYOUT_EXPERT_MAJOR, null(), k as i32, null()));
        {
            let (t, ctx) = (c0.tokens[rank], format!("rank {rank}, QUANT_FWD"));
            let mut idx = Tensor::new(&dev, ncclInt64, &[t, k], &c0.idx[rank]);
            ok(ncclEpUpdateHandle(handle, idx.ptr(), null(), cs()));
            let mut x = Tensor::new(&dev, ncclFloat8e4m3, &[t, h], &xq[rank]);
            let mut x_scales = Tensor::new(&dev, ncclFloat32, &[t, s], &xs[rank]);
            let mut recv = Tensor::filled(&dev, ncclFloat8e4m3, &[l, n * m, h], 0xee);
            let mut scales = Tensor::filled(&dev, ncclFloat32, &[l, n * m, s], 0xee);
            let mut counters = Tensor::filled(&dev, ncclInt32, &[l], 0xff);
            let (mut din, mut dout, mut info) =
                (NCCL_EP_DISPATCH_INPUTS_INIT, NCCL_EP_DISPATCH_OUTPUTS_INIT, NCCL_EP_LAYOUT_INFO_INIT);
            (din.tokens, din.scales, dout.tokens, dout.scales, info.expert_counters) =
                (x.ptr(), x_scales.ptr(), recv.ptr(), scales.ptr(), counters.ptr());
            let mut cfg = NCCL_EP_DISPATCH_CONFIG_INIT;
            (cfg.quant_recipe, cfg.send_only) = (NCCL_EP_DISP_QUANT_FWD, 1);
            ok(ncclEpDispatch(handle, &din, &dout, &info, &cfg, cs()));
            ok(ncclEpComplete(handle, null(), cs()));
            let (wq, ws) = (&want_q.ranks[rank], &want_s.ranks[rank]);
            assert_eq!(counters.read::<i32>(&dev)[..l], wq.packed_recv_count[..], "{ctx}: counts");
            let (got_x, got_s): (Vec<u8>, Vec<f32>) = (recv.read(&dev), scales.read(&dev));
            for ex in 0..l {
                let rows = wq.packed_recv_count[ex] as usize;
                let (got, exp) =
                    (pairs(&got_x, &got_s, ex, rows), pairs(&wq.packed_recv_x, &ws.packed_recv_x, ex, rows));
                assert!(got == exp, "{ctx}: fp8 rows and scales of local expert {ex}");
            }
            // QUANT_FWD without the input's scales is refused.
            din.scales = null_mut();
            assert_eq!(ncclEpDispatch(handle, &din, &dout, &info, &cfg, cs()), ncclInvalidArgument);
            assert!(last_error().contains("inputs->scales"), "{}", last_error());
        }
        for (i, c) in calls.iter().enumerate() {
            let (t, round, ctx) = (c.tokens[rank], i == 1, format!("rank {rank}, call {i}"));
            let mut idx = Tensor::new(&dev, ncclInt64, &[t, k], &c.idx[rank]);
            ok(ncclEpUpdateHandle(handle, idx.ptr(), null(), cs()));
            let mut x = Tensor::new(&dev, ncclBfloat16, &[t, h], &c.x[rank]);
            let mut recv = Tensor::filled(&dev, ncclFloat8e4m3, &[l, n * m, h], 0xee);
            let mut scales = Tensor::filled(&dev, ncclFloat32, &[l, n * m, s], 0xee);
            let mut counters = Tensor::filled(&dev, ncclInt32, &[l], 0xff);
            let (mut din, mut dout, mut info) =
                (NCCL_EP_DISPATCH_INPUTS_INIT, NCCL_EP_DISPATCH_OUTPUTS_INIT, NCCL_EP_LAYOUT_INFO_INIT);
            (din.tokens, dout.tokens, dout.scales, info.expert_counters) =
                (x.ptr(), recv.ptr(), scales.ptr(), counters.ptr());
            let mut cfg = NCCL_EP_DISPATCH_CONFIG_INIT;
            (cfg.quant_recipe, cfg.round_scales, cfg.send_only) =
                (NCCL_EP_DISP_QUANT_DS_FP8E3M4, round as u32, round as u32);
            ok(ncclEpDispatch(handle, &din, &dout, &info, &cfg, cs()));
            ok(ncclEpComplete(handle, null(), cs()));
            let want = &c.want.ranks[rank];
            assert_eq!(counters.read::<i32>(&dev)[..l], want.packed_recv_count[..], "{ctx}: counts");
            let (got_x, got_s): (Vec<u8>, Vec<f32>) = (recv.read(&dev), scales.read(&dev));
            for ex in 0..l {
                let rows = want.packed_recv_count[ex] as usize;
                let base = ex * n * m;
                let mut got: Vec<(Vec<u8>, Vec<u32>)> = (base..base + rows)
                    .map(|r| {
                        (
                            got_x[r * h..(r + 1) * h].to_vec(),
                            got_s[r * s..(r + 1) * s].iter().map(|v| v.to_bits()).collect(),
                        )
                    })
                    .collect();
                let mut exp: Vec<(Vec<u8>, Vec<u32>)> = (base..base + rows)
                    .map(|r| {
                        let (q, sc) = reference::quantize_row_fp8(&want.packed_recv_x[r * h..(r + 1) * h], round);
                        (q, sc.iter().map(|v| v.to_bits()).collect())
                    })
                    .collect();
                got.sort();
                exp.sort();
                assert!(got == exp, "{ctx}: fp8 rows and scales of local expert {ex}");
            }
        }
        // The recipe belongs to LL expert-major: scales missing is refused.
        let mut x = Tensor::filled(&dev, ncclBfloat16, &[1, h], 0);
        let mut recv = Tensor::filled(&dev, ncclFloat8e4m3, &[l, n * m, h], 0);
        let (mut din, mut dout) = (NCCL_EP_DISPATCH_INPUTS_INIT, NCCL_EP_DISPATCH_OUTPUTS_INIT);
        (din.tokens, dout.tokens) = (x.ptr(), recv.ptr());
        let mut cfg = NCCL_EP_DISPATCH_CONFIG_INIT;
        cfg.quant_recipe = NCCL_EP_DISP_QUANT_DS_FP8E3M4;
        assert_eq!(ncclEpDispatch(handle, &din, &dout, null(), &cfg, cs()), ncclInvalidArgument);
        assert!(last_error().contains("outputs->scales"), "{}", last_error());
        ok(ncclEpHandleDestroy(handle));
    });
}

/// LL rank-major: per-source counts (`src_rank_counters`), rows, i32 ids and weights, and
/// the combine of fresh pre-reduced rows, bit for bit; every other call send-only; the last
/// two calls QUANT_FWD (fp8 rows and their scales, after a refused call without
/// `outputs->scales`).
#[test]
fn ll_rank_major_matches_the_reference() {
    let dev = device();
    let (n, e, h, k, m) = (4, 8, 128, 3, 6);
    let mut rng = Rng::fresh("c_abi-ll-rank-major");
    let calls: Vec<_> = (0..4)
        .map(|call| {
            let idx = ll::random_routing(&mut rng, n, (e, k, m), 5, |r| (r + call) % 4 == 3);
            let tokens: Vec<usize> = idx.iter().map(|v| v.len() / k).collect();
            let x: Vec<Vec<u16>> = tokens.iter().map(|&t| rng.bf16(t * h, 4.0)).collect();
            let w: Vec<Vec<f32>> =
                tokens.iter().map(|&t| (0..t * k).map(|_| rng.next_u32() as f32 / 7e9).collect()).collect();
            let routing = Routing::new(n, e, k, idx.clone()).unwrap();
            let recv = reference::ll_dispatch_rank_major(&routing, &x, &w, h, m).unwrap();
            let y: Vec<Vec<u16>> = (0..n).map(|_| rng.bf16(n * m * h, 4.0)).collect();
            let want = reference::ll_combine_rank_major(&routing, &recv, &y, h, m).unwrap();
            // QUANT_FWD: rows and scales each land where the bf16 rows would.
            let fp8 = (call >= 2).then(|| ll::fp8_rank_major(&mut rng, &routing, &tokens, &w, h, m));
            (idx, tokens, x, w, recv, y, want, fp8)
        })
        .collect();
    on_groups(n, ll_config(e, h, m), |rank, g| unsafe {
        let mut size = 0usize;
        ok(ncclEpHandleMemSize(g, NCCL_EP_LAYOUT_RANK_MAJOR, null(), &mut size, k as i32));
        let mut mem = Tensor::filled(&dev, ncclUint8, &[size], 0x5a);
        let mut handle = null_mut();
        ok(ncclEpInitHandle(&mut handle, g, NCCL_EP_LAYOUT_RANK_MAJOR, null(), k as i32, mem.ptr()));
        for (i, (idx, tokens, x, w, recv, y, want, fp8)) in calls.iter().enumerate() {
            let (t, send_only, ctx) = (tokens[rank], i % 2 == 1, format!("rank {rank}, call {i}"));
            let mut idx_t = Tensor::new(&dev, ncclInt64, &[t, k], &idx[rank]);
            ok(ncclEpUpdateHandle(handle, idx_t.ptr(), null(), cs()));
            let mut wt = Tensor::new(&dev, ncclFloat32, &[t, k], &w[rank]);
            let (mut xt, mut rx) = match fp8 {
                None => (
                    Tensor::new(&dev, ncclBfloat16, &[t, h], &x[rank]),
                    Tensor::filled(&dev, ncclBfloat16, &[n, m, h], 0xee),
                ),
                Some(((rows, _), _)) => (
                    Tensor::new(&dev, ncclFloat8e4m3, &[t, h], &rows[rank]),
                    Tensor::filled(&dev, ncclFloat8e4m3, &[n, m, h], 0xee),
                ),
            };
            let mut scales = fp8.as_ref().map(|((_, sc), _)| {
                (
                    Tensor::new(&dev, ncclFloat32, &[t, h / 128], &sc[rank]),
                    Tensor::filled(&dev, ncclFloat32, &[n, m, h / 128], 0xee),
                )
            });
            let mut rw = Tensor::filled(&dev, ncclFloat32, &[n, m, k], 0xee);
            let mut ri = Tensor::filled(&dev, ncclInt32, &[n, m, k], 0xee);
            let mut counts = Tensor::filled(&dev, ncclInt32, &[n], 0xff);
            let (mut din, mut dout, mut info) =
                (NCCL_EP_DISPATCH_INPUTS_INIT, NCCL_EP_DISPATCH_OUTPUTS_INIT, NCCL_EP_LAYOUT_INFO_INIT);
            (din.tokens, din.topk_weights) = (xt.ptr(), wt.ptr());
            (dout.tokens, dout.topk_weights, dout.topk_idx) = (rx.ptr(), rw.ptr(), ri.ptr());
            info.src_rank_counters = counts.ptr();
            if send_only {
                info.recv_topk_idx_kind = NCCL_EP_EXPERT_ID_GLOBAL; // made global after the receive
            }
            let mut cfg = NCCL_EP_DISPATCH_CONFIG_INIT;
            cfg.send_only = send_only as u32;
            if let Some((xs, rs)) = &mut scales {
                cfg.quant_recipe = NCCL_EP_DISP_QUANT_FWD;
                din.scales = xs.ptr();
                // Without the output's scales: refused, nothing sent (peers are not waited for).
                assert_eq!(ncclEpDispatch(handle, &din, &dout, &info, &cfg, cs()), ncclInvalidArgument, "{ctx}");
                dout.scales = rs.ptr();
            }
            ok(ncclEpDispatch(handle, &din, &dout, &info, &cfg, cs()));
            if send_only {
                ok(ncclEpComplete(handle, null(), cs()));
            }
            let rv = &recv[rank];
            assert_eq!(counts.read::<i32>(&dev)[..n], rv.recv_count[..], "{ctx}: src_rank_counters");
            let (gw, gi) = (rw.read::<f32>(&dev), ri.read::<i32>(&dev));
            for (src, &c) in rv.recv_count.iter().enumerate() {
                let (rows, ks) = (src * m..src * m + c as usize, src * m * k..(src * m + c as usize) * k);
                let (a, b) = (rows.start * h, rows.end * h);
                match (fp8, &scales) {
                    (Some((_, (want_rows, want_scales))), Some((_, rs))) => {
                        assert!(rx.read::<u8>(&dev)[a..b] == want_rows[rank][a..b], "{ctx}: fp8 rows from {src}");
                        let (a, b) = (rows.start * h / 128, rows.end * h / 128);
                        let got = rs.read::<f32>(&dev);
                        assert!(
                            got[a..b].iter().zip(&want_scales[rank][a..b]).all(|(x, y)| x.to_bits() == y.to_bits()),
                            "{ctx}: scales from {src}"
                        );
                    }
                    _ => assert!(rx.read::<u16>(&dev)[a..b] == rv.recv_x[a..b], "{ctx}: rows from {src}"),
                }
                assert_eq!(gw[ks.clone()], rv.recv_topk_weights[ks.clone()], "{ctx}: weights from {src}");
                let lo = if send_only { (rank * (e / n)) as i64 } else { 0 };
                let ids: Vec<i64> = gi[ks.clone()].iter().map(|&v| v as i64).collect();
                let want_ids: Vec<i64> =
                    rv.recv_topk_idx[ks].iter().map(|&v| if v >= 0 { v + lo } else { v }).collect();
                assert_eq!(ids, want_ids, "{ctx}: ids from {src}");
            }
            let mut yt = Tensor::new(&dev, ncclBfloat16, &[n, m, h], &y[rank]);
            let mut out = Tensor::filled(&dev, ncclBfloat16, &[t, h], 0xee);
            let (mut cin, mut cout) = (NCCL_EP_COMBINE_INPUTS_INIT, NCCL_EP_COMBINE_OUTPUTS_INIT);
            (cin.tokens, cout.tokens) = (yt.ptr(), out.ptr());
            let mut ccfg = NCCL_EP_COMBINE_CONFIG_INIT;
            ccfg.send_only = send_only as u32;
            ok(ncclEpCombine(handle, &cin, &cout, &ccfg, cs()));
            if send_only {
                ok(ncclEpComplete(handle, null(), cs()));
            }
            assert!(out.read::<u16>(&dev)[..t * h] == want[rank][..], "{ctx}: combined");
        }
        ok(ncclEpHandleDestroy(handle));
    });
}

/// The versioning rule and bad input: wrong magic, undersized, NULL required arguments,
/// mismatched tensors are refused with a code and a message, larger (future) structs are
/// read up to the fields known, and the group stays usable.
#[test]
fn bad_structs_and_tensors_are_refused_and_the_group_stays_usable() {
    let dev = device();
    let (n, e, h, k, m) = (2, 4, 32, 2, 4);
    // A config as a future caller would pass it: bigger, with a tail we don't know.
    #[repr(C)]
    struct Future {
        cfg: ncclEpGroupConfig_t,
        tail: [u64; 4],
    }
    let mut fut = Future { cfg: ht_config(e, h, m, n * m), tail: [u64::MAX; 4] };
    fut.cfg.size = size_of::<Future>() as u32;
    let _ = &fut.tail;
    let future = Config(fut.cfg);
    let mut v = 0;
    ok(unsafe { ncclEpGetVersion(&mut v) });
    assert_eq!(v, NCCL_EP_VERSION_CODE);
    on_groups(n, ht_config(e, h, m, n * m), |_rank, g| unsafe {
        // Group configs: wrong magic, undersized, V1-sized (accepted by the rule) are checked
        // before anything collective, so one rank can try them alone.
        let mut bad = ht_config(e, h, m, n * m);
        bad.magic = 0x1234;
        let mut id = moeEpUniqueId::zeroed();
        ok(moeEpGetUniqueId(&mut id));
        let mut g2 = null_mut();
        assert_eq!(moeEpCreateGroup(&mut g2, &id, 0, 1, -1, &bad), ncclInvalidArgument);
        assert!(last_error().contains("magic"), "{}", last_error());
        bad.magic = NCCL_EP_MAGIC;
        bad.size = NCCL_EP_GROUP_CONFIG_V1_SIZE - 4;
        assert_eq!(moeEpCreateGroup(&mut g2, &id, 0, 1, -1, &bad), ncclInvalidArgument);
        assert!(last_error().contains("V1 size"), "{}", last_error());
        assert_eq!(moeEpCreateGroup(&mut g2, &id, 2, 2, -1, future.get()), ncclInvalidArgument, "rank >= nranks");
        let mut overflow = ht_config(e, h, m, 0);
        overflow.overflow_policy = NCCL_EP_OVERFLOW_DROP;
        assert_eq!(moeEpCreateGroup(&mut g2, &id, 0, 1, -1, &overflow), ncclInvalidArgument, "DROP with AUTO rows");
        assert!(last_error().contains("max_recv_tokens_per_rank"), "{}", last_error());
        overflow.overflow_policy = 7;
        assert_eq!(moeEpCreateGroup(&mut g2, &id, 0, 1, -1, &overflow), ncclInvalidArgument);

        // Handles: unset layout, LL layout on an HT group, NULL out-pointer.
        let mut hnd = null_mut();
        assert_eq!(ncclEpInitHandle(&mut hnd, g, NCCL_EP_LAYOUT_UNSET, null(), k as i32, null()), ncclInvalidArgument);
        assert_eq!(
            ncclEpInitHandle(&mut hnd, g, NCCL_EP_LAYOUT_RANK_MAJOR, null(), k as i32, null()),
            ncclInvalidArgument
        );
        assert_eq!(ncclEpInitHandle(null_mut(), g, NCCL_EP_LAYOUT_FLAT, null(), k as i32, null()), ncclInvalidArgument);
        let mut small = Tensor::filled(&dev, ncclUint8, &[16], 0);
        assert_eq!(
            ncclEpInitHandle(&mut hnd, g, NCCL_EP_LAYOUT_FLAT, null(), k as i32, small.ptr()),
            ncclInvalidArgument
        );
        assert!(last_error().contains("ncclEpHandleMemSize"), "{}", last_error());

        // Tensors: bad magic, window-backed, wrong dtype, wrong shape.
        ok(ncclEpInitHandle(&mut hnd, g, NCCL_EP_LAYOUT_FLAT, null(), k as i32, null()));
        let mut idx = Tensor::new(&dev, ncclInt64, &[m, k], &vec![0i64; m * k]);
        idx.desc.magic = 0;
        assert_eq!(ncclEpUpdateHandle(hnd, idx.ptr(), null(), cs()), ncclInvalidArgument);
        idx.desc.magic = NCCL_EP_TENSOR_MAGIC;
        idx.desc.win_hdl = 8 as *mut _;
        assert_eq!(ncclEpUpdateHandle(hnd, idx.ptr(), null(), cs()), ncclInvalidUsage);
        idx.desc.win_hdl = null_mut();
        idx.desc.datatype = ncclFloat32;
        assert_eq!(ncclEpUpdateHandle(hnd, idx.ptr(), null(), cs()), ncclInvalidArgument);
        assert!(last_error().contains("ncclInt32 or ncclInt64"), "{}", last_error());
        idx.desc.datatype = ncclInt64;
        let mut wide = Tensor::new(&dev, ncclInt64, &[m, k + 1], &vec![0i64; m * (k + 1)]);
        assert_eq!(ncclEpUpdateHandle(hnd, wide.ptr(), null(), cs()), ncclInvalidArgument, "top-k above init's");
        // A dispatch before any routing, a combine before any dispatch.
        let mut x = Tensor::filled(&dev, ncclBfloat16, &[m, h], 0);
        let (mut din, dout) = (NCCL_EP_DISPATCH_INPUTS_INIT, NCCL_EP_DISPATCH_OUTPUTS_INIT);
        din.tokens = x.ptr();
        assert_eq!(
            ncclEpDispatch(hnd, &din, &dout, null(), null(), cs()),
            ncclInvalidArgument,
            "outputs->tokens missing"
        );
        // Structs: undersized dispatch config, a bigger (future) one is accepted as far as known.
        let mut cfg = NCCL_EP_DISPATCH_CONFIG_INIT;
        cfg.size = 8;
        assert_eq!(ncclEpDispatch(hnd, &din, &dout, null(), &cfg, cs()), ncclInvalidArgument);
        assert_eq!(ncclEpMaskQuery(g, null_mut(), null_mut()), ncclInvalidUsage);
        assert_eq!(ncclEpGetAsyncError(null_mut(), null_mut()), ncclInvalidArgument);
        // Tensor descriptors from the library.
        let mut t = null_mut();
        ok(ncclEpTensorAlloc(&mut t, 2, ncclBfloat16, [3usize, 5].as_ptr(), null()));
        assert_eq!(((*t).ndim, *(*t).sizes.add(1), (*t).datatype), (2, 5, ncclBfloat16));
        ok(ncclEpTensorDestroy(t));
        assert_eq!(ncclEpTensorDestroy(idx.ptr()), ncclInvalidArgument, "not the library's");
        ok(ncclEpTensorDestroy(null_mut()));

        // Still usable: the routing goes through now.
        ok(ncclEpUpdateHandle(hnd, idx.ptr(), null(), cs()));
        assert_eq!(last_error(), "");
        ok(ncclEpHandleDestroy(hnd));
    });
    // The future-sized config makes a working group.
    on_groups(1, fut.cfg, |_, _| {});
}
