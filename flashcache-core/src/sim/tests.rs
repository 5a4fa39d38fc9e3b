//! Simulator sanity tests: hand-computed examples, the looping pattern that
//! defeats LRU and FIFO, sizing and the matrix runner.

use std::collections::VecDeque;

use super::*;

fn read(block: u64) -> TraceRecord {
    TraceRecord { op: TraceOp::Read, sector: block * 8, sectors: 8 }
}

fn run_blocks(policy: PolicyKind, shape: Shape, blocks: &[u64]) -> SimReport {
    let mut sim = Simulator::new(policy, shape);
    let records: Vec<TraceRecord> = blocks.iter().map(|&b| read(b)).collect();
    sim.run(&records);
    sim.report()
}

#[test]
fn hand_computed_three_block_example() {
    // 1 2 3 1 4 1 2 5 1 3 in a cache of three blocks.
    //  LRU:   hits at the 4th, 6th and 9th access (evicts 2, 3, 4, 2).
    //  FIFO:  hits at the 4th and 9th (evicts 1, 2, 3, 4, 1).
    //  SIEVE: 1 is visited when 4 comes, so 2 goes; then 3, 4 and 2: hits as LRU.
    //  SLRU:  1 is promoted to hot at its 2nd hit; warm victims 2, 3, 4, 2.
    let trace = [1, 2, 3, 1, 4, 1, 2, 5, 1, 3];
    let full = Shape::full(3, 8).unwrap();
    let cases = [
        (PolicyKind::Lru, 3, 4),
        (PolicyKind::Fifo, 2, 5),
        (PolicyKind::Sieve, 3, 4),
        (PolicyKind::FLASHCACHE_LRU, 3, 4),
    ];
    for (policy, hits, evictions) in cases {
        let r = run_blocks(policy, full, &trace);
        assert_eq!(
            (r.accesses, r.hits, r.evictions, r.no_room),
            (10, hits, evictions, 0),
            "{policy}"
        );
        assert_eq!((r.reads, r.read_hits, r.writes, r.write_hits), (10, hits, 0, 0), "{policy}");
        assert_eq!(r.records, 10);
        assert!((r.miss_ratio() - (10 - hits) as f64 / 10.0).abs() < 1e-12);
    }
}

#[test]
fn records_split_into_blocks_and_count_reads_and_writes() {
    let mut sim = Simulator::fully_associative(PolicyKind::Lru, 16, 8).unwrap();
    let rec = |op, sector, sectors| TraceRecord { op, sector, sectors };
    // Sectors 4..12 touch blocks 0 and 1: two write misses.
    sim.access(&rec(TraceOp::Write, 4, 8));
    // Sectors 0..16: blocks 0 and 1, two read hits.
    sim.access(&rec(TraceOp::Read, 0, 16));
    // Sector 15 alone: block 1, a write hit; sectors 16..41: blocks 2..=5, four read misses.
    sim.access(&rec(TraceOp::Write, 15, 1));
    sim.access(&rec(TraceOp::Read, 16, 25));
    // A record of no sectors touches nothing.
    sim.access(&rec(TraceOp::Read, 0, 0));
    let r = sim.report();
    assert_eq!(r.records, 5);
    assert_eq!((r.reads, r.read_hits, r.writes, r.write_hits), (6, 2, 3, 1));
    assert_eq!((r.accesses, r.hits, r.evictions), (9, 3, 0));
    assert!((r.read_hit_ratio() - 2.0 / 6.0).abs() < 1e-12);
    assert!((r.write_hit_ratio() - 1.0 / 3.0).abs() < 1e-12);
    // Even a record ending at the last sector is fine.
    sim.access(&rec(TraceOp::Read, u64::MAX - 7, 8));
    assert_eq!(sim.report().accesses, 10);
}

