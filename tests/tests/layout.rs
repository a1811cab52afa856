//! `get_dispatch_layout` on the device against the CPU reference, on fresh random routings
//! (distinct experts per token, random -1 entries, uneven and empty token counts).
use moe_ep::layout::{IndexType, drop_overflow, get_dispatch_layout};
use moe_ep::reference;
use moe_ep::{Error, Group};
use moe_ep_tests::{Rng, device, devices, on_ranks};

/// `[num_tokens, num_topk]` distinct expert ids per row, about one entry in `drop` set to -1.
fn random_topk(rng: &mut Rng, num_tokens: usize, num_topk: usize, num_experts: usize, drop: u64) -> Vec<i64> {
    let mut idx = Vec::with_capacity(num_tokens * num_topk);
    for _ in 0..num_tokens {
        let mut row: Vec<i64> = Vec::with_capacity(num_topk);
        while row.len() < num_topk {
            let e = rng.below(num_experts as u64) as i64;
            if !row.contains(&e) {
                row.push(e);
            }
        }
        for e in row.iter_mut() {
            if drop > 0 && rng.below(drop) == 0 {
                *e = -1;
            }
        }
        idx.extend(row);
    }
    idx
}

fn check(num_ranks: usize, num_experts: usize, num_topk: usize, max_tokens: usize, idx: IndexType) {
    let seed = Rng::fresh("layout").next_u64();
    let groups = Group::in_process(&devices(num_ranks)).unwrap();
    on_ranks(groups, |rank, group| {
        let mut rng = Rng::new(seed ^ rank as u64);
        // Uneven token counts; rank 1 (if any) has none.
        let num_tokens = if rank == 1 { 0 } else { 1 + rng.below(max_tokens as u64) as usize };
        let topk = random_topk(&mut rng, num_tokens, num_topk, num_experts, 7);
        let buf = group.stream().alloc((num_tokens * num_topk * idx.bytes()).max(1)).unwrap();
        match idx {
            IndexType::I64 => buf.write(group.stream(), 0, &topk).unwrap(),
            IndexType::I32 => {
                buf.write(group.stream(), 0, &topk.iter().map(|&e| e as i32).collect::<Vec<_>>()).unwrap()
            }
        }
        let got = get_dispatch_layout(&group, &buf, idx, num_tokens, num_topk, num_experts).unwrap();
        group.stream().synchronize().unwrap();
        group.take_device_error("get_dispatch_layout").unwrap();
        let want = reference::get_dispatch_layout(&topk, num_topk, num_ranks, num_experts).unwrap();
        let s = group.stream();
        assert_eq!(got.num_tokens_per_rank.to_vec::<i32>(s).unwrap(), want.num_tokens_per_rank, "rank {rank}");
        assert_eq!(got.num_tokens_per_expert.to_vec::<i32>(s).unwrap(), want.num_tokens_per_expert, "rank {rank}");
        let in_rank: Vec<bool> =
            got.is_token_in_rank.to_vec::<u8>(s).unwrap()[..num_tokens * num_ranks].iter().map(|&b| b != 0).collect();
        assert_eq!(in_rank, want.is_token_in_rank, "rank {rank}");
    });
}

#[test]
fn layout_eight_ranks_deepseek_shape_int64() {
    let cpu = device().is_cpu();
    check(8, 256, 8, if cpu { 300 } else { 4096 }, IndexType::I64);
}

#[test]
fn layout_int32_wide_topk_many_experts() {
    let cpu = device().is_cpu();
    check(4, 1024, 32, if cpu { 100 } else { 2000 }, IndexType::I32);
}

#[test]
fn layout_single_rank_top1() {
    check(1, 3, 1, 50, IndexType::I64);
}

#[test]
fn bad_expert_ids_are_reported_and_the_group_stays_usable() {
    let dev = device();
    let groups = Group::in_process(&[dev.clone(), dev.clone()]).unwrap();
    on_ranks(groups, |_, group| {
        let s = group.stream();
        let buf = dev.alloc(8 * 4).unwrap();
        buf.write(s, 0, &[0i64, 1, 7, -1]).unwrap();
        // Row 2 names expert 7 of 4.
        get_dispatch_layout(&group, &buf, IndexType::I64, 2, 2, 4).unwrap();
        s.synchronize().unwrap();
        match group.take_device_error("get_dispatch_layout") {
            Err(Error::InvalidArgument { reason, .. }) => assert!(reason.contains("row 1 holds 7"), "{reason}"),
            other => panic!("expected a bad-input error, got {other:?}"),
        }
        // Validation before launch.
        assert!(get_dispatch_layout(&group, &buf, IndexType::I64, 2, 0, 4).is_err());
        assert!(get_dispatch_layout(&group, &buf, IndexType::I64, 2, 33, 4).is_err());
        assert!(get_dispatch_layout(&group, &buf, IndexType::I64, 2, 2, 5).is_err(), "5 experts over 2 ranks");
        assert!(get_dispatch_layout(&group, &buf, IndexType::I64, 3, 2, 4).is_err(), "buffer too small");
        // And a good call afterwards works.
        buf.write(s, 0, &[0i64, 3, 2, -1]).unwrap();
        let l = get_dispatch_layout(&group, &buf, IndexType::I64, 2, 2, 4).unwrap();
        s.synchronize().unwrap();
        group.take_device_error("get_dispatch_layout").unwrap();
        assert_eq!(l.num_tokens_per_rank.to_vec::<i32>(s).unwrap(), vec![1, 2]);
        assert_eq!(l.num_tokens_per_expert.to_vec::<i32>(s).unwrap(), vec![1, 0, 1, 1]);
    });
}

