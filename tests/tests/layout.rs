//! `get_dispatch_layout` on the device against the CPU reference, on fresh random routings
//! (distinct experts per token, random -1 entries, uneven and empty token counts).
use moe_ep::layout::{IndexType, get_dispatch_layout};
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