#[test]
fn a_loop_over_k_plus_one_blocks_misses_every_time() {
    // LRU and FIFO evict each block just before it comes back. SIEVE does too:
    // until its first hit no block is visited, and SIEVE with no visited
    // blocks is FIFO, so it cannot get a first hit on this pattern either.
    let k = 64u64;
    let trace: Vec<u64> = (0..100).flat_map(|_| 0..=k).collect();
    let shapes = [
        Shape::full(k, 8).unwrap(),
        // One set of k ways is the same cache, set-associatively.
        Shape::SetAssociative(Geometry::new(8, k as u32, 1, SetMapping::Linear).unwrap()),
    ];
    for shape in shapes {
        for policy in [PolicyKind::Lru, PolicyKind::Fifo, PolicyKind::Sieve] {
            let r = run_blocks(policy, shape, &trace);
            assert_eq!(r.hits, 0, "{policy} {shape:?}");
            assert_eq!(r.evictions, trace.len() as u64 - k);
        }
    }
}

#[test]
fn sieve_keeps_a_hot_set_through_a_scan_that_flushes_lru_and_fifo() {
    // A cache of 64 blocks; 32 hot blocks are read twice (so SIEVE marks them
    // visited), then each hot read comes between two reads of new, never
    // reused blocks: 96 distinct blocks between two reads of a hot block.
    let k = 64;
    let mut trace: Vec<u64> = (0..32).chain(0..32).collect();
    let warm = trace.len();
    let mut scan = 1000;
    for _ in 0..50 {
        for hot in 0..32 {
            trace.extend([hot, scan, scan + 1]);
            scan += 2;
        }
    }
    let after_warm_up = |policy| {
        let mut sim = Simulator::new(policy, Shape::full(k, 8).unwrap());
        let records: Vec<TraceRecord> = trace.iter().map(|&b| read(b)).collect();
        sim.run(&records[..warm]);
        let before = sim.report().hits;
        sim.run(&records[warm..]);
        sim.report().hits - before
    };
    // LRU and FIFO keep a few hot blocks for part of the first round, then none.
    assert!(after_warm_up(PolicyKind::Lru) <= 32);
    assert!(after_warm_up(PolicyKind::Fifo) <= 32);
    // SIEVE hits every hot read: 50 rounds of 32.
    assert_eq!(after_warm_up(PolicyKind::Sieve), 1600);
}

#[test]
fn empty_trace_and_empty_report() {
    let r = run_blocks(PolicyKind::Sieve, Shape::full(4, 8).unwrap(), &[]);
    assert_eq!((r.accesses, r.miss_ratio(), r.hit_ratio(), r.read_hit_ratio()), (0, 0.0, 0.0, 0.0));
    assert_eq!(footprint(&[], 8), 0);
    // A fraction of an empty footprint is still one block or one set.
    let reports =
        run_matrix(&[], &[PolicyKind::Lru], &[CacheSize::Fraction(0.1)], Organization::Full, 8)
            .unwrap();
    assert_eq!(reports[0].cache_blocks, 1);
}

/// A naive LRU of `k` blocks, the textbook way.
fn naive_lru(trace: &[u64], k: usize) -> u64 {
    let mut order: VecDeque<u64> = VecDeque::new();
    let mut hits = 0;
    for &b in trace {
        if let Some(i) = order.iter().position(|&x| x == b) {
            order.remove(i);
            hits += 1;
        } else if order.len() == k {
            order.pop_back();
        }
        order.push_front(b);
    }
    hits
}

/// A naive FIFO of `k` blocks.
fn naive_fifo(trace: &[u64], k: usize) -> u64 {
    let mut order: VecDeque<u64> = VecDeque::new();
    let mut hits = 0;
    for &b in trace {
        if order.contains(&b) {
            hits += 1;
            continue;
        }
        if order.len() == k {
            order.pop_back();
        }
        order.push_front(b);
    }
    hits
}

#[test]
fn fully_associative_lru_and_fifo_match_naive_models_on_zipf() {
    let trace: Vec<u64> = Zipf::new(2000, 0.9, 77).unwrap().shuffled().take(20_000).collect();
    for k in [1u64, 7, 100, 500] {
        let shape = Shape::full(k, 8).unwrap();
        assert_eq!(run_blocks(PolicyKind::Lru, shape, &trace).hits, naive_lru(&trace, k as usize));
        assert_eq!(
            run_blocks(PolicyKind::Fifo, shape, &trace).hits,
            naive_fifo(&trace, k as usize)
        );
    }
}