/// The DROP policy's reference on a hand-worked case: 2 ranks, experts 0-1 on rank 0 and
/// 2-3 on rank 1, budget 3. Rank 1 receives rank 0's tokens 0 and 2, then rank 1's tokens
/// 0..3: it keeps the first three (rank 1's token 0), and rank 1's tokens 1 and 2 lose
/// their rank-1 experts (token 1 keeps expert 0: rank 0 has room).
#[test]
fn drop_overflow_reference_keeps_the_first_rows_in_arrival_order() {
    let idx = vec![
        vec![2, 3, /**/ 0, -1, /**/ 3, 1],  // rank 0: tokens to rank 1: 0 and 2
        vec![2, -1, /**/ 0, 2, /**/ 3, -1], // rank 1: tokens to rank 1: 0, 1, 2
    ];
    let routing = reference::Routing::new(2, 4, 2, idx).unwrap();
    let (kept, arrived) = routing.drop_overflow(3);
    assert_eq!(arrived, vec![3, 5], "rows each rank would receive");
    assert_eq!(kept.topk_idx(0), &[2, 3, 0, -1, 3, 1], "rank 0's tokens all fit");
    assert_eq!(kept.topk_idx(1), &[2, -1, 0, -1, -1, -1], "rank 1's tokens 1 and 2 lose rank 1");
    assert_eq!(routing.drop_overflow(5).0, routing, "nothing dropped at the exact fit");
}

/// `ht_drop_overflow` on the device against [`reference::Routing::drop_overflow`]: every
/// rank's routing (random, uneven, rank 1 empty), `rank_prefix_matrix` as the count exchange
/// would return it, a budget that cuts most ranks mid-source; i32 and i64 ids.
fn check_drop(num_ranks: usize, num_experts: usize, num_topk: usize, max_tokens: usize, idx: IndexType) {
    let seed = Rng::fresh("drop_overflow").next_u64();
    let topk: Vec<Vec<i64>> = (0..num_ranks)
        .map(|r| {
            let mut rng = Rng::new(seed ^ r as u64);
            let t = if r == 1 { 0 } else { 1 + rng.below(max_tokens as u64) as usize };
            random_topk(&mut rng, t, num_topk, num_experts, 7)
        })
        .collect();
    let layouts: Vec<_> =
        topk.iter().map(|v| reference::get_dispatch_layout(v, num_topk, num_ranks, num_experts).unwrap()).collect();
    let mut prefix = vec![0i32; num_ranks * num_ranks];
    for i in 0..num_ranks {
        for j in 0..num_ranks {
            let before = if i == 0 { 0 } else { prefix[(i - 1) * num_ranks + j] };
            prefix[i * num_ranks + j] = before + layouts[i].num_tokens_per_rank[j];
        }
    }
    let routing = reference::Routing::new(num_ranks, num_experts, num_topk, topk.clone()).unwrap();
    let all = routing.drop_overflow(usize::MAX).1;
    let budget = all.iter().sum::<usize>() * 3 / (4 * num_ranks); // below most ranks' load
    let (kept, arrived) = routing.drop_overflow(budget);
    assert!(arrived.iter().any(|&a| a > budget), "the budget must cut: {arrived:?}");
    on_ranks(Group::in_process(&devices(num_ranks)).unwrap(), |rank, group| {
        let (s, t) = (group.stream(), topk[rank].len() / num_topk);
        let ids = s.alloc((t * num_topk * idx.bytes()).max(16)).unwrap();
        match idx {
            IndexType::I64 => ids.write(s, 0, &topk[rank]).unwrap(),
            IndexType::I32 => ids.write(s, 0, &topk[rank].iter().map(|&e| e as i32).collect::<Vec<_>>()).unwrap(),
        }
        let layout = get_dispatch_layout(&group, &ids, idx, t, num_topk, num_experts).unwrap();
        let (rpm, total) = (s.alloc(4 * prefix.len()).unwrap(), s.alloc(4).unwrap());
        rpm.write(s, 0, &prefix).unwrap();
        let in_rank = &layout.is_token_in_rank;
        drop_overflow(&group, &ids, idx, t, num_topk, num_experts, in_rank, &rpm, budget, Some(&total)).unwrap();
        s.synchronize().unwrap();
        group.take_device_error("ht_drop_overflow").unwrap();
        let got: Vec<i64> = match idx {
            IndexType::I64 => ids.to_vec::<i64>(s).unwrap(),
            IndexType::I32 => ids.to_vec::<i32>(s).unwrap().into_iter().map(i64::from).collect(),
        };
        assert_eq!(got[..t * num_topk], kept.topk_idx(rank)[..], "rank {rank}: ids after the drop");
        assert_eq!(total.to_vec::<i32>(s).unwrap()[0] as usize, arrived[rank], "rank {rank}: rows before the drop");
    });
}

#[test]
fn drop_overflow_kernel_matches_the_reference() {
    check_drop(8, 64, 6, 40, IndexType::I32);
    check_drop(3, 12, 2, 70, IndexType::I64);
}
