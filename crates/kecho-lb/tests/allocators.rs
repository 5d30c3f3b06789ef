//! Allocators as pure state machines: their distributions, checked on generated inputs.

use kecho_lb::alloc::{
    Allocator, Candidate, HashAffinity, LeastLoaded, Policy, PowerOfTwo, RoundRobin, Schedule, WeightedRandom,
};
use kecho_lb::load::ServerId;
use kecho_lb::LbError;
use proptest::prelude::*;

fn cands(loads: &[Option<f64>]) -> Vec<Candidate> {
    loads.iter().enumerate().map(|(i, l)| Candidate::new(ServerId(i as u32 * 3 + 1), *l)).collect()
}

fn pick(a: &mut dyn Allocator, key: Option<&[u8]>, c: &[Candidate]) -> Vec<usize> {
    let mut out = Vec::new();
    a.allocate(key, c, &mut out);
    out
}

fn check(cond: bool, what: &str) -> Result<(), TestCaseError> {
    prop_assert!(cond, "{}", what);
    Ok(())
}

proptest! {
    #[test]
    fn round_robin_is_exact(k in 1usize..12, rounds in 1usize..20) {
        let c = cands(&vec![None; k]);
        let mut rr = RoundRobin::default();
        let mut count = vec![0usize; k];
        for _ in 0..k * rounds {
            for i in pick(&mut rr, None, &c) {
                count[i] += 1;
            }
        }
        check(count.iter().all(|&n| n == rounds), "every server exactly `rounds` times")?;
    }

    #[test]
    fn p2c_never_picks_the_worse_of_its_two(loads in prop::collection::vec(prop::option::of(0.0f64..100.0), 2..16), seed: u64) {
        let c = cands(&loads);
        let mut p = PowerOfTwo::new(seed);
        let worst = loads.iter().map(|l| l.unwrap_or(f64::INFINITY)).fold(f64::MIN, f64::max);
        let unique_worst = loads.iter().filter(|l| l.unwrap_or(f64::INFINITY) == worst).count() == 1;
        for _ in 0..50 {
            let (a, b, chosen) = p.draw(&c).unwrap();
            check(a != b, "two distinct servers")?;
            let load = |i: usize| c[i].load.unwrap_or(f64::INFINITY);
            check(chosen == a || chosen == b, "one of the two")?;
            check(load(chosen) <= load(if chosen == a { b } else { a }), "never the worse of the two")?;
            check(!(unique_worst && load(chosen) == worst), "never the cluster's worst")?;
        }
    }

    #[test]
    fn least_loaded_takes_the_n_lowest(loads in prop::collection::vec(0.0f64..100.0, 1..16), n in 1usize..6) {
        let c = cands(&loads.iter().map(|l| Some(*l)).collect::<Vec<_>>());
        let mut a = LeastLoaded::new(n);
        let got = pick(&mut a, None, &c);
        check(got.len() == n.min(loads.len()), "n servers")?;
        let mut sorted = loads.clone();
        sorted.sort_by(f64::total_cmp);
        let cutoff = sorted[n.min(loads.len()) - 1];
        check(got.iter().all(|&i| loads[i] <= cutoff), "none above the n-th lowest")?;
    }

    #[test]
    fn affinity_is_sticky(keys in prop::collection::vec("[a-z0-9]{1,12}", 1..30), k in 2usize..10, gone in 0usize..10) {
        let c = cands(&vec![None; k]);
        let mut a = HashAffinity::default();
        let first: Vec<u32> = keys.iter().map(|key| c[pick(&mut a, Some(key.as_bytes()), &c)[0]].server.0).collect();
        // Asking again, in another order of candidates, gives the same server.
        let mut rev = c.clone();
        rev.reverse();
        for (key, want) in keys.iter().zip(&first) {
            check(rev[pick(&mut a, Some(key.as_bytes()), &rev)[0]].server.0 == *want, "same server")?;
        }
        // A server leaving moves only its own keys.
        let gone = c[gone % k].server;
        let rest: Vec<Candidate> = c.iter().copied().filter(|x| x.server != gone).collect();
        for (key, was) in keys.iter().zip(&first) {
            let now = rest[pick(&mut a, Some(key.as_bytes()), &rest)[0]].server.0;
            check(*was == gone.0 || now == *was, "keys of the other servers stay")?;
        }
    }
}

#[test]
fn weighted_random_follows_the_weights() {
    let mut c = cands(&[None, None, None]);
    c[0].weight = 1.0;
    c[1].weight = 3.0;
    c[2].weight = 0.0;
    let mut w = WeightedRandom::new(42);
    let mut count = [0usize; 3];
    for _ in 0..8000 {
        count[pick(&mut w, None, &c)[0]] += 1;
    }
    assert_eq!(count[2], 0, "weight 0 is never picked");
    let share = count[1] as f64 / 8000.0;
    assert!((share - 0.75).abs() < 0.03, "share {share}");
}

#[test]
fn schedule_cycles_and_skips_absent_servers() {
    let mut s = Schedule::parse("# a schedule\ns1 x2\n4   # comment\n\ns7\n", "test").unwrap();
    let c = cands(&[None, None, None]); // servers 1, 4 and 7
    let got: Vec<u32> = (0..8).map(|_| c[pick(&mut s, None, &c)[0]].server.0).collect();
    assert_eq!(got, [1, 1, 4, 7, 1, 1, 4, 7]);
    let only4: Vec<Candidate> = c.iter().copied().filter(|x| x.server.0 == 4).collect();
    assert_eq!(pick(&mut s, None, &only4), [0]);
    assert_eq!(pick(&mut s, None, &[]), Vec::<usize>::new());
}

#[test]
fn bad_schedules_and_policies_are_clear_errors() {
    for (text, line) in [("s1\nbogus\n", 2), ("s1 x0\n", 1), ("s1 x2 extra\n", 1), ("# nothing\n", 0)] {
        match Schedule::parse(text, "f.txt") {
            Err(LbError::Schedule { line: l, path, .. }) => {
                assert_eq!((l, path.as_str()), (line, "f.txt"), "{text:?}")
            }
            other => panic!("{text:?}: {other:?}"),
        }
    }
    let missing = Policy::Schedule("/nonexistent/schedule.txt".into()).build(1);
    assert!(matches!(missing, Err(LbError::ScheduleIo { .. })));
    for bad in ["least:0", "least:x", "rr:1", "schedule:", "magic"] {
        assert!(matches!(bad.parse::<Policy>(), Err(LbError::Policy { .. })), "{bad}");
    }
    assert_eq!("least:3".parse::<Policy>().unwrap(), Policy::Least(3));
    assert_eq!("p2c".parse::<Policy>().unwrap(), Policy::PowerOfTwo);
}