#[test]
fn set_associative_sets_are_independent() {
    // Linear mapping, 2 sets of 2 ways: blocks 0,1 (and 4,5) go to set 0,
    // blocks 2,3 (and 6,7) to set 1.
    let g = Geometry::new(8, 2, 2, SetMapping::Linear).unwrap();
    // Set 0 sees 0 1 4 0: LRU evicts 0 for 4, so the last 0 misses; set 1 sees
    // 2 3 2 3: two hits.
    let r = run_blocks(PolicyKind::Lru, Shape::SetAssociative(g), &[0, 2, 1, 3, 4, 2, 3, 0]);
    assert_eq!((r.hits, r.evictions), (2, 2));
    assert_eq!((r.cache_blocks, r.assoc, r.mapping), (4, Some(2), Some(SetMapping::Linear)));
    // Fully associative with the same 4 blocks: 0 2 1 3 fill, 4 evicts 0, 2 and 3 hit, 0 evicts 1.
    let r = run_blocks(PolicyKind::Lru, Shape::full(4, 8).unwrap(), &[0, 2, 1, 3, 4, 2, 3, 0]);
    assert_eq!((r.hits, r.evictions), (2, 2));
    assert_eq!((r.assoc, r.mapping), (None, None));
}

#[test]
fn sizes_resolve_to_shapes() {
    let hashed = Organization::SetAssociative {
        assoc: 16,
        mapping: SetMapping::Hashed { cluster_blocks: 4 },
    };
    let sized = |org, size| Shape::sized(org, size, 1000, 8);
    // Fully associative: whole blocks, rounded down, at least one.
    assert_eq!(sized(Organization::Full, CacheSize::Fraction(0.05)).unwrap().cache_blocks(), 50);
    assert_eq!(sized(Organization::Full, CacheSize::Fraction(0.0299)).unwrap().cache_blocks(), 29);
    assert_eq!(sized(Organization::Full, CacheSize::Fraction(1e-9)).unwrap().cache_blocks(), 1);
    assert_eq!(sized(Organization::Full, CacheSize::Blocks(77)).unwrap().cache_blocks(), 77);
    // Set-associative: the nearest whole number of sets, at least one.
    let s = sized(hashed, CacheSize::Fraction(0.05)).unwrap();
    assert_eq!((s.cache_blocks(), s.assoc()), (48, Some(16)));
    assert_eq!(sized(hashed, CacheSize::Fraction(0.056)).unwrap().cache_blocks(), 64);
    assert_eq!(sized(hashed, CacheSize::Fraction(0.001)).unwrap().cache_blocks(), 16);
    assert_eq!(sized(hashed, CacheSize::Blocks(100)).unwrap().cache_blocks(), 96);
    // Errors.
    assert_eq!(
        Shape::sized(Organization::Full, CacheSize::Fraction(0.5), 200_000, 8),
        Err(SimError::FullTooLarge(100_000))
    );
    assert_eq!(Shape::full(MAX_FULL_BLOCKS, 8).unwrap().cache_blocks(), MAX_FULL_BLOCKS);
    assert_eq!(Shape::full(MAX_FULL_BLOCKS + 1, 8), Err(SimError::FullTooLarge(65536)));
    assert_eq!(sized(Organization::Full, CacheSize::Blocks(0)), Err(SimError::NoBlocks));
    assert_eq!(sized(hashed, CacheSize::Blocks(0)), Err(SimError::NoBlocks));
    assert_eq!(Shape::full(10, 6), Err(SimError::BlockSize(6)));
    for bad in [0.0, -0.1, f64::NAN, f64::INFINITY] {
        assert!(matches!(sized(hashed, CacheSize::Fraction(bad)), Err(SimError::BadFraction(_))));
        assert!(matches!(
            sized(Organization::Full, CacheSize::Fraction(bad)),
            Err(SimError::BadFraction(_))
        ));
    }
    let odd = Organization::SetAssociative { assoc: 12, mapping: SetMapping::Linear };
    assert!(matches!(sized(odd, CacheSize::Blocks(100)), Err(SimError::Geometry(_))));
    assert_eq!(
        Shape::sized(hashed, CacheSize::Blocks(u64::MAX), 0, 8),
        Err(SimError::TooManySets(u64::MAX / 16 + 1))
    );
}

#[test]
fn cache_sizes_parse() {
    assert_eq!("0.5%".parse::<CacheSize>(), Ok(CacheSize::Fraction(0.005)));
    assert_eq!(" 20 % ".parse::<CacheSize>(), Ok(CacheSize::Fraction(0.2)));
    assert_eq!("65536".parse::<CacheSize>(), Ok(CacheSize::Blocks(65536)));
    for bad in ["0", "0%", "-1%", "x", "5k", "", "%", "inf%", "NaN%"] {
        assert!(bad.parse::<CacheSize>().is_err(), "{bad:?}");
    }
    assert_eq!(CacheSize::Blocks(12).to_string(), "12");
    assert_eq!(CacheSize::Fraction(0.2).to_string(), "20%");
}

#[test]
fn matrix_runs_every_combination_in_order() {
    let trace: Vec<TraceRecord> =
        Zipf::new(5000, 1.0, 3).unwrap().shuffled().records(8).take(30_000).collect();
    let fp = footprint(&trace, 8);
    assert!(fp > 3000 && fp <= 5000, "{fp}");
    let sizes = [CacheSize::Fraction(0.01), CacheSize::Fraction(0.1), CacheSize::Blocks(500)];
    let org = Organization::SetAssociative {
        assoc: 64,
        mapping: SetMapping::Hashed { cluster_blocks: 16 },
    };
    let reports = run_matrix(&trace, &PolicyKind::ALL, &sizes, org, 8).unwrap();
    assert_eq!(reports.len(), 12);
    let jobs = plan(&PolicyKind::ALL, &sizes, org, fp, 8).unwrap();
    for (job, report) in jobs.iter().zip(&reports) {
        assert_eq!(report.policy, job.policy);
        assert_eq!(report.cache_blocks, job.shape.cache_blocks());
        assert_eq!(*report, job.run(&trace));
        assert_eq!(report.accesses, 30_000);
    }
    assert_eq!(reports[0].policy, PolicyKind::Fifo);
    assert_eq!(reports[3].policy, PolicyKind::Lru);
    // Bigger caches miss less.
    for p in 0..4 {
        assert!(reports[p * 3].miss_ratio() > reports[p * 3 + 1].miss_ratio());
    }
    assert_eq!(run_matrix(&trace, &[PolicyKind::Lru], &sizes, org, 3), Err(SimError::BlockSize(3)));
}

#[test]
fn out_of_range_values_do_not_panic() {
    // The last sector with 512-byte blocks: the very last block.
    let mut sim = Simulator::fully_associative(PolicyKind::Lru, 4, 1).unwrap();
    sim.access(&TraceRecord { op: TraceOp::Read, sector: u64::MAX, sectors: 1 });
    sim.access(&TraceRecord { op: TraceOp::Read, sector: u64::MAX - 1, sectors: 2 });
    assert_eq!((sim.report().accesses, sim.report().hits), (3, 1));
    assert_eq!(footprint(&[TraceRecord { op: TraceOp::Read, sector: u64::MAX, sectors: 1 }], 1), 1);
    // A hand-made shape out of range is brought into range.
    let sim = Simulator::new(PolicyKind::Sieve, Shape::Full { blocks: 100_000, block_sectors: 6 });
    assert_eq!(sim.shape(), Shape::Full { blocks: 65535, block_sectors: 8 });
    assert_eq!(sim.report().cache_blocks, 65535);
    let sim = Simulator::new(PolicyKind::Fifo, Shape::Full { blocks: 0, block_sectors: u32::MAX });
    assert_eq!(sim.shape(), Shape::Full { blocks: 1, block_sectors: 1 << 31 });
    // A hand-made report with more hits than accesses.
    let mut report = sim.report();
    report.hits = 5;
    assert_eq!(report.miss_ratio(), 0.0);
}

#[test]
fn huge_block_numbers_wrap_instead_of_failing() {
    let mut sim = Simulator::fully_associative(PolicyKind::Sieve, 4, 1).unwrap();
    assert!(!sim.access_block(TraceOp::Read, u64::MAX));
    assert!(sim.access_block(TraceOp::Read, u64::MAX));
    assert!(sim.access_block(TraceOp::Write, MAX_BLOCK));
    assert_eq!(sim.report().write_hits, 1);
}
